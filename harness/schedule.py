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

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.config import BatchSizes, BatchWarmupConfig, JobConfig, OptimConfig, ScheduleConfig


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

    @classmethod
    def from_config(cls, schedule: ScheduleConfig, optim: OptimConfig, max_steps: int) -> LRSchedule:
        """The schedule of the ``schedule`` section peaking at ``optim.lr`` over ``max_steps`` steps."""
        return cls(
            schedule.name,
            optim.lr,
            schedule.min_lr,
            schedule.warmup_steps,
            max_steps,
            schedule.decay_fraction,
        )

    def __call__(self, step: int) -> float:
        """LR (unit of ``lr``) of optimizer update ``step`` (1-based); step 0: before any update."""
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

    The batch grows from ``start`` to ``full`` in equal increments of ``increment`` sequences
    (``schedule.batch_warmup.increment``: a config value, never derived from the world size, so
    every layout that can run the config sees the same batch sizes), spread evenly over ``steps``
    optimizer steps or ``tokens`` consumed tokens (Megatron-LM's ``--rampup-batch-size <start>
    <increment> <samples>``, which ramps over samples). With ``start`` None the batch is ``full``
    from the first step.
    """

    full: int
    increment: int
    start: int | None = None
    steps: int = 0
    tokens: int | None = None

    @classmethod
    def from_config(cls, warmup: BatchWarmupConfig, batch: BatchSizes) -> BatchRamp:
        """The ramp of ``schedule.batch_warmup``; ``steps=0`` without ``tokens`` is no ramp."""
        start = warmup.start_global_batch_size
        if warmup.steps == 0 and warmup.tokens is None:
            start = None
        increment = warmup.increment or 1  # required with a ramp (config.validate), unused without
        return cls(batch.global_batch_size, increment, start, warmup.steps, warmup.tokens)

    def sizes(self) -> list[int]:
        """Every global batch size of the ramp, ``start`` to ``full`` (``[full]`` without a ramp)."""
        if self.num_increments == 0:
            return [self.full]
        return [self.start + k * self.increment for k in range(self.num_increments)] + [self.full]

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


@dataclass(frozen=True)
class TrainingSchedule:
    """Everything a run's step arithmetic needs, as the trainer, ``harness.plan`` and the tests see it.

    Attributes:
        plan: the optimizer steps over the dataset.
        max_steps: the budget in optimizer steps (``train.max_steps``, or the steps of ``train.max_tokens``).
        lr: the LR at each step.
        config: the ``schedule`` section after :func:`fit_schedule` (warmups no longer than the run).
        warnings: what :func:`fit_schedule` shortened, as one line each.
    """

    plan: IterationPlan
    max_steps: int
    lr: LRSchedule
    config: ScheduleConfig
    warnings: tuple[str, ...] = ()


def fit_schedule(schedule: ScheduleConfig, max_steps: int, budget: str) -> tuple[ScheduleConfig, list[str]]:
    """Shorten warmups that are longer than the run (torchtitan's rule in its LR scheduler), so that a
    short smoke test runs with the default schedule.

    The LR warmup is cut to ``max_steps`` (for ``wsd``: to the steps before the decay), a step-based
    batch ramp to ``max_steps``. Returns the fitted section and one warning per change (``budget``
    names the budget in them, e.g. ``train.max_steps=6``).
    """
    warnings, changes = [], {}
    limit = max_steps
    if schedule.name == "wsd":
        limit = max_steps - round(schedule.decay_fraction * max_steps)
    if schedule.warmup_steps > limit:
        where = f"{budget}" if limit == max_steps else f"the {limit} steps before the wsd decay of {budget}"
        warnings.append(
            f"schedule.warmup_steps={schedule.warmup_steps} > {where}: the LR warmup is shortened to {limit}"
        )
        changes["warmup_steps"] = limit
    bw = schedule.batch_warmup
    if bw.start_global_batch_size is not None and bw.tokens is None and bw.steps > max_steps:
        warnings.append(
            f"schedule.batch_warmup.steps={bw.steps} > {budget}: the batch ramp is shortened to {max_steps}"
        )
        changes["batch_warmup"] = dataclasses.replace(bw, steps=max_steps)
    return dataclasses.replace(schedule, **changes), warnings


def build_schedule(cfg: JobConfig, batch: BatchSizes, num_sequences: int) -> TrainingSchedule:
    """The run's :class:`TrainingSchedule` for ``num_sequences`` training sequences (one arithmetic
    for the trainer and ``harness.plan``).

    Raises:
        ConfigError: a token budget whose batch ramp is still longer than the run after fitting.
    """
    from harness.errors import ConfigError

    def plan_with(schedule: ScheduleConfig) -> tuple[IterationPlan, int]:
        ramp = BatchRamp.from_config(schedule.batch_warmup, batch)
        plan = IterationPlan(
            num_sequences,
            cfg.data.seq_len,
            ramp,
            batch.micro_batch_size,
            batch.world_size,
            cfg.train.drop_last,
        )
        return plan, cfg.train.max_steps or plan.steps_for_tokens(cfg.train.max_tokens)

    plan, max_steps = plan_with(cfg.schedule)
    t = cfg.train
    budget = (
        f"train.max_steps={max_steps}"
        if t.max_tokens is None
        else f"the {max_steps} steps of train.max_tokens={t.max_tokens}"
    )
    fitted, warnings = fit_schedule(cfg.schedule, max_steps, budget)
    if fitted.batch_warmup != cfg.schedule.batch_warmup:
        plan, max_steps = plan_with(fitted)
        if t.max_tokens is not None and fitted.batch_warmup.steps > max_steps:
            raise ConfigError(
                f"schedule.batch_warmup.steps={cfg.schedule.batch_warmup.steps} is longer than the "
                f"{max_steps} steps of train.max_tokens={t.max_tokens}; ramp over "
                "schedule.batch_warmup.tokens instead, or lower it"
            )
        fitted, more = fit_schedule(fitted, max_steps, budget)
        warnings += more
    return TrainingSchedule(
        plan, max_steps, LRSchedule.from_config(fitted, cfg.optim, max_steps), fitted, tuple(warnings)
    )
