"""A Grid that polls the SuperLink for replies more often than Flower's deployment Grid.

Flower 1.41's ``HttpGrid.send_and_receive`` pushes the messages and then checks for replies every
3 s, so a round's end is noticed up to 3 s late, twice per round (train, evaluate). This wrapper
does the same push/pull through the wrapped Grid's own ``push_messages``/``pull_messages`` with
a shorter pause; everything else is delegated unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

try:  # Flower's Run type moved between releases; only used in annotations here
    from flwr.supercore.run import Run
except ImportError:  # pragma: no cover
    Run = object  # type: ignore[assignment,misc]


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


class FastPollGrid(DelegatingGrid):
    """Delegates to ``inner``; ``send_and_receive`` polls every ``interval`` seconds."""

    def __init__(self, inner: Grid, *, interval: float) -> None:
        super().__init__(inner)
        self._interval = max(0.01, float(interval))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self._inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return replies
