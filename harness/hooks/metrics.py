"""The metrics sinks (``metrics.jsonl``, console, wandb) and the MFU sanity check."""

from __future__ import annotations

import logging

from harness.hooks.base import Hook

log = logging.getLogger("harness")


class MetricsHook(Hook):
    """Writes each step's record to the sinks of a :class:`~harness.metrics.MetricsLogger` (rank 0;
    None elsewhere), and warns once when MFU exceeds 100 % (the peak FLOP/s used is then too low)."""

    def __init__(self, metrics):
        self.metrics = metrics
        self._mfu_warned = False

    def on_step_end(self, trainer, record) -> None:
        if record.mfu > 1.0 and not self._mfu_warned:
            self._mfu_warned = True
            t = trainer.throughput
            log.warning(
                "step %d: MFU %.0f%% is above 100%%: the peak used, %.3g FLOP/s per device (%s), is too low; "
                "set train.peak_flops_per_device",
                record.step,
                100 * record.mfu,
                t.peak_flops,
                t.peak_source,
            )
        if self.metrics is not None:
            self.metrics.write(record)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
