"""Waiting out orbax's background writes after a failed save, and keeping their noise quiet.

When one of orbax's writes fails, the save raises while others are still running: in writer
threads orbax started (``_SignalingThread``), and in tensorstore operations whose asyncio task
belonged to an event loop orbax has already closed (when such an operation ends, its callback
finds the loop closed and Python prints ``Exception ignored ... RuntimeError: Event loop is
closed``). Deleting the partial checkpoint at that moment races with them: a late write fails
the deletion (``Directory not empty``) or recreates a directory after it.

:func:`quiet_writes` wraps a save: on failure it joins the threads started during the save and
then waits until the directory being written has stopped changing (both bounded), so the caller
can remove it; while it runs, orbax's per-thread tracebacks of the failure (logged before the save
re-raises the same error) and the closed-loop callbacks are dropped, since the caller raises one
clear error instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_depth = 0
_previous_hook: Any = None


class _DropWriterTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno >= logging.ERROR
            and "orbax" in record.pathname
            and "raised an exception" in str(record.msg)
        )


def _closed_loop_callback(unraisable: Any) -> bool:
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _hook(unraisable: Any) -> None:
    if not _closed_loop_callback(unraisable):
        (_previous_hook or sys.__unraisablehook__)(unraisable)


@contextlib.contextmanager
def _dropping_closed_loop_callbacks() -> Iterator[None]:
    global _depth, _previous_hook
    with _lock:
        if _depth == 0:
            _previous_hook = sys.unraisablehook
            sys.unraisablehook = _hook
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and sys.unraisablehook is _hook:
                sys.unraisablehook = _previous_hook


def _join(threads: set[threading.Thread], deadline: float) -> None:
    for thread in threads:
        while time.monotonic() < deadline:
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
                break
            except RuntimeError:  # registered but not started yet
                time.sleep(0.01)


def _snapshot(directory: str) -> list[tuple[str, int]]:
    found = []
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            try:
                found.append((path, os.lstat(path).st_size))
            except OSError:
                pass
    return sorted(found)


def _settle(directory: str, deadline: float) -> None:
    """Waits until ``directory``'s files have not changed for 0.15 s (or the deadline)."""
    last, quiet_since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = _snapshot(directory)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= 0.15:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def quiet_writes(directory: Any, timeout: float = 60.0) -> Iterator[None]:
    """Runs an orbax save into ``directory``; if it raises, first waits for its writes to stop.

    Args:
        directory: the (local) directory the save writes into.
        timeout: the most seconds to wait after a failure.
    """
    before = set(threading.enumerate())
    drop = _DropWriterTracebacks()
    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        with _dropping_closed_loop_callbacks():
            try:
                yield
            except Exception:
                deadline = time.monotonic() + timeout
                current = threading.current_thread()
                _join(
                    {t for t in set(threading.enumerate()) - before if t is not current}, deadline
                )
                _settle(os.fspath(directory), min(deadline, time.monotonic() + 5.0))
                raise
    finally:
        logger.removeFilter(drop)
