"""What this rank is doing now, for the hang watchdog: one of :data:`PHASES`, and since when.

A leaf module (standard library only): the trainer, the checkpoint manager and the hooks mark a
phase with ``with phase("checkpoint"):``; the watchdog thread reads :func:`current` and applies that
phase's timeout (``harness/hooks/watchdog.py``) to the time since it began. Phases nest (an
evaluation inside a step returns to ``step`` when it ends, timed afresh from then).

The phases of a training run (``Trainer.train``):

- ``startup``     from the start of training until the first step of this invocation ends (the
                  hooks' ``on_train_start`` and the first step, its compile and warm-up included)
- ``step``        from the end of the latest step (or of the phase nested in it) to the next end
- ``checkpoint``  a save (``Trainer.save_checkpoint``, the checkpoint manager's staging and wait)
- ``eval``        a validation pass (the evaluation hook)
- ``export``      the Hugging Face export (the export hook)

One phase per process: mark phases from the training thread only (a background thread's work is
not a phase of its own; the training thread waiting for it is).
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
    block's end (the time spent inside does not count against it), also when the block raises.

    Raises:
        ValueError: ``name`` is not one of :data:`PHASES` (before the block runs).
    """
    before = enter(name)
    try:
        yield
    finally:
        enter(before[0])
