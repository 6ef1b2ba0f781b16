"""Hospital names for the records people read, from the coordinator's node registry.

The coordinator keeps ``nodes.json`` (hospital name -> Flower node id, see
:mod:`fedrad.server.coordinator`). A node restarted with a new key or re-registered gets a new node
id under the same name; :class:`RegistryNames` reads the registry again when it changes, so every
reply is filed under the hospital's name and a reconnecting hospital never becomes a second
("phantom") row. Pass it to :func:`fedrad.server.study.run_study` as ``names``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)


def parse_registry(data: object) -> dict[int, str]:
    """node id -> name from a registry mapping (name -> node id, ids as int or decimal string)."""
    out: dict[int, str] = {}
    if not isinstance(data, dict):
        return out
    for name, node_id in data.items():
        try:
            out[int(str(node_id))] = str(name)
        except ValueError:
            log.warning("node registry: hospital %r has a malformed node id; ignored", name)
    return out


class RegistryNames(Mapping[int, str]):
    """A live, read-only view of ``nodes.json`` as node id -> hospital name.

    Ids seen once stay known (a node's old id keeps its name after re-registration)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._names: dict[int, str] = {}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("node registry %s unreadable (%s); names kept as they were", self.path, exc)
            return
        self._stamp = stamp
        self._names.update(parse_registry(data))

    def __getitem__(self, node_id: int) -> str:
        if node_id not in self._names:
            self._refresh()
        return self._names[node_id]

    def __iter__(self) -> Iterator[int]:
        self._refresh()
        return iter(dict(self._names))

    def __len__(self) -> int:
        self._refresh()
        return len(self._names)
