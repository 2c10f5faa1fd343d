"""Fault injection at step start (``raise``, ``slow`` of ``$HARNESS_FAULT``; see :mod:`harness.faults`)."""

from __future__ import annotations

from harness.faults import Faults
from harness.hooks.base import Hook


class FaultHook(Hook):
    """Raises or sleeps as a step starts when ``$HARNESS_FAULT`` says so (inert when it is unset)."""

    def __init__(self, faults: Faults):
        self.faults = faults

    def on_step_start(self, trainer, info) -> None:
        self.faults.on_step(info.step)
