"""Validation every ``eval.every`` steps (and at the last step) and early stopping (``eval.patience``)."""

from __future__ import annotations

import logging

from harness import phases
from harness.data import validation_batches
from harness.hooks.base import Hook

log = logging.getLogger("harness")


class EvalHook(Hook):
    """Fills ``record.val_loss`` on evaluation steps (token-mean loss over a fixed set of validation
    micro-batches, all ranks; for a mixture also ``record.val_loss_by_source``, one validation split
    per source, and ``val_loss`` over all of them) and stops the run after ``patience`` evaluations
    without improvement."""

    def __init__(self, every: int, patience: int | None, batches: dict[str, list]):
        self.every, self.patience, self.batches = every, patience, batches

    @classmethod
    def from_config(cls, cfg, data, batch, dp: tuple[int, int], eos_id=None) -> EvalHook:
        """The ``eval`` section over this data-parallel rank's share (``dp = (rank, ranks)``) of each
        source's first ``eval.batches`` global batches (``batch.global_batch_size`` sequences each, as
        Megatron's ``--eval-iters``) of held-out sequences, in micro-batches of ``batch.micro_batch_size``
        per rank: the same set at every layout."""
        splits = (
            data.val_by_source if data.is_mixture else ({"data": data.val} if data.val is not None else {})
        )
        batches = {}
        if cfg.every and splits:
            for name, seqs in splits.items():
                n = cfg.batches * batch.global_batch_size
                batches[name] = validation_batches(seqs, n, batch.micro_batch_size, *dp, eos_id)
        return cls(cfg.every, cfg.patience, batches)

    def due(self, step: int, max_steps: int) -> bool:
        return bool(self.every and self.batches and (step % self.every == 0 or step == max_steps))

    def on_step_end(self, trainer, record) -> None:
        if not self.due(record.step, trainer.max_steps):
            return
        with phases.phase("eval"):  # the hang watchdog's hang_timeout_eval_s, until the values are here
            sums = {name: trainer.evaluate_sums(batches) for name, batches in self.batches.items()}
            loss = sum(s for s, _ in sums.values())  # 0-d tensors: one source gives exactly its own ratio
            targets = sum(t for _, t in sums.values())
            record.val_loss = (loss / targets.clamp(min=1)).item()
            if "data" not in sums:
                record.val_loss_by_source = {
                    name: (s / t.clamp(min=1)).item() for name, (s, t) in sums.items()
                }
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
