"""Interruptions: SIGTERM raised as a ``KeyboardInterrupt`` (``Terminated``), held back while a call to a database
or tracking server must not be cut in half (``uninterrupted``), and how one is described."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``kill``, a container stopping) raised as an interruption: every place that
    handles Ctrl-C (a run ends KILLED, a trial is queued again) handles it the same way."""


def interrupt_message(interrupt: KeyboardInterrupt) -> str:
    return str(interrupt) or "interrupted (Ctrl-C)"


_held = 0  # depth of ``uninterrupted`` blocks in the main thread, where Python runs signal handlers
_pending: KeyboardInterrupt | None = None


def _interruption(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGTERM:
        return Terminated(f"terminated ({signal.Signals(signum).name})")
    return KeyboardInterrupt()


def _interrupt(signum: int, frame: Any) -> None:
    global _pending
    interruption = _interruption(signum)
    if _held:
        _pending = _pending or interruption
        return
    raise interruption


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving within the block (in the main thread, under ``sigterm_interrupts``) is raised
    when the block ends. A database call cut in half can leave its connection inside a write transaction that
    every later call, this process's own included, then waits on: two workers once hung for good that way."""
    global _held, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            interruption, _pending = _pending, None
            raise interruption


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread instead of ending the process on the
    spot, which would leave MLflow runs RUNNING and trials unfinished; it and Ctrl-C wait for the end of an
    ``uninterrupted`` block."""
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGINT)
                if signum == signal.SIGTERM or signal.getsignal(signum) is signal.default_int_handler}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
