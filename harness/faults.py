"""Fault injection for the reliability tests, read from ``$HARNESS_FAULT``; inert when it is unset.

``HARNESS_FAULT`` is a comma-separated list of ``kind:arg[:rank]``:

- ``raise:S[:R]``          raise ``RuntimeError("injected fault at step S")`` as step S starts (on rank R,
                           default every rank); ``raise_once`` does it only in a job's first attempt
                           (``TORCHELASTIC_RESTART_COUNT`` unset or 0), for torchrun ``--max-restarts``
- ``slow:T[:R]``           every step sleeps T seconds as it starts (on rank R): a slow rank, a long run
- ``nan_loss:S[:R]``       the first micro-batch's loss of step S is NaN (on rank R)
- ``checkpoint_sleep:T``   every checkpoint sleeps T seconds after its files are written, before its
                           manifest (a window for kills during a save)
- ``checkpoint_enospc:S``  writing checkpoint S fails with ``OSError(ENOSPC)`` (disk full)
"""

from __future__ import annotations

import errno
import os
import time


def _faults() -> list[tuple[str, float, int | None]]:
    out = []
    for item in filter(None, os.environ.get("HARNESS_FAULT", "").split(",")):
        kind, arg, *rank = item.split(":")
        out.append((kind, float(arg), int(rank[0]) if rank else None))
    return out


def _mine(rank: int | None) -> bool:
    return rank is None or rank == int(os.environ.get("RANK", "0"))


def on_step(step: int) -> None:
    """Called as optimizer step ``step`` starts."""
    for kind, arg, rank in _faults():
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if (
            kind in ("raise", "raise_once")
            and step == arg
            and _mine(rank)
            and (kind == "raise" or first_attempt)
        ):
            raise RuntimeError(f"injected fault at step {step}")
        if kind == "slow" and _mine(rank):
            time.sleep(arg)


def nan_loss(step: int) -> bool:
    """True when the first micro-batch's loss of ``step`` must be NaN on this rank."""
    return any(k == "nan_loss" and step == a and _mine(r) for k, a, r in _faults())


def on_checkpoint(step: int) -> None:
    """Called on rank 0 after a checkpoint's files are written, before its manifest."""
    for kind, arg, _ in _faults():
        if kind == "checkpoint_sleep":
            time.sleep(arg)
        if kind == "checkpoint_enospc" and step == arg:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
