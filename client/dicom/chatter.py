"""Keep pydicom's and the native decoders' chatter out of the user's terminal.

pydicom logs every failed decoder attempt as an ERROR with a traceback, even when the next
plugin decodes the file, and warns about many harmless header oddities; openjpeg and other
native decoders print straight to file descriptor 2. What matters about a file is reported as
its skip reason or note; the rest goes to this package's DEBUG log (message only, no
traceback, no pixel data or identifiers come from these libraries' messages about codecs).

``set_verbose(True)`` (the CLI's ``--verbose``) lets everything through unchanged. Worker
processes are forked and inherit the switch.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_state = {"verbose": False}
_MAX_CAPTURED = 4096


def set_verbose(verbose: bool) -> None:
    """Let pydicom's log records, warnings and native stderr output through (True) or not."""
    _state["verbose"] = bool(verbose)


def is_verbose() -> bool:
    return _state["verbose"]


class _ToDebug(logging.Handler):
    """Re-logs a pydicom record at DEBUG on this package's logger, without its traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record must not break decoding
            message = str(record.msg)
        log.debug("pydicom %s: %s", record.levelname.lower(), message.splitlines()[0] if message else "")


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Within the block, pydicom's log records go to DEBUG here and its warnings are dropped."""
    if _state["verbose"]:
        yield
        return
    logger = logging.getLogger("pydicom")
    handler = _ToDebug()
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate


@contextmanager
def native_stderr_to_debug() -> Iterator[None]:
    """Within the block, whatever native code writes to fd 2 is logged at DEBUG instead."""
    if _state["verbose"]:
        yield
        return
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (some embedded interpreters): nothing to keep quiet
        yield
        return
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
        sink.seek(0)
        text = sink.read(_MAX_CAPTURED).decode("utf-8", errors="replace").strip()
        if text:
            log.debug("decoder output: %s", " | ".join(text.splitlines()))
    finally:
        os.close(saved)
        sink.close()


@contextmanager
def quiet() -> Iterator[None]:
    """Both of the above."""
    with quiet_pydicom(), native_stderr_to_debug():
        yield
