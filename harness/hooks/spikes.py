"""Loss-spike detection: a warning and the ``loss_spike`` event."""

from __future__ import annotations

import collections
import logging
import math
import statistics

from harness.hooks.base import Hook

log = logging.getLogger("harness")


class LossSpikeHook(Hook):
    """A step whose loss exceeds ``factor`` x the median of the last ``window`` finite losses (once
    at least min(10, window) are known) gets the ``loss_spike`` event and a warning; 0 disables."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    @classmethod
    def from_config(cls, train) -> LossSpikeHook:
        """``train.spike_factor`` and ``train.spike_window``."""
        return cls(train.spike_factor, train.spike_window)

    def on_step_end(self, trainer, record) -> None:
        if not math.isfinite(record.loss):
            return
        if self.factor and len(self.recent) >= min(10, self.recent.maxlen):
            median = statistics.median(self.recent)
            if record.loss > self.factor * median:
                record.events = [*(record.events or []), "loss_spike"]
                log.warning(
                    "step %d: loss spike %.4f > %.3g x running median %.4f",
                    record.step,
                    record.loss,
                    self.factor,
                    median,
                )
        self.recent.append(record.loss)
