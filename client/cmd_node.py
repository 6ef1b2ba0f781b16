"""``fedrad-node check|start``: preflight a hospital node, then run it as a Flower SuperNode."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import stat
from pathlib import Path

from fedrad.common.cli import console, err_console
from fedrad.common.errors import ConfigError, FedradError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("check", help="preflight: report everything that would stop this node, each with its fix")
    c.add_argument("--config", type=Path, required=True, help="node.yaml")
    c.set_defaults(handler=run_check)
    s = sub.add_parser("start", help="join the federation as a Flower SuperNode (TLS and node key)")
    s.add_argument("--config", type=Path, required=True, help="node.yaml")
    s.add_argument("--insecure", action="store_true", help="plaintext, no TLS (testing only; must be explicit)")
    s.add_argument("--dry-run", action="store_true", help="print the SuperNode command instead of running it")
    s.set_defaults(handler=run_start)


def preflight(config: Path) -> list[tuple[str, str]]:
    """(problem, fix) pairs; empty when the node is ready."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from .node import load_site
    from .node_config import load_node_config

    try:
        node = load_node_config(config)
    except ConfigError as exc:
        return [(p, "correct node.yaml (see docs in README, 'Deployment')") for p in exc.problems]
    problems: list[tuple[str, str]] = []
    if not node.insecure:
        if node.root_certificates is None or not node.root_certificates.exists():
            problems.append((f"CA certificate {node.root_certificates} missing",
                             "copy ca.pem from your node kit and set root_certificates"))
        else:
            try:
                ca = x509.load_pem_x509_certificate(node.root_certificates.read_bytes())
                if ca.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
                    problems.append((f"CA certificate {node.root_certificates} expired on {ca.not_valid_after_utc:%Y-%m-%d}",
                                     "ask the coordinator for a new node kit"))
            except ValueError:
                problems.append((f"{node.root_certificates} is not a PEM certificate", "use ca.pem from the node kit"))
    key = node.auth_private_key
    if key is None or not key.exists():
        problems.append((f"node authentication key {key} missing", "set auth_private_key to node-auth.key from the node kit"))
    else:
        if stat.S_IMODE(key.stat().st_mode) & 0o077:
            problems.append((f"{key} is readable by other users", f"chmod 600 {key}"))
        try:
            serialization.load_ssh_private_key(key.read_bytes(), password=None)  # the format flower-supernode reads
        except ValueError:
            problems.append((f"{key} is not an OpenSSH private key", "use node-auth.key from the node kit"))
    try:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(node.state_dir, os.W_OK):
            raise PermissionError
    except OSError:
        problems.append((f"state folder {node.state_dir} is not writable", "create it and give the node's user write access"))
    try:
        site = load_site(node, channels=1, image_size=28, class_names=None)
        if len(site.data.train) == 0:
            problems.append((f"{node.data.path}: no training images", "check the data export"))
    except FedradError as exc:
        problems.append((str(exc), "fix the data path or files named above"))
    if shutil.which("flower-supernode") is None:
        problems.append(("flower-supernode not on PATH", "install fedrad (pip install .) in this environment"))
    return problems


def run_check(args: argparse.Namespace) -> int:
    import torch

    problems = preflight(args.config)
    device = f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU (no CUDA GPU visible)"
    console.print(f"compute: {device}")
    if not problems:
        console.print(f"[green]{args.config}: ready[/]")
        return 0
    for problem, fix in problems:
        err_console.print(f"[red]problem:[/] {problem}\n  [bold]fix:[/] {fix}")
    return 1


def supernode_command(config: Path, *, insecure: bool) -> list[str]:
    from .node import NODE_CONFIG_KEY
    from .node_config import load_node_config

    node = load_node_config(config)
    if node.insecure != insecure:
        raise FedradError("plaintext needs both `insecure: true` in node.yaml and --insecure on the command line"
                          if insecure or node.insecure else "inconsistent TLS settings")
    cmd = ["flower-supernode", "--superlink", node.superlink,
           "--node-config", f'{NODE_CONFIG_KEY}="{Path(config).resolve()}"']
    if insecure:
        cmd.append("--insecure")
    else:
        if node.root_certificates is None:
            raise FedradError("node.yaml: root_certificates is required for TLS")
        cmd += ["--root-certificates", str(node.root_certificates)]
    if node.auth_private_key is not None:
        cmd += ["--auth-supernode-private-key", str(node.auth_private_key)]
    return cmd


def run_start(args: argparse.Namespace) -> int:
    cmd = supernode_command(args.config, insecure=args.insecure)
    if args.dry_run:
        console.print(shlex.join(cmd), markup=False)
        return 0
    problems = preflight(args.config)
    if problems:
        raise FedradError("preflight failed: " + "; ".join(p for p, _ in problems) + " (run fedrad-node check)")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    os.execvpe(cmd[0], cmd, env)  # the SuperNode replaces this process: SIGTERM reaches it directly
    return 0  # pragma: no cover
