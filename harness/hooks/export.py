"""The Hugging Face export at the end of a finished run (``checkpoint.export_hf``)."""

from __future__ import annotations

import os

from harness import phases
from harness.hooks.base import Hook


class ExportHook(Hook):
    """Exports ``<run>/hf`` when the run is finished (budget reached or stopped early): after an
    invocation that trained, or when a finished run has no export yet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @classmethod
    def from_config(cls, cfg) -> ExportHook:
        """``checkpoint.export_hf``."""
        return cls(cfg.export_hf)

    def on_train_end(self, trainer) -> None:
        state = trainer.state
        finished = state.step >= trainer.max_steps or state.stopped_early
        exported = os.path.isdir(os.path.join(trainer.run.path, "hf"))
        if self.enabled and finished and (trainer.trained or not exported):
            with phases.phase("export"):
                trainer.export_hf()
