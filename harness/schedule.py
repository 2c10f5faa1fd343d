"""Iteration arithmetic, in one place: LR at a step, batch size at a step, the sequence of
optimizer steps over a dataset (epochs, partial batches, tokens) and steps from a token budget.

Everything here is a pure function of its arguments, so the trainer, the tests and any
planning tool compute the same numbers.

Conventions:
    * ``step`` counts completed optimizer steps; the first update is step 1. The LR used by
      update ``s`` is ``lr_at(s)``; ``lr_at(0)`` is the value before any update.
    * Batch sizes are in sequences of ``seq_len`` tokens; a step's tokens are its sequences
      times ``seq_len`` (packed data has no padding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate as a function of the optimizer step.

    * ``cosine``: linear warmup from 0 to ``lr`` over ``warmup_steps`` updates, then a
      half-cosine to ``min_lr`` reached exactly at ``max_steps`` (Loshchilov & Hutter 2017,
      SGDR; the warmup+cosine form used by GPT-3, Brown et al. 2020, and Chinchilla).
    * ``constant``: the same warmup, then ``lr``.
    * ``wsd``: warmup, stable at ``lr``, then linear decay to ``min_lr`` over the last
      ``decay_fraction * max_steps`` steps (warmup-stable-decay, Hu et al. 2024, MiniCPM).
    """

    name: str
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    decay_fraction: float = 0.2

    def __call__(self, step: int) -> float:
        """LR (same unit as ``lr``) used by optimizer update number ``step`` (1-based); step 0 -> before any."""
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.name == "constant":
            return self.lr
        if self.name == "cosine":
            span = self.max_steps - self.warmup_steps
            progress = 1.0 if span <= 0 else min(1.0, max(0.0, (step - self.warmup_steps) / span))
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.name == "wsd":
            decay_steps = round(self.decay_fraction * self.max_steps)
            decay_start = self.max_steps - decay_steps
            if step <= decay_start or decay_steps == 0:
                return self.lr
            progress = min(1.0, (step - decay_start) / decay_steps)
            return self.lr + (self.min_lr - self.lr) * progress
        raise ValueError(f"unknown schedule {self.name!r}")

    def torch_lambda(self, step_index: int) -> float:
        """Multiplier for ``torch.optim.lr_scheduler.LambdaLR``: its counter starts at 0 before update 1."""
        return self(step_index + 1) / self.lr


@dataclass(frozen=True)
class BatchRamp:
    """Global batch size (sequences) as a function of progress: batch-size warmup.

    The batch grows from ``start`` to ``full`` in equal increments of ``increment``
    (``micro_batch_size * world_size``, so every step has a whole number of micro-batches
    per rank), spread evenly over ``steps`` optimizer steps or ``tokens`` consumed tokens
    (the token form follows Megatron-LM's ``--rampup-batch-size``, which ramps over samples).
    With ``start`` None the batch is ``full`` from the first step.
    """

    full: int
    increment: int
    start: int | None = None
    steps: int = 0
    tokens: int | None = None

    @property
    def num_increments(self) -> int:
        return 0 if self.start is None else (self.full - self.start) // self.increment

    def at(self, step: int, tokens_before: int = 0) -> int:
        """Global batch size (sequences) of update ``step`` (1-based), given tokens consumed before it."""
        n = self.num_increments
        if n == 0:
            return self.full
        if self.tokens is not None:
            done = tokens_before / self.tokens
        elif self.steps > 0:
            done = (step - 1) / self.steps
        else:
            return self.full
        # Stage k (start + k*increment) lasts 1/n of the ramp; full size from the ramp's end on.
        return min(self.full, self.start + self.increment * math.floor(done * n + 1e-9))

    def end_step(self) -> int:
        """The first step that runs at full size when the ramp is step-based (1 when there is no ramp)."""
        if self.num_increments == 0 or self.tokens is not None:
            return 1
        return self.steps + 1


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands before a step: ``epoch`` and ``offset`` into its permutation."""

    epoch: int = 0
    offset: int = 0


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step of the iteration plan.

    Attributes:
        step: 1-based index of this optimizer step.
        position: data position at the start of the step (epoch, offset in that epoch).
        global_batch_size: sequences in this step (all ranks; short at an epoch's end
            when ``drop_last`` is False).
        gradient_accumulation_steps: micro-batches per rank in this step.
        tokens: tokens in this step (``global_batch_size * seq_len``).
        tokens_total: tokens of all steps up to and including this one.
        epoch: fractional epochs completed after this step.
    """

    step: int
    position: DataPosition
    global_batch_size: int
    gradient_accumulation_steps: int
    tokens: int
    tokens_total: int
    epoch: float

    def end_position(self, num_sequences: int) -> DataPosition:
        """Data position after this step."""
        offset = self.position.offset + self.global_batch_size
        if offset >= num_sequences:
            return DataPosition(self.position.epoch + 1, 0)
        return DataPosition(self.position.epoch, offset)


@dataclass(frozen=True)
class IterationPlan:
    """The sequence of optimizer steps over a dataset of ``num_sequences`` packed sequences.

    Each epoch visits every sequence once (in a seeded permutation chosen by the data
    loader). A step takes ``ramp.at(step)`` sequences from the current epoch; when fewer
    remain, the step is short (``drop_last=False``: iterations per epoch = ceil(N / B); at
    ``world_size`` W > 1 the short step is cut to a multiple of W so every rank gets the same
    micro-batch shapes, and a remainder below W is skipped)
    or the remainder is skipped (``drop_last=True``: floor(N / B)).
    """

    num_sequences: int
    seq_len: int
    ramp: BatchRamp
    micro_batch_size: int
    world_size: int = 1
    drop_last: bool = False

    def steps(
        self, start_step: int = 0, position: DataPosition | None = None, tokens_total: int = 0
    ) -> Iterator[StepInfo]:
        """Yield the steps after ``start_step`` forever, from a data position and token count.

        With ``position`` None the plan is replayed from step 1 up to ``start_step`` first,
        so a resumed run can pass only the step (the checkpoint also stores the position).
        """
        if position is None:
            position = DataPosition()
            tokens_total = 0
            if start_step > 0:
                for info in self.steps():
                    position, tokens_total = info.end_position(self.num_sequences), info.tokens_total
                    if info.step == start_step:
                        break
        n = self.num_sequences
        step = start_step
        while True:
            step += 1
            want = self.ramp.at(step, tokens_total)
            remaining = n - position.offset
            if remaining < want and not self.drop_last and self.world_size > 1:
                # a short last batch is cut to a multiple of world_size, so every rank gets the same shapes
                remaining -= remaining % self.world_size
            if remaining < want and (self.drop_last or remaining == 0):
                position = DataPosition(position.epoch + 1, 0)
                remaining = n
            size = min(want, remaining)
            per_micro = self.micro_batch_size * self.world_size
            tokens = size * self.seq_len
            tokens_total += tokens
            end = position.offset + size
            epoch = position.epoch + end / n
            info = StepInfo(step, position, size, math.ceil(size / per_micro), tokens, tokens_total, epoch)
            yield info
            position = info.end_position(n)

    def iterations_per_epoch(self) -> int:
        """Steps per epoch at full batch size: ceil(N / B), or floor(N / B) with ``drop_last``."""
        b = self.ramp.full
        return self.num_sequences // b if self.drop_last else math.ceil(self.num_sequences / b)

    def steps_for_tokens(self, max_tokens: int) -> int:
        """The first step at which ``tokens_total >= max_tokens`` (a token budget as a step count)."""
        for info in self.steps():
            if info.tokens_total >= max_tokens:
                return info.step
        raise AssertionError("unreachable")

    def total_tokens(
        self, max_steps: int, start_step: int = 0, position: DataPosition | None = None, tokens_total: int = 0
    ) -> int:
        """Tokens consumed by steps 1..max_steps (the batch-size ramp counted step by step); from a
        resume point (``start_step`` with its data ``position`` and ``tokens_total``) when given, whose
        steps may have run at another world size."""
        if start_step >= max_steps:
            return tokens_total
        for info in self.steps(start_step, position, tokens_total):
            if info.step == max_steps:
                return info.tokens_total
        raise AssertionError("unreachable")
