"""Per-iteration metrics: the typed record, step timers, MFU, and the sinks that format it
(metrics.jsonl, console with progress bar, wandb)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import secrets
import sys
import time
from dataclasses import asdict, dataclass

import torch
import tqdm

# No tqdm monitor thread in training processes (it only repairs bars that stall for 10 s).
tqdm.tqdm.monitor_interval = 0
log = logging.getLogger("harness")
step_log = logging.getLogger(
    "harness.steps"
)  # per-step lines for train.log (the console gets them from tqdm)
step_log.propagate = False
step_log.setLevel(logging.INFO)


@dataclass
class StepMetrics:
    """One optimizer step, as logged (one JSON line per step in ``metrics.jsonl``).

    Units: times in seconds, memory in bytes, ``lr`` in the optimizer's unit, throughput in
    tokens per second (all ranks), ``mfu`` as a fraction of peak (0..1).
    ``step_time_s = data_s + forward_backward_s + optimizer_s`` (communication overlaps the
    compute phases, so ``comm_s`` is a part of them, not an extra term).
    """

    step: int  # completed optimizer steps, from 1
    epoch: float  # fractional epochs completed
    tokens: int  # tokens in this step (all ranks)
    tokens_total: int  # tokens of all steps so far
    loss: float  # token-mean cross-entropy of this step (nats)
    lr: float
    grad_norm: float  # global L2 norm before clipping
    global_batch_size: int  # sequences in this step
    gradient_accumulation_steps: int  # micro-batches per rank in this step
    step_time_s: float
    data_s: float
    forward_backward_s: float
    optimizer_s: float
    comm_s: float  # time in collectives (0 on one process)
    comm_exposed_s: float | None  # part of comm_s not overlapped with compute (None: not measured)
    comm_bytes: int  # bytes moved by this rank's collectives
    comm_busbw_gbps: float | None  # bus bandwidth of those collectives (None: no collectives)
    comm_bytes_by_op: dict | None  # comm_bytes per collective kind
    # per mesh dimension: {dim: {comm_s, comm_bytes, calls, bytes_by_op}} (None: not measured)
    comm_by_dim: dict | None
    tokens_per_second: float
    mfu: float
    max_memory_bytes: int
    elapsed_s: float  # wall time since this process started training
    val_loss: float | None = None  # set on evaluation steps
    skipped_steps: int = 0  # steps so far whose update was skipped (non-finite loss or grad norm)
    events: list[str] | None = None  # e.g. ["loss_spike"], ["skipped_nonfinite"]
    tokens_by_source: dict | None = None  # a mixture's tokens of this step by source (all ranks)
    val_loss_by_source: dict | None = None  # a mixture's validation loss by source, on evaluation steps
    # every logging.rank_stats_every steps on several ranks (rank 0's record; harness/hooks/rank_stats.py),
    # a size that does not grow with the world (the full vectors are in <run>/rank_stats.jsonl):
    # {field: {min, median, max} over the ranks} for step_time_s, busy_s (step_time_s - time waiting on
    # peers), data_s, forward_backward_s, optimizer_s, comm_s
    rank_stats: dict | None = None
    # the 3 ranks with the most busy_s, slowest first: [{rank, busy_s}] (null-padded below 3 ranks)
    slowest_ranks: list[dict] | None = None

    def to_json(self) -> str:
        return json.dumps({k: _clean(v) for k, v in asdict(self).items()})


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


# Dense bf16 tensor-core peak per GPU, FLOP/s (vendor datasheets, without sparsity):
# H100 SXM / H200: 989.4 TFLOP/s (NVIDIA H100 and H200 datasheets); H100 PCIe: 756 TFLOP/s;
# A100: 312 TFLOP/s (NVIDIA A100 datasheet); B200: 2.25 PFLOP/s (NVIDIA DGX B200 datasheet, per GPU).
# name: (peak dense bf16 FLOP/s, memory bytes, source). Datasheet figures "with sparsity" are halved.
GPU_SPECS = {
    "H100": (989.4e12, 80e9, "NVIDIA H100 datasheet, SXM5: 1,979 TFLOPS BF16 with sparsity"),
    "H200": (989.4e12, 141e9, "NVIDIA H200 datasheet, SXM: 1,979 TFLOPS BF16 with sparsity"),
    "A100": (312e12, 80e9, "NVIDIA A100 datasheet, SXM 80GB: 312 TFLOPS BF16 dense"),
    "B200": (2250e12, 180e9, "NVIDIA HGX B200 datasheet: 4.5 PFLOPS FP16/BF16 with sparsity, 180 GB per GPU"),
}
# Looked up by substring of torch.cuda.get_device_name (first match wins, so "H100 PCIe" comes first).
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100 PCIe": 756e12, **{k: v[0] for k, v in GPU_SPECS.items()}}


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from.

    GPUs are looked up in :data:`PEAK_BF16_FLOPS` by name; a CPU (or unknown GPU) gets a
    measured number: the best of :data:`PEAK_MEASUREMENTS` short fp32 ``1024 x 1024`` matmul
    measurements on all its threads (a practical peak rather than a datasheet one; the best of
    several, so that a start-up under load does not give a low peak and an MFU above 100 %).
    ``train.peak_flops_per_device`` overrides both.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16_FLOPS.items():
            if key in name:
                return flops, f"datasheet bf16 peak of {name}"
    best = max(measure_matmul_flops(device, seconds=0.1) for _ in range(PEAK_MEASUREMENTS))
    return best, f"best of {PEAK_MEASUREMENTS} measured fp32 matmuls on {device.type}"


PEAK_MEASUREMENTS = 5


def measure_matmul_flops(device: torch.device, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of repeated ``n x n`` fp32 matmuls (2*n^3 FLOPs each) on ``device`` for about ``seconds``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2.0 * n**3 * iters / (time.perf_counter() - start)


@dataclass(frozen=True)
class Throughput:
    """MFU arithmetic: ``mfu = flops_per_token x tokens_per_second / (peak_flops x world_size)``
    (PaLM, Chowdhery et al. 2022, App. B), with where the peak comes from."""

    flops_per_token: float  # training FLOPs per token (harness.model.model_stats)
    peak_flops: float  # FLOP/s of one device
    peak_source: str
    world_size: int

    @classmethod
    def from_config(cls, train, device: torch.device, flops_per_token: float, world_size: int) -> Throughput:
        """``train.peak_flops_per_device`` when set, else :func:`device_peak_flops` of ``device``."""
        if train.peak_flops_per_device:
            return cls(
                flops_per_token, train.peak_flops_per_device, "train.peak_flops_per_device", world_size
            )
        peak, source = device_peak_flops(device)
        return cls(flops_per_token, peak, source, world_size)

    def mfu(self, tokens_per_second: float) -> float:
        """Model FLOPs utilization (0..1) at ``tokens_per_second`` (all ranks)."""
        return self.flops_per_token * tokens_per_second / (self.peak_flops * self.world_size)


def max_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA ``max_memory_allocated`` on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class StepTimer:
    """Wall-clock phases of a step without a host-device sync per phase.

    On CUDA each ``mark`` records an event and the durations are read once in
    :meth:`durations` (one ``synchronize``); on CPU ``mark`` reads ``perf_counter``.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def start(self) -> None:
        self._marks = []
        self.mark("start")

    def mark(self, name: str) -> None:
        """End the phase ``name`` (the first mark, ``start``, opens the step)."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((name, ev))
        else:
            self._marks.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        """Seconds per phase since the previous mark; ``total`` is the whole step."""
        if self.cuda:
            self._marks[-1][1].synchronize()
            first = self._marks[0][1]
            out = {
                name: prev.elapsed_time(ev) / 1e3
                for (_, prev), (name, ev) in zip(self._marks, self._marks[1:])
            }
            out["total"] = first.elapsed_time(self._marks[-1][1]) / 1e3
            return out
        out = {name: t - prev for (_, prev), (name, t) in zip(self._marks, self._marks[1:])}
        out["total"] = self._marks[-1][1] - self._marks[0][1]
        return out


# ---------------------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------------------


class JsonlSink:
    """Appends one JSON object per step to ``path`` (flushed each line)."""

    name = "metrics.jsonl"

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)

    def write(self, rec: StepMetrics) -> None:
        self.file.write(rec.to_json() + "\n")

    def close(self) -> None:
        self.file.close()

    abandon = close


def format_line(rec: StepMetrics, max_steps: int, shares: dict[str, float] | None = None) -> str:
    """Compact console form of a record (``shares``: a mixture's cumulative token shares by source)."""
    val = f" | val {rec.val_loss:.4f}" if rec.val_loss is not None else ""
    mix = " | mix " + " ".join(f"{n} {100 * v:.1f}%" for n, v in shares.items()) if shares else ""
    return (
        f"step {rec.step}/{max_steps} | loss {rec.loss:.4f}{val} | lr {rec.lr:.2e} | "
        f"gnorm {rec.grad_norm:.3f} | batch {rec.global_batch_size}x{rec.gradient_accumulation_steps}acc | "
        f"tok {rec.tokens:,} "
        f"({rec.tokens_total:,}) | {rec.tokens_per_second:,.0f} tok/s | mfu {100 * rec.mfu:.1f}% | "
        f"{rec.step_time_s:.3f}s (data {rec.data_s:.3f} fwd/bwd {rec.forward_backward_s:.3f} opt "
        f"{rec.optimizer_s:.3f} comm {rec.comm_s:.3f}){mix}"
    )


class ConsoleSink:
    """A tqdm progress bar (step/max_steps, ETA, this step's loss/LR) and a log line every ``every`` steps.

    While the bar is shown, log lines (``checkpoint: ...``, warnings) go through ``tqdm.write``
    (``tqdm.contrib.logging.logging_redirect_tqdm``), so they never share a line with the bar.
    """

    name = "console"

    def __init__(self, max_steps: int, start_step: int, every: int, progress: str):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.max_steps, self.every = max_steps, every
        disable = {"on": False, "off": True}.get(progress, not sys.stderr.isatty())
        self.bar = tqdm(
            total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=disable, leave=True
        )
        self._redirect = None
        if not disable:
            self._redirect = logging_redirect_tqdm(loggers=[logging.root, log])
            self._redirect.__enter__()
        self.first = True
        self.by_source: dict[str, int] = {}  # this invocation's tokens by source (a mixture's shares)

    def write(self, rec: StepMetrics) -> None:
        self.bar.set_postfix(
            loss=f"{rec.loss:.4f}", lr=f"{rec.lr:.2e}", tok_s=f"{rec.tokens_per_second:,.0f}", refresh=False
        )
        self.bar.update(1)  # redraws with this step's postfix
        for name, n in (rec.tokens_by_source or {}).items():
            self.by_source[name] = self.by_source.get(name, 0) + n
        if self.first or rec.step % self.every == 0 or rec.step == self.max_steps or rec.val_loss is not None:
            total = sum(self.by_source.values())
            shares = {n: v / total for n, v in self.by_source.items()} if total else None
            line = format_line(rec, self.max_steps, shares)
            self.bar.write(line, file=sys.stdout)
            step_log.info(line)
        self.first = False

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        self.bar.close()

    abandon = close


def wandb_mode(mode: str) -> str:
    """The wandb mode for ``logging.wandb.mode``: ``auto`` honours ``$WANDB_MODE`` when it is set
    (wandb's own convention), else online with ``$WANDB_API_KEY``, else offline."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_data(rec: StepMetrics) -> dict:
    """The wandb row of a record: its non-null fields but ``step``, with ``rank_stats`` and
    ``slowest_ranks`` as scalar keys ``rank_stats/<field>/<min|median|max>`` and
    ``slowest_ranks/<i>/<rank|busy_s>`` (``i`` from 0, slowest first; padding left out)."""
    data = {
        k: v
        for k, v in asdict(rec).items()
        if v is not None and k not in ("step", "rank_stats", "slowest_ranks")
    }
    for field, stats in (rec.rank_stats or {}).items():
        data.update({f"rank_stats/{field}/{k}": v for k, v in stats.items()})
    for i, entry in enumerate(rec.slowest_ranks or []):
        data.update({f"slowest_ranks/{i}/{k}": v for k, v in entry.items() if v is not None})
    return data


class WandbSink:
    """Logs each record to Weights & Biases (``mode`` online or offline, see :func:`wandb_mode`).

    The run id is kept in ``<run_dir>/wandb_id`` so a resumed run continues the same wandb run.
    Its ``wandb-core`` process can die before the trainer (``scancel`` signals every process of the
    job): :class:`MetricsLogger` then drops the sink and calls :meth:`abandon`.
    """

    name = "wandb"

    def __init__(
        self, mode: str, project: str, entity: str | None, name: str | None, run_dir: str, config: dict
    ):
        import wandb

        id_path = os.path.join(run_dir, "wandb_id")
        if os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(6)
            with open(id_path, "w") as f:
                f.write(run_id)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            dir=run_dir,
            mode=mode,
            id=run_id,
            resume="allow",
            config=config,
            settings=wandb.Settings(silent=True),
        )

    def write(self, rec: StepMetrics) -> None:
        self.run.log(wandb_data(rec), step=rec.step)

    def close(self) -> None:
        self.run.finish()

    def abandon(self) -> None:
        """After a failure: tear wandb's service connection down now (it raises when ``wandb-core`` is
        gone), so that wandb's exit hook does not print a traceback at exit."""
        import wandb

        wandb.teardown()


class MetricsLogger:
    """Fans a :class:`StepMetrics` out to its sinks (rank 0 only; other ranks get no sinks).

    A sink whose ``write`` or ``close`` raises (wandb after its ``wandb-core`` process died, a full
    disk, ...) is dropped with one warning naming it and the exception; the run, its stop checkpoint
    and the other sinks go on without it. A sink has ``name``, ``write(record)``, ``close()`` and
    optionally ``abandon()`` (release what it holds after a failure; its errors are ignored).
    """

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def from_config(
        cls, cfg, run_dir: str, max_steps: int, start_step: int, run_name: str, config: dict
    ) -> MetricsLogger:
        """Rank 0's sinks for the ``logging`` section: ``metrics.jsonl`` (cut back to ``start_step``:
        a resumed run logs the later steps again, identically), the console, and wandb unless its
        mode resolves to ``disabled`` (then no wandb process starts)."""
        path = os.path.join(run_dir, "metrics.jsonl")
        truncate_metrics(path, start_step)
        console = ConsoleSink(max_steps, start_step, cfg.every, cfg.progress)
        console.by_source = tokens_by_source_so_far(path)  # cumulative shares continue across a resume
        sinks = [JsonlSink(path), console]
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            w = cfg.wandb
            sinks.append(WandbSink(mode, w.project, w.entity, w.name or run_name, run_dir, config))
        return cls(sinks)

    def write(self, rec: StepMetrics) -> None:
        for sink in list(self.sinks):
            self._call(sink, f"step {rec.step}", sink.write, rec)

    def close(self) -> None:
        for sink in list(self.sinks):
            self._call(sink, "closing", sink.close)
        self.sinks = []

    def _call(self, sink, when: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:
            self.sinks.remove(sink)
            log.warning(
                "metrics sink %s failed (%s, %s: %s); training goes on without it",
                sink.name,
                when,
                type(e).__name__,
                " ".join(str(e).split())[:200],
            )
            abandon = getattr(sink, "abandon", None)
            if abandon is not None:
                with contextlib.suppress(Exception, SystemExit):
                    abandon()


def truncate_metrics(path: str, step: int) -> None:
    """Drop the lines of steps after ``step`` from ``metrics.jsonl`` (atomically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def tokens_by_source_so_far(path: str) -> dict[str, int]:
    """The sum of ``tokens_by_source`` over the records of ``metrics.jsonl`` (empty without a mixture)."""
    out: dict[str, int] = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                for name, n in (json.loads(line).get("tokens_by_source") or {}).items():
                    out[name] = out.get(name, 0) + n
            except (ValueError, AttributeError):
                continue
    return out
