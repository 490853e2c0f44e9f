"""Interruptions: SIGTERM raised as a ``KeyboardInterrupt`` (``Terminated``), and how one is described."""

from __future__ import annotations

import contextlib
import signal
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``kill``, a container stopping) raised as an interruption: every place that
    handles Ctrl-C (a run ends KILLED, a trial is queued again) handles it the same way."""


def interrupt_message(interrupt: KeyboardInterrupt) -> str:
    return str(interrupt) or "interrupted (Ctrl-C)"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread instead of ending the process on the
    spot, which would leave MLflow runs RUNNING and trials unfinished."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated ({signal.Signals(signum).name})")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
