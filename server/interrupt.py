"""Stopping a running study at a safe point (Ctrl-C / SIGTERM).

Flower's simulation runs the ServerApp in a (non-daemon) thread that waits for replies for up to
``round_timeout_s``, while the main thread runs the simulated hospitals. A ``KeyboardInterrupt``
in the main thread stops the hospitals but leaves the ServerApp thread waiting for replies that
never come, and the interpreter waits for that thread on exit. So fedrad never lets the signal
raise: :class:`StopRequest` records it, and :class:`InterruptibleGrid`, the grid the study runs
on, raises :class:`StudyInterrupted` in the ServerApp thread at its next wait (a safe point: between
messages, never inside an aggregation or a checkpoint write). The study then saves its state and
returns; Flower stops the hospitals and returns normally.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

#: How often a waiting grid call looks for replies and for a stop request (seconds).
POLL_S = 0.1
#: Signals beyond the first before fedrad gives up waiting and exits at once.
HARD_EXIT_AFTER = 3
EXIT_INTERRUPTED = 130


class StudyInterrupted(Exception):
    """Raised in the ServerApp thread at a safe point after a stop was requested."""


class StopRequest:
    """A thread-safe flag set by a signal handler (or by a test) and read by the study."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signals = 0
        self.reason = ""

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`StudyInterrupted` if a stop was requested."""
        if self._event.is_set():
            raise StudyInterrupted(self.reason or "stop requested")

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


@contextmanager
def stop_on_signals(stop: StopRequest, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM request a stop at the next safe point instead of raising.

    The third signal exits the process at once (exit code 130) for a user who cannot wait.
    Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.signals += 1
        name = signal.Signals(signum).name
        if stop.signals == 1:
            stop.request(f"{name} received")
            log.warning("%s: stopping at the next safe point and saving the state (press Ctrl-C twice more "
                        "to exit at once without waiting)", name)
        elif stop.signals < HARD_EXIT_AFTER:
            log.warning("%s: already stopping; the state is being saved", name)
        else:
            log.error("%s: exiting at once without waiting for the simulation to stop", name)
            os._exit(EXIT_INTERRUPTED)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class InterruptibleGrid(Grid):
    """A :class:`Grid` that delegates to ``inner`` and raises :class:`StudyInterrupted` at its waits
    once ``stop`` is set (waits poll every :data:`POLL_S` seconds instead of sleeping through)."""

    def __init__(self, inner: Grid, stop: StopRequest) -> None:
        self._inner = inner
        self._stop = stop

    def __getattr__(self, name: str) -> Any:  # anything else a caller uses (e.g. ``_fab_hash``)
        return getattr(self._inner, name)

    def set_run(self, run: Any) -> None:  # type: ignore[override]
        self._inner.set_run(run)

    @property
    def run(self) -> Any:  # type: ignore[override]
        return self._inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # type: ignore[override]
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self._stop.check()
        ids = list(self._inner.get_node_ids())
        if not ids:  # callers poll this while hospitals connect: keep their sleep interruptible
            self._stop.wait(POLL_S)
            self._stop.check()
        return ids

    def get_nodes(self) -> Iterable[Any]:
        self._stop.check()
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._stop.check()
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._stop.check()
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Like Flower's: push, then pull until every reply came or ``timeout`` passed; a stop
        request ends the wait (replies not yet in are dropped: the round is not aggregated)."""
        msg_ids = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while msg_ids and (end is None or time.monotonic() < end):
            got = list(self._inner.pull_messages(msg_ids))
            replies.extend(got)
            msg_ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if msg_ids and self._stop.wait(POLL_S):
                break
        self._stop.check()
        return replies
