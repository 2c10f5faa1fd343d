"""What this rank is doing now, for the hang watchdog: one of :data:`PHASES`, and since when.

A leaf module (standard library only): the trainer, the checkpoint manager and the hooks mark a
phase with ``with phase("checkpoint"):``; the watchdog thread reads :func:`current` and applies that
phase's timeout. Phases nest (an evaluation inside a step returns to ``step`` when it ends).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

PHASES = ("startup", "step", "checkpoint", "eval", "export")

_lock = threading.Lock()
_current: tuple[str, float] = ("startup", time.monotonic())


def current() -> tuple[str, float]:
    """``(phase, time.monotonic() when it began)``."""
    with _lock:
        return _current


def enter(name: str) -> tuple[str, float]:
    """Make ``name`` the current phase from now; returns the one it replaces.

    Raises:
        ValueError: ``name`` is not one of :data:`PHASES`.
    """
    global _current
    if name not in PHASES:
        raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
    with _lock:
        before, _current = _current, (name, time.monotonic())
    return before


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """``name`` for the duration of the block; afterwards the previous phase again, timed from the
    block's end (the time spent inside does not count against it)."""
    before = enter(name)
    try:
        yield
    finally:
        enter(before[0])
