"""A Grid that polls the SuperLink for replies more often than Flower's deployment Grid.

Flower 1.41's ``HttpGrid.send_and_receive`` pushes the messages and then checks for replies every
3 s, so a round's end is noticed up to 3 s late, twice per round (train, evaluate). This wrapper
does the same push/pull through the wrapped Grid's own ``push_messages``/``pull_messages`` with
a shorter pause; everything else is delegated unchanged.

It also names the hospital behind an error reply the SuperLink makes up itself (e.g. "Node
Unavailable" once a killed hospital's heartbeat lapsed): Flower sends those with the SuperLink's
own node id (``src_node_id`` 1), so per-hospital records would file the failure under ``node-1``
and the hospital itself as silent. :func:`attribute_superlink_errors` files such a reply under
the node the request went to.

And it makes the ServerApp's pulls of reply objects retry after 0.05-0.5 s instead of Flower's
1-10 s (:func:`quicken_reply_pulls`): a reply is listed as soon as the node registered it, before
the node has pushed its 44.7 MB of objects (ResNet-18), so the first pulls usually find objects
still on their way (issue 14). ``FEDRAD_QUICK_PULLS=0`` in the coordinator's environment keeps
Flower's waits (for side-by-side measurements).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from fedrad.common.quick_pulls import QUICK_PULL_BACKOFF_S, quick_pulls_enabled, quicken_pulls

try:  # Flower's Run type moved between releases; only used in annotations here
    from flwr.supercore.run import Run
except ImportError:  # pragma: no cover
    Run = object  # type: ignore[assignment,misc]


log = logging.getLogger(__name__)

def quicken_reply_pulls() -> bool:
    """Quick retries for the deployment Grid's pulls of reply objects, unless switched off; True if on."""
    if not quick_pulls_enabled():
        return False
    from flwr.superlink.grid import http_grid

    quicken_pulls(http_grid)
    log.info("reply object pulls: retry after %.2f-%.2fs", *QUICK_PULL_BACKOFF_S)
    return True


class DelegatingGrid(Grid):
    """A Grid that passes every call to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)


def attribute_superlink_errors(replies: Iterable[Message], destinations: Mapping[str, int]) -> list[Message]:
    """``replies`` with every error reply the SuperLink made up (sender: the SuperLink) re-sent as
    from the node its request went to (``destinations``: request message id -> node id)."""
    out = []
    for msg in replies:
        dst = destinations.get(msg.metadata.reply_to_message_id)
        if msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID and dst is not None:
            meta = copy.copy(msg.metadata)
            meta.__dict__["_src_node_id"] = dst  # Metadata has no setter; Flower sets its own ids this way
            msg = Message(error=msg.error, metadata=meta)
        out.append(msg)
    return out


class FastPollGrid(DelegatingGrid):
    """Delegates to ``inner``; ``send_and_receive`` polls every ``interval`` seconds; reply objects
    still being uploaded are retried quickly (:func:`quicken_reply_pulls`)."""

    def __init__(self, inner: Grid, *, interval: float) -> None:
        super().__init__(inner)
        self._interval = max(0.01, float(interval))
        self.quick_pulls = quicken_reply_pulls()

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        ids = list(self._inner.push_messages(messages))
        destinations = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
        pending = {mid for mid in ids if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return attribute_superlink_errors(replies, destinations)
