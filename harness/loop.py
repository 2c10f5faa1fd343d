"""The training loop. One iteration = one optimizer step over K accumulated micro-batches:

1. sample    this rank's micro-batches of the planned step (sizes from the batch ramp)
2. forward   per micro-batch: summed token cross-entropy / target tokens of the whole step
3. backward  per micro-batch; gradients synchronized only on the last one
4. update    clip by global norm, optimizer step, LR scheduler step, zero grads -- once
5. log       one StepMetrics record; then evaluation and checkpoint when due
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from harness import faults
from harness.data import IGNORE_INDEX, MicroBatch, StepLoader
from harness.data.loader import PrefetchLoader
from harness.errors import NonFiniteError
from harness.metrics import MetricsLogger, StepMetrics, StepTimer, max_memory_bytes
from harness.parallel import Backend
from harness.schedule import DataPosition, IterationPlan, StepInfo

log = logging.getLogger("harness")


@dataclass
class TrainState:
    """What a checkpoint must restore to continue the same run (besides model/optimizer/RNG)."""

    step: int = 0  # completed optimizer steps
    tokens_total: int = 0
    position: DataPosition = field(default_factory=DataPosition)  # data position before the next step
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0  # steps whose update was skipped (train.nonfinite=skip)
    consecutive_skips: int = 0
    stop_signal: str | None = None  # this invocation ended on SIGUSR1/SIGTERM ("preempt") or SIGINT
    # ("interrupt") after a checkpoint (not saved: a rerun continues)

    @property
    def preempted(self) -> bool:
        return self.stop_signal == "preempt"

    def to_dict(self) -> dict:
        return {"step": self.step, "tokens_total": self.tokens_total, "epoch": self.position.epoch,
                "offset": self.position.offset, "best_val_loss": _json_float(self.best_val_loss),
                "evals_since_best": self.evals_since_best, "stopped_early": self.stopped_early,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        best = d.get("best_val_loss")
        return cls(d["step"], d["tokens_total"], DataPosition(d["epoch"], d["offset"]),
                   math.inf if best is None else float(best), d.get("evals_since_best", 0),
                   d.get("stopped_early", False), d.get("skipped_steps", 0), d.get("consecutive_skips", 0))  # fmt: skip


def _json_float(x: float):
    return None if not math.isfinite(x) else x


class StopSignal:
    """SIGUSR1 / SIGTERM (Slurm's warning before the time limit, preemption, torchrun forwarding a
    SIGTERM) and SIGINT (Ctrl-C) ask the loop to finish the current optimizer step, checkpoint and
    return. A second Ctrl-C interrupts at once (``KeyboardInterrupt``).

    Use as a context manager around the loop; the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.signum is None:
                self.signum = signum
            return
        if self.signum is None:
            self.signum = signum

    def requested(self, backend: Backend) -> str | None:
        """``"preempt"`` (SIGUSR1/SIGTERM) or ``"interrupt"`` (SIGINT) when any rank got a signal, else None;
        all ranks agree, so they stop at the same step (a SIGINT anywhere wins).

        One process reads the flag; several all-reduce it (one tiny collective per step).
        """
        local = [float(self.signum in (signal.SIGUSR1, signal.SIGTERM)), float(self.signum == signal.SIGINT)]
        if backend.env.world_size > 1:
            flags = backend.all_reduce_sum(torch.tensor(local, device=backend.env.device)).tolist()
        else:
            flags = local
        if flags[1] > 0:
            return "interrupt"
        return "preempt" if flags[0] > 0 else None


@dataclass
class LoopParts:
    """Everything the loop uses, built by ``harness.train``."""

    backend: Backend
    model: torch.nn.Module  # the module to call forward on (possibly wrapped)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: StepLoader | PrefetchLoader
    val_batches: list[MicroBatch]
    plan: IterationPlan
    max_steps: int
    grad_clip: float
    eval_every: int
    patience: int | None
    checkpoint_every: int
    stop_at_step: int | None  # end this invocation after this step (checkpointed), schedule unchanged
    flops_per_token: float  # training FLOPs per token (model.model_stats)
    peak_flops: float  # FLOP/s of one device
    autocast_dtype: torch.dtype | None  # bf16 autocast on GPU, None for fp32
    metrics: MetricsLogger
    save_checkpoint: Callable[[TrainState], None]
    stop_signal: StopSignal | None = None
    nonfinite: str = "skip"  # skip | abort (train.nonfinite)
    max_consecutive_skips: int = 5
    spike_factor: float = 3.0  # loss-spike event when loss > spike_factor x running median (0: off)
    spike_window: int = 50
    peak_source: str = ""  # where peak_flops comes from (named when MFU exceeds 100 %)
    mfu_warned: bool = False


def token_loss_sum(
    model: torch.nn.Module, mb: MicroBatch, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over ``mb``'s target tokens, in fp32 (0-d tensor).

    Positions whose label is ``IGNORE_INDEX`` contribute nothing.
    """
    device_type = mb.input_ids.device.type
    ctx = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        logits = model(input_ids=mb.input_ids).logits
    return F.cross_entropy(
        logits.float().flatten(0, 1), mb.labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def forward_backward(parts: LoopParts, micro_batches: list[MicroBatch], step: int = 0) -> torch.Tensor:
    """Accumulate the gradient of the step's token-mean loss; returns that loss (0-d, detached).

    Every micro-batch's summed loss is divided by the number of target tokens in the whole
    step (all micro-batches, all ranks), so K micro-batches of B give exactly the gradient of
    one batch of K*B -- not a mean of per-micro-batch means.
    """
    backend = parts.backend
    num_targets = backend.all_reduce_sum(torch.stack([mb.num_targets() for mb in micro_batches]).sum())
    total = torch.zeros((), device=micro_batches[0].input_ids.device)
    for i, mb in enumerate(micro_batches):
        with backend.accumulate(is_last=i == len(micro_batches) - 1):
            loss = token_loss_sum(parts.model, mb, parts.autocast_dtype) / num_targets
            if i == 0 and faults.nan_loss(step):
                loss = loss * float("nan")
            backend.backward(loss)
        total += loss.detach()
    return backend.all_reduce_sum(total)


@torch.no_grad()
def evaluate(parts: LoopParts) -> float:
    """Token-mean validation loss (nats) over the fixed validation micro-batches, all ranks."""
    parts.model.eval()
    device = parts.backend.env.device
    loss_sum = torch.zeros((), device=device)
    targets = torch.zeros((), device=device, dtype=torch.long)
    for mb in parts.val_batches:
        mb = mb.to(device)
        loss_sum += token_loss_sum(parts.model, mb, parts.autocast_dtype)
        targets += mb.num_targets()
    parts.model.train()
    loss_sum = parts.backend.all_reduce_sum(loss_sum)
    targets = parts.backend.all_reduce_sum(targets)
    return (loss_sum / targets.clamp(min=1)).item()


def train(parts: LoopParts, state: TrainState) -> TrainState:
    """Run optimizer steps from ``state`` until ``parts.max_steps`` (or early stopping)."""
    backend, device = parts.backend, parts.backend.env.device
    timer = StepTimer(device)
    recent: collections.deque[float] = collections.deque(maxlen=parts.spike_window)  # finite losses
    started = time.perf_counter()
    parts.model.train()
    for info in parts.plan.steps(state.step, state.position, state.tokens_total):
        if info.step > parts.max_steps or state.stopped_early:
            break
        faults.on_step(info.step)
        timer.start()
        backend.begin_step()
        # 1. sample
        micro_batches = [mb.to(device, non_blocking=True) for mb in parts.loader.micro_batches(info)]
        timer.mark("data")
        # 2 + 3. forward and backward over the accumulated micro-batches
        loss = forward_backward(parts, micro_batches, info.step)
        timer.mark("forward_backward")
        # 4. update, once per step (skipped, on every rank alike, when the loss or grad norm is not finite)
        lr = parts.scheduler.get_last_lr()[0]
        grad_norm, stepped = backend.clip_and_step(
            parts.grad_clip, loss
        )  # clip by global norm, step, zero grads
        if not stepped:
            state = _nonfinite(parts, state, info.step, loss, grad_norm)
        parts.scheduler.step()
        timer.mark("optimizer")
        # 5. log
        state = replace(state, step=info.step, tokens_total=info.tokens_total,
                        position=info.end_position(parts.plan.num_sequences),
                        consecutive_skips=0 if stepped else state.consecutive_skips)  # fmt: skip
        record = _record(parts, info, timer.durations(), loss, grad_norm, lr, time.perf_counter() - started)
        record.skipped_steps = state.skipped_steps
        record.events = _events(parts, record, stepped, recent)
        if (
            parts.eval_every
            and parts.val_batches
            and (info.step % parts.eval_every == 0 or info.step == parts.max_steps)
        ):
            record.val_loss = evaluate(parts)
            state = _early_stopping(parts, state, record.val_loss)
        parts.metrics.write(record)
        signalled = parts.stop_signal.requested(backend) if parts.stop_signal is not None else None
        stop = info.step == parts.stop_at_step or signalled is not None
        last = info.step == parts.max_steps or state.stopped_early or stop
        if last or (parts.checkpoint_every and info.step % parts.checkpoint_every == 0):
            parts.save_checkpoint(state)
        if stop:
            reason = {"preempt": "a stop signal (SIGUSR1/SIGTERM)", "interrupt": "Ctrl-C (SIGINT)"}
            log.info(
                "stopping after step %d on %s; rerun with checkpoint.resume=auto to continue",
                info.step,
                reason.get(signalled, "train.stop_at_step"),
            )
            state = replace(state, stop_signal=signalled)
            break
    return state


def _nonfinite(parts: LoopParts, state: TrainState, step: int, loss: torch.Tensor,
               grad_norm: torch.Tensor) -> TrainState:  # fmt: skip
    """A step whose loss or gradient norm is not finite: count it as skipped, or abort (nothing saved)."""
    what = f"step {step}: non-finite loss {loss.item():.4g} / grad norm {grad_norm.item():.4g}"
    if parts.nonfinite == "abort":
        raise NonFiniteError(
            f"{what}; train.nonfinite=abort: stopping without saving (rerun with "
            "checkpoint.resume=auto to continue from the newest checkpoint, or set train.nonfinite=skip)"
        )
    state = replace(
        state, skipped_steps=state.skipped_steps + 1, consecutive_skips=state.consecutive_skips + 1
    )
    log.warning("%s: update skipped (%d skipped so far)", what, state.skipped_steps)
    if state.consecutive_skips >= parts.max_consecutive_skips:
        raise NonFiniteError(f"{what}; {state.consecutive_skips} steps in a row were non-finite "
                             f"(train.max_consecutive_skips={parts.max_consecutive_skips}): stopping without saving; "
                             "lower optim.lr or check the data, then rerun with checkpoint.resume=auto")  # fmt: skip
    return state


def _events(
    parts: LoopParts, record: StepMetrics, stepped: bool, recent: collections.deque
) -> list[str] | None:
    """``skipped_nonfinite`` and ``loss_spike`` (loss > spike_factor x median of the last spike_window losses)."""
    events = [] if stepped else ["skipped_nonfinite"]
    if record.mfu > 1.0 and not parts.mfu_warned:
        parts.mfu_warned = True
        log.warning("step %d: MFU %.0f%% is above 100%%: the peak used, %.3g FLOP/s per device (%s), is too low; "
                    "set train.peak_flops_per_device", record.step, 100 * record.mfu, parts.peak_flops,
                    parts.peak_source)  # fmt: skip
    if math.isfinite(record.loss):
        if parts.spike_factor and len(recent) >= min(10, parts.spike_window):
            median = statistics.median(recent)
            if record.loss > parts.spike_factor * median:
                events.append("loss_spike")
                log.warning("step %d: loss spike %.4f > %.3g x running median %.4f", record.step, record.loss,
                            parts.spike_factor, median)  # fmt: skip
        recent.append(record.loss)
    return events or None


def _early_stopping(parts: LoopParts, state: TrainState, val_loss: float) -> TrainState:
    if val_loss < state.best_val_loss:
        return replace(state, best_val_loss=val_loss, evals_since_best=0)
    waited = state.evals_since_best + 1
    stop = parts.patience is not None and waited >= parts.patience
    if stop:
        log.info("early stopping at step %d: validation loss has not improved on %.4f for %d evaluations",
                 state.step, state.best_val_loss, waited)  # fmt: skip
    return replace(state, evals_since_best=waited, stopped_early=stop)


def _record(parts: LoopParts, info: StepInfo, t: dict, loss: torch.Tensor, grad_norm: torch.Tensor,
            lr: float, elapsed: float) -> StepMetrics:  # fmt: skip
    comm = parts.backend.comm_stats()
    tokens_per_second = info.tokens / t["total"]
    world = parts.backend.env.world_size
    return StepMetrics(
        step=info.step, epoch=info.epoch, tokens=info.tokens, tokens_total=info.tokens_total,
        loss=loss.item(), lr=lr, grad_norm=grad_norm.item(),
        global_batch_size=info.global_batch_size, gradient_accumulation_steps=info.gradient_accumulation_steps,
        step_time_s=t["total"], data_s=t["data"], forward_backward_s=t["forward_backward"], optimizer_s=t["optimizer"],
        comm_s=comm.comm_s, comm_exposed_s=comm.comm_exposed_s, comm_bytes=comm.comm_bytes,
        comm_busbw_gbps=comm.busbw_gbps, comm_bytes_by_op=comm.bytes_by_op, tokens_per_second=tokens_per_second,
        mfu=parts.flops_per_token * tokens_per_second / (parts.peak_flops * world),
        max_memory_bytes=max_memory_bytes(parts.backend.env.device), elapsed_s=elapsed,
    )  # fmt: skip
