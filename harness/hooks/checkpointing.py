"""Checkpoint cadence: every ``checkpoint.every`` steps and at the step a run or invocation ends; the
end of a run or invocation (budget, stop, preemption) waits for the save in flight."""

from __future__ import annotations

from harness.hooks.base import Hook


class CheckpointHook(Hook):
    """Saves after step s when ``s % every == 0`` (``every`` > 0) or when this step ends the run or the
    invocation (the budget, early stopping, ``train.stop_at_step``, a stop signal)."""

    def __init__(self, every: int):
        self.every = every

    @classmethod
    def from_config(cls, cfg) -> CheckpointHook:
        """``checkpoint.every``."""
        return cls(cfg.every)

    def on_step_end(self, trainer, record) -> None:
        if trainer.done or (self.every and record.step % self.every == 0):
            trainer.save_checkpoint()
        if trainer.done:  # complete before the invocation ends (export, exit status 75 / 130)
            trainer.checkpoints.wait()

    def on_train_end(self, trainer) -> None:
        trainer.checkpoints.wait()
