"""The coordinator's public face: a TLS front that passes hospitals' Fleet API calls, and nothing else.

Flower 1.41's SuperLink serves the Fleet (SuperNodes), Control (``flwr run``/``ls``/``stop``,
``supernode register``) and ServerAppIo/runtime APIs as one HTTP app on one ``--host/--port``;
without Flower's enterprise OIDC plugin (``FLWR_OIDC_ENABLED``, absent from the open-source
distribution) the Control API authenticates nobody. So fedrad binds the SuperLink itself to
loopback only and puts this gateway on the public address: it terminates TLS with the SuperLink's
certificate and forwards exactly ``POST /v1/fleet/<name>`` (SuperNode authentication is still
done by the SuperLink, on the headers forwarded unchanged) to the loopback SuperLink over TLS
verified against the federation CA. Anything else (``/v1/control/...``, ``/v1/runtime/...``,
``/docs``, dot segments, percent-encoded paths, other methods) is answered 404 here and never
reaches the SuperLink.

Run: ``python -m fedrad.server.fleet_gateway --listen HOST:PORT --upstream 127.0.0.1:PORT
--certfile superlink.pem --keyfile superlink.key --ca ca.pem`` (``fedrad coordinator start``
does this).
"""

from __future__ import annotations

import argparse
import logging
import re
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

#: The only requests forwarded: a Fleet API call, one plain path segment after ``/v1/fleet/``.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]{0,63}")
#: Headers that describe one hop, not the request; never forwarded.
HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "trailers", "transfer-encoding", "upgrade", "forwarded", "x-forwarded-for",
                         "x-forwarded-host", "x-forwarded-proto", "x-real-ip"})


def is_fleet_request(scope: Scope) -> bool:
    """True only for ``POST /v1/fleet/<name>`` written literally (no encoding, dots, query or fragment tricks)."""
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return False
    path = str(scope.get("path", ""))
    raw = scope.get("raw_path")
    if raw is not None and bytes(raw).split(b"?", 1)[0] != path.encode("ascii", "replace"):
        return False  # percent-encoded or otherwise rewritten: refuse rather than guess
    return FLEET_PATH.fullmatch(path) is not None


class FleetGateway:
    """ASGI app: forward Fleet calls to ``upstream`` (``https://127.0.0.1:PORT``); 404 for the rest."""

    def __init__(self, upstream: str, *, verify: ssl.SSLContext | bool, timeout_s: float = 600.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.upstream, verify=self.verify,
                                             timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if not is_fleet_request(scope):
            log.info("refused %s %s from %s", scope.get("method"), scope.get("path"), (scope.get("client") or ("?",))[0])
            await PlainTextResponse("not found", status_code=404)(scope, receive, send)
            return
        response = await self._forward(Request(scope, receive))
        await response(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]

        async def body() -> AsyncIterator[bytes]:
            async for chunk in request.stream():
                if chunk:
                    yield chunk

        upstream_request = self.client().build_request("POST", request.url.path, headers=headers, content=body())
        try:
            upstream = await self.client().send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("the SuperLink did not answer a Fleet call (%s)", type(exc).__name__)
            return PlainTextResponse("coordinator unavailable", status_code=503)
        out_headers: dict[str, Any] = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=out_headers,
                                 background=BackgroundTask(upstream.aclose))


def upstream_verify(ca: Path | None) -> ssl.SSLContext | bool:
    """TLS to the loopback SuperLink, verified against the federation CA (False: plaintext upstream)."""
    if ca is None:
        return False
    return ssl.create_default_context(cafile=str(ca))


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m fedrad.server.fleet_gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="public HOST:PORT hospitals connect to")
    ap.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    ap.add_argument("--certfile", type=Path, help="TLS certificate (the SuperLink's)")
    ap.add_argument("--keyfile", type=Path, help="its private key")
    ap.add_argument("--ca", type=Path, help="federation CA, to verify the upstream SuperLink")
    ap.add_argument("--insecure", action="store_true", help="plaintext on both sides (testing only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fleet-gateway: %(message)s")
    if not args.insecure and not (args.certfile and args.keyfile and args.ca):
        ap.error("--certfile, --keyfile and --ca are required unless --insecure")
    up_host, up_port = _split(args.upstream)
    scheme = "http" if args.insecure else "https"
    app = FleetGateway(f"{scheme}://{up_host}:{up_port}", verify=upstream_verify(None if args.insecure else args.ca))
    host, port = _split(args.listen)
    tls: dict[str, Any] = {} if args.insecure else {"ssl_certfile": str(args.certfile), "ssl_keyfile": str(args.keyfile)}
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                proxy_headers=False, **tls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
