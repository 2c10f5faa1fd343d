"""Validation every ``eval.every`` steps (and at the last step) and early stopping (``eval.patience``)."""

from __future__ import annotations

import logging

from harness.data import validation_batches
from harness.hooks.base import Hook

log = logging.getLogger("harness")


class EvalHook(Hook):
    """Fills ``record.val_loss`` on evaluation steps (token-mean loss over a fixed set of validation
    micro-batches, all ranks) and stops the run after ``patience`` evaluations without improvement."""

    def __init__(self, every: int, patience: int | None, batches: list):
        self.every, self.patience, self.batches = every, patience, batches

    @classmethod
    def from_config(cls, cfg, val_sequences, micro_batch_size: int, env) -> EvalHook:
        """The ``eval`` section over this rank's share of the held-out sequences (None: no validation)."""
        batches = []
        if val_sequences is not None and cfg.every:
            batches = validation_batches(
                val_sequences, cfg.batches, micro_batch_size, env.rank, env.world_size
            )
        return cls(cfg.every, cfg.patience, batches)

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every and self.batches and (step % self.every == 0 or step == max_steps))

    def on_step_end(self, trainer, record) -> None:
        if not self.due(record.step, trainer.max_steps):
            return
        record.val_loss = trainer.evaluate(self.batches)
        self.update(trainer.state, record.val_loss)

    def update(self, state, val_loss: float) -> None:
        """Early stopping: count the evaluations since the best validation loss."""
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.evals_since_best = val_loss, 0
            return
        state.evals_since_best += 1
        if self.patience is not None and state.evals_since_best >= self.patience:
            state.stopped_early = True
            log.info(
                "early stopping at step %d: validation loss has not improved on %.4f for %d evaluations",
                state.step,
                state.best_val_loss,
                state.evals_since_best,
            )
