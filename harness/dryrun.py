"""``python -m harness.plan ... plan.dry_run=true``: trace one rank's step from the real build path.

For the plan's world size (``plan.gpus``), rank ``r``'s model is built as the trainer builds it --
:func:`harness.model.build_model` on the meta device, the backend's own ``parallelize()`` (tensor
parallelism -> activation checkpointing -> FSDP2 over the mesh of :class:`ParallelDims`) -- under
torch's fake process group (``FakeStore`` + ``init_process_group("fake")``: collectives return at
once) and ``FakeTensorMode`` (tensors have shapes, dtypes and devices but no storage). One optimizer
step is then traced with ``torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker``: the step's
micro-batches as the trainer runs them (``backend.accumulate``, ``harness.parallel.loss.token_loss_sum`` and
``backend.backward``; with accumulation and the reduce-scatter deferred, a first micro-batch whose
unsharded gradients stay held, then the last one), gradient clipping and the optimizer step. The
step traced is a steady-state one: AdamW's moments exist from its start, as from step 2 on.

What differs from a GPU run, and how it is handled here:

* Device. This CPU build of torch cannot make fake CUDA tensors that require gradients (the autograd
  engine asks the CUDA device guard, which is not linked in), so the fake tensors live on ``cpu`` and
  every byte is what the same ops allocate on a GPU. The optimizer is built as on CUDA
  (:func:`harness.parallel.base.build_adamw` with a CUDA device: the fused AdamW, no foreach
  temporaries) and autocast follows ``train.dtype`` as on CUDA.
* Attention. Under ``FakeTensorMode`` on CPU, SDPA dispatches to
  ``aten._scaled_dot_product_flash_attention_for_cpu``, a flash kernel: it keeps the output and a
  ``(batch, heads, seq)`` fp32 log-sum-exp, O(seq) per head like the CUDA flash kernel, never the math
  kernel's ``seq x seq`` scores. The trace runs under ``sdpa_kernel(FLASH_ATTENTION)`` so that the math
  kernel cannot be chosen silently, and counts the kernels it saw (:attr:`DryRun.attention_kernels`).
  ``flash_attention_2`` (CUDA only) is traced as SDPA's flash kernel (same memory).
* Meta -> fake. ``Backend.wrap`` (today) calls ``model.to(device)``; ``nn.Module.to`` cannot swap a
  fake parameter in place (``FakeTensorMode`` holds weak references to it), so the meta model is
  materialized here with ``to_empty`` under ``FakeTensorMode`` and that instance's ``to`` is a no-op
  while the backend parallelizes it (its parameters are already on the device). ``parallelize`` runs
  outside the mode (its parameters stay fake): FSDP2 derives the 2-D (dp_shard, tp) mesh from real
  rank tensors (``nonzero``), which a fake mode cannot compute.
* DTensor's sharding propagation runs each op once more on fake tensors of the *global* shape, under
  the same ``FakeTensorMode``; the tracker would count those as memory (AdamW states of the whole
  model). :class:`_Tracker` skips what is allocated inside that propagation.

Not seen here: the CUDA context, NCCL buffers and the caching allocator's reserve (the planner's
assumed ``CUDA + allocator`` line), and ``torch.compile`` (not applied: it does not change what the
step keeps alive, but it fuses temporaries).
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from harness.errors import ConfigError

GIB = 2**30
TOLERANCE = 0.10  # a category whose traced bytes differ from the planner's by more (relative) is named

# the printed categories: (name, tracker categories, MemoryEstimate attributes)
CATEGORIES = (
    ("parameters", ("Sharded Param",), ("params",)),
    ("gradients", ("Sharded Grad",), ("grads",)),
    ("optimizer states", ("OptState",), ("optimizer",)),
    ("gathered params", ("Unsharded Param", "All Gather"), ("gathered",)),
    ("activations", ("Activation",), ("activations",)),
    ("unsharded grads", ("Unsharded Grad",), ("unsharded_grads",)),
    # backward's temporaries (activation gradients, the fp32 logits' gradient) and reduce-scatter buffers
    ("comm + temporaries", ("Temp", "Reduce Scatter"), ()),
)

_propagating = threading.local()


def _planner_bytes(mem, attrs: tuple[str, ...], checkpointed: bool) -> float | None:
    """The planner's bytes for one printed category (None: the planner has no such figure)."""
    if not attrs:
        return None
    if attrs == ("activations",) and checkpointed:
        return mem.activations_checkpointed
    return float(sum(getattr(mem, a) for a in attrs))


@dataclass
class RankTrace:
    """One rank's traced step (bytes).

    Attributes:
        rank: global rank.
        peak: the step's peak of all tracked tensors.
        at_peak: ``{tracker category: bytes}`` at that peak.
        max_by_category: each tracker category's own maximum over the step.
        seconds: wall time of the build and trace.
        state_bytes: per coordinate of FSDP2's ``dp_shard x cp`` mesh, the bytes of :func:`fsdp_state_bytes`.
        tp: the tensor-parallel degree (global rank = coordinate x tp on replica 0).
    """

    rank: int
    peak: int
    at_peak: dict[str, int]
    max_by_category: dict[str, int]
    seconds: float
    state_bytes: list[int] = field(default_factory=list)
    tp: int = 1


@dataclass
class DryRun:
    """The dry run's result: rank 0's trace, the ranks' bytes of model state and the comparison."""

    world_size: int
    micro_batches_traced: int
    traces: list[RankTrace]
    # rank -> bytes of parameters + optimizer states it holds unpadded (FSDP2 chunks dim 0: the first
    # shards are full, the last may be short), for the ranks named in the printout
    state_bytes: dict[int, int]
    most_bytes_rank: int
    fewest_bytes_rank: int
    attention_kernels: dict[str, int]
    rows: list[dict] = field(default_factory=list)
    # one error line when the traced step does not fit the device (the run would fail there)
    refusal: str | None = None
    warnings: list[str] = field(default_factory=list)


class _PropagationFlag:
    """Marks DTensor's global-shape sharding propagation so that :class:`_Tracker` skips it."""

    def __enter__(self):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self._orig = ShardingPropagator._propagate_tensor_meta_non_cached
        orig = self._orig

        def flagged(prop, *args, **kwargs):
            _propagating.on = True
            try:
                return orig(prop, *args, **kwargs)
            finally:
                _propagating.on = False

        ShardingPropagator._propagate_tensor_meta_non_cached = flagged
        return self

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        ShardingPropagator._propagate_tensor_meta_non_cached = self._orig


def _tracker_class():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    class _Tracker(FSDPMemTracker):
        """FSDPMemTracker that ignores DTensor propagation's global-shape tensors and keeps each
        category's own maximum."""

        max_by_category: dict[str, int]

        def _track(self, reftype, t):
            if not getattr(_propagating, "on", False):
                super()._track(reftype, t)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:  # the attention kernel the dispatcher chose
                self.kernels[func.__name__] = self.kernels.get(func.__name__, 0) + 1
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _update_peak_stats(self, peak_state):
            """torch's ``MemTracker._update_peak_stats``, visiting only the active modules (the
            tracker's ``parents``, a handful) instead of every tracked module on every op: the same
            peaks, without the O(ops x modules) walk that took a third of llama3_70b's trace."""
            from copy import deepcopy

            from torch.distributed._tools.mem_tracker import _TOTAL_KEY

            for stats in self._active_stats():
                if peak_state in stats.snapshots:
                    for dev, dev_snap in self._curr_mem_snap.items():
                        if stats.local_peak.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                            stats.local_peak[dev] = dev_snap[_TOTAL_KEY]
                            stats.snapshots[peak_state][-1][dev] = deepcopy(dev_snap)
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(dev_snap)
            for snap in self._curr_mem_snap.values():
                for k, v in snap.items():
                    key = str(getattr(k, "value", k))
                    if v > self.max_by_category.get(key, 0):
                        self.max_by_category[key] = v

        def _active_stats(self) -> list:
            """The module stats of the modules being run now (``_mod_tracker.parents``, by name)."""
            tracked = self.memory_tracking
            if getattr(self, "_by_fqn_size", None) != len(tracked):
                by_fqn: dict[str, list] = {}
                for stats in tracked.values():
                    by_fqn.setdefault(stats.mod_fqn, []).append(stats)
                self._by_fqn, self._by_fqn_size = by_fqn, len(tracked)
            return [s for fqn in self._mod_tracker.parents for s in self._by_fqn.get(fqn, ())]

    return _Tracker


def _held_grads_as_unsharded(tracker, model: torch.nn.Module) -> None:
    """Between micro-batches: file the unsharded gradients FSDP2 holds for the next micro-batch (made in
    backward, so the tracker counted them as Temp) as Unsharded Grad, and restart the peak and the
    per-category maxima: the last micro-batch holds everything the first did, plus these."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        group = mod._get_fsdp_state()._fsdp_param_group if isinstance(mod, FSDPModule) else None
        for fp in group.fsdp_params if group else ():
            for g in (fp.unsharded_accumulated_grad, getattr(fp.unsharded_param, "grad", None)):
                if g is not None:
                    tracker._update_and_maybe_create_winfos(g, _FSDPRefType.UNSHARDED_GRAD)
    tracker.reset_mod_stats()  # FSDPMemTracker follows one forward per module
    tracker._peak_mem_snap = tracker.get_tracker_snapshot()
    tracker._peak_mem = {d: s["Total"] for d, s in tracker._peak_mem_snap.items()}
    tracker.max_by_category.clear()


def _init_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as after the first step (as ``AdamW._init_group`` makes it for the fused kernel: an
    fp32 step counter on the device and two moments like the parameter), so that the traced step is a
    steady-state one whose forward and backward already hold the moments."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def check_dry_run(cfg) -> None:
    """Refuse what the dry run cannot trace, before anything is built.

    Raises:
        ConfigError: ``parallel`` other than ``fsdp``, ``parallel.cpu_offload=true`` or ``parallel.pp > 1``.
    """
    if cfg.parallel.name != "fsdp":
        raise ConfigError(
            f"plan.dry_run=true traces parallel=fsdp (FSDP2, with parallel.tp); parallel={cfg.parallel.name} "
            "is not traced yet: its memory is the planner's estimate"
        )
    if cfg.parallel.cpu_offload:
        raise ConfigError("plan.dry_run=true does not trace parallel.cpu_offload=true (host memory)")
    if cfg.parallel.pp > 1:
        raise ConfigError(
            f"plan.dry_run=true does not trace parallel.pp={cfg.parallel.pp} (one rank's stages under a "
            "schedule) yet: its memory per stage is the planner's estimate; plan with plan.dry_run=false"
        )


def fsdp_state_bytes(model: torch.nn.Module, dp_shard: int) -> list[int]:
    """Bytes of fp32 parameters + AdamW's two fp32 moments held unpadded by each coordinate of FSDP2's
    ``dp_shard`` ranks (``dp_shard x cp`` under context parallelism; the same for every tp coordinate
    and replica): coordinate ``i`` holds rows ``[i c, (i+1) c)`` of each (tp-local) parameter's dim 0,
    ``c = ceil(rows / dp_shard)``."""
    from torch.distributed.fsdp import FSDPModule

    out = [0] * dp_shard
    seen = set()
    for mod in model.modules():
        if not isinstance(mod, FSDPModule):
            continue
        group = mod._get_fsdp_state()._fsdp_param_group
        for fp in group.fsdp_params if group else ():
            if id(fp) in seen:
                continue
            seen.add(id(fp))
            rows, row_numel = fp._orig_size[0], math.prod(fp._orig_size[1:])
            c = math.ceil(rows / dp_shard)
            for i in range(dp_shard):
                out[i] += max(0, min(c, rows - i * c)) * row_numel * 12
    return out


def _micro_batch(batch: int, seq: int):
    """A ``(batch, seq)`` micro-batch of token 0 (values do not matter to a fake trace)."""
    from harness.data.loader import MicroBatch

    ids = torch.zeros((batch, seq + 1), dtype=torch.long)
    return MicroBatch.from_sequences(ids)


def _build(cfg, vocab: int, rank: int, world_size: int, mode):
    """Rank ``rank``'s backend and parallelized fake model (the fake process group is initialized)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from harness.dist import DistEnv
    from harness.model import build_model
    from harness.parallel import backend_class
    from harness.parallel.dims import ParallelDims
    from harness.weights import to_empty_tied

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    dims = ParallelDims.from_config(cfg.parallel, world_size)
    dims.mesh("cpu")  # DeviceMesh reads its rank map with .tolist(): build it outside FakeTensorMode
    env = DistEnv(rank, rank % 8, world_size, torch.device("cpu"))
    backend = backend_class(cfg.parallel.name)(env, cfg.parallel, dims, comm_timing=False)
    model_cfg = cfg.model
    if model_cfg.attn_implementation == "flash_attention_2":
        model_cfg = replace(model_cfg, attn_implementation="sdpa")  # same memory: SDPA's flash kernel
    model = build_model(model_cfg, vocab, cfg.seed, None, device="meta")
    with mode:
        to_empty_tied(model, "cpu")  # a tied LM head stays the embedding, as in the real build
    # outside the mode: the device meshes FSDP2 derives (tp x dp_shard) are real tensors; the model's
    # tensors are fake and stay so (their ops dispatch to their own mode)
    model.to = lambda *a, **k: model  # already on the (fake) device; see the module docstring
    try:
        backend.parallelize(model, compile_blocks=False)
    finally:
        del model.to
    return backend, dims


def trace_rank(cfg, vocab: int, rank: int, world_size: int, accumulation: int) -> tuple[RankTrace, dict, int]:
    """Build rank ``rank`` and trace one step; returns ``(trace, attention kernels seen, micro-batches)``."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from harness.parallel.base import build_adamw
    from harness.parallel.loss import token_loss_sum
    from harness.trainer import _autocast_dtype

    t0 = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    backend, dims = _build(cfg, vocab, rank, world_size, mode)
    if backend.context is not None:  # cp's attention: a stand-in for its mask under FakeTensorMode
        backend.context.fake_trace = True
    held = accumulation > 1 and not cfg.parallel.reduce_grads_every_micro_batch
    n_micro = 2 if held else 1  # the first (gradients held unsharded) and the last (reduce-scatter)
    kernels: dict[str, int] = {}

    with mode:
        model = backend.model
        optimizer = build_adamw(model, cfg.optim, torch.device("cuda"))  # fused, as on a GPU
        backend.optimizer = optimizer
        autocast = _autocast_dtype(cfg.train.dtype, torch.device("cuda"))
        mbs = [_micro_batch(cfg.train.micro_batch_size or 1, cfg.data.seq_len) for _ in range(n_micro)]
        _init_adamw_state(optimizer)
        tracker = _tracker_class()(model, optimizer)
        tracker.track_external(optimizer)
        tracker.max_by_category = {}
        tracker.kernels = kernels
        tracker.track_inputs(tuple(mb.input_ids for mb in mbs))
        targets = float(sum(mb.labels.numel() for mb in mbs) * dims.dp)
        with warnings.catch_warnings():
            # FSDP2 notes that the fake model returns a view (logits); nothing a user can act on here
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            with _PropagationFlag(), sdpa_kernel(SDPBackend.FLASH_ATTENTION), tracker:
                for i, mb in enumerate(mbs):
                    if i:
                        _held_grads_as_unsharded(tracker, model)
                    with backend.accumulate(is_last=i == n_micro - 1), backend.loss_context():
                        backend.backward(token_loss_sum(model, backend.local_part(mb), autocast) / targets)
                from harness.parallel.norm import clip_grad_norm_

                clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    at_peak = {str(getattr(k, "value", k)): v for k, v in snap.items()}
    peak = at_peak.pop("Total")
    maxima = {k: v for k, v in tracker.max_by_category.items() if k != "Total"}
    seconds = time.perf_counter() - t0
    state = fsdp_state_bytes(model, dims.shard_degree)  # FSDP2's dp_shard x cp coordinates
    trace = RankTrace(rank, peak, at_peak, maxima, seconds, state, dims.tp)
    return trace, kernels, n_micro


def dry_run(cfg, plan) -> DryRun:
    """Trace rank 0's step at ``plan.world_size`` ranks and hold it against ``plan.memory``.

    Rank 0 is a rank holding the most bytes: FSDP2 splits each parameter's dim 0 into
    ``ceil(rows / dp_shard)``-row chunks in rank order, so only the last coordinates can hold fewer
    rows, and tensor parallelism splits evenly (``check_tensor_parallel``); the printout names the
    rank holding the fewest and by how much.

    Raises:
        ConfigError: what :func:`check_dry_run` refuses (the trainer's own checks ran in ``make_plan``).
        A traced peak the device cannot hold is not raised: it is :attr:`DryRun.refusal`
        (:func:`device_refusal`), printed after the figures.
    """
    import torch.distributed as dist

    check_dry_run(cfg)
    vocab = plan.vocab_size
    try:
        trace, kernels, n_micro = trace_rank(cfg, vocab, 0, plan.world_size, plan.gradient_accumulation_steps)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    by_coord = trace.state_bytes
    tp = trace.tp
    most = max(range(len(by_coord)), key=lambda i: (by_coord[i], -i))
    fewest = min(range(len(by_coord)), key=lambda i: (by_coord[i], -i))
    out = DryRun(
        world_size=plan.world_size,
        micro_batches_traced=n_micro,
        traces=[trace],
        state_bytes={most * tp: by_coord[most], fewest * tp: by_coord[fewest]},
        most_bytes_rank=most * tp,
        fewest_bytes_rank=fewest * tp,
        attention_kernels=kernels,
    )
    _compare(out, plan)
    out.refusal = device_refusal(trace.peak, plan.memory, plan.gpu)
    return out


def device_refusal(peak: int, mem, gpu: str) -> str | None:
    """The error line when ``peak`` bytes of traced tensors, plus the planner's assumed allocator reserve
    and CUDA context (:class:`harness.plan.MemoryEstimate`), exceed the device's memory; else None."""
    from harness.plan import ALLOCATOR_RESERVE

    need = peak * (1 + ALLOCATOR_RESERVE) + mem.context
    if not mem.device_memory or need <= mem.device_memory:
        return None
    return (
        f"the dry run's step needs {need / GIB:.1f} GiB on rank 0 ({peak / GIB:.1f} GiB of tensors + "
        f"{ALLOCATOR_RESERVE:.0%} allocator reserve + {mem.context / GIB:.0f} GiB CUDA context) > the "
        f"{gpu}'s {mem.device_memory / GIB:.0f} GiB: the run would fail there"
    )


def _compare(out: DryRun, plan) -> None:
    """Fill ``out.rows`` (per category: traced at the peak, traced maximum, planner) and warnings."""
    trace, mem, ac = out.traces[0], plan.memory, plan.activation_checkpointing
    for name, keys, attrs in CATEGORIES:
        at_peak = sum(trace.at_peak.get(k, 0) for k in keys)
        maximum = sum(trace.max_by_category.get(k, 0) for k in keys)
        planned = _planner_bytes(mem, attrs, ac)
        row = {"category": name, "at_peak": at_peak, "max": maximum, "plan": planned, "diff": None}
        if planned is not None and (planned or maximum):
            row["diff"] = (maximum - planned) / planned if planned else math.inf
            if abs(row["diff"]) > TOLERANCE:
                out.warnings.append(
                    f"{name}: traced {maximum / GIB:.2f} GiB vs planned {planned / GIB:.2f} GiB "
                    f"({row['diff']:+.0%})"
                )
        out.rows.append(row)
    planned_total = mem.tensors(ac)
    out.rows.append(
        {
            "category": "total tensors",
            "at_peak": trace.peak,
            "max": trace.peak,
            "plan": planned_total,
            "diff": (trace.peak - planned_total) / planned_total,
        }
    )
    if abs(out.rows[-1]["diff"]) > TOLERANCE:
        out.warnings.append(
            f"total tensors: traced peak {trace.peak / GIB:.2f} GiB vs planned {planned_total / GIB:.2f} GiB "
            f"({out.rows[-1]['diff']:+.0%})"
        )


def dry_run_dict(out: DryRun, seconds: float) -> dict:
    """The dry run as JSON-ready data (``plan.format=json``): bytes per category for rank 0 (``at_peak``,
    ``max``, ``plan``; ``diff`` relative to the plan), the ranks' state bytes, warnings, refusal."""
    return {
        "world_size": out.world_size,
        "micro_batches_traced": out.micro_batches_traced,
        "rows": [{**r, "diff": None if r["diff"] in (None, math.inf) else r["diff"]} for r in out.rows],
        "state_bytes": {str(k): v for k, v in out.state_bytes.items()},
        "most_bytes_rank": out.most_bytes_rank,
        "fewest_bytes_rank": out.fewest_bytes_rank,
        "attention_kernels": out.attention_kernels,
        "warnings": out.warnings,
        "refusal": out.refusal,
        "seconds": round(seconds, 1),
    }


def render(out: DryRun, plan, seconds: float) -> str:
    """The dry run's printout: the per-category table for rank 0, the ranks' state bytes, warnings."""
    from harness.plan import ALLOCATOR_RESERVE

    m = plan.memory
    lines = [
        f"== Dry run: rank 0 of {out.world_size} (fsdp, "
        + (f"dp_replicate {rep} x " if (rep := out.world_size // (m.shards * m.tp)) > 1 else "")
        + f"dp_shard {m.shards // plan.cp}"
        + (f" x cp {plan.cp}" if plan.cp > 1 else "")
        + (f" x tp {m.tp}" if m.tp > 1 else "")
        + f"; {out.micro_batches_traced} micro-batch(es) of {plan.micro_batch_size} x {plan.seq_len} + "
        "optimizer step, FSDPMemTracker under FakeTensorMode) ==",
        f"{'category':<20} {'traced max':>11} {'at peak':>9} {'plan':>9} {'diff':>7}",
    ]
    for r in out.rows:
        plan_s = f"{r['plan'] / GIB:9.2f}" if r["plan"] is not None else f"{'-':>9}"
        diff = f"{r['diff']:+7.0%}" if r["diff"] is not None and math.isfinite(r["diff"]) else f"{'-':>7}"
        lines.append(f"{r['category']:<20} {r['max'] / GIB:11.2f} {r['at_peak'] / GIB:9.2f} {plan_s} {diff}")
    kernels = ", ".join(f"{k} x{v}" for k, v in sorted(out.attention_kernels.items())) or "none"
    lines += [
        "(GiB; 'traced max': each category's own maximum over the step, compared with the plan; 'at peak': "
        "at the step's peak)",
        f"attention          {kernels} (under sdpa_kernel(FLASH_ATTENTION))",
        f"ranks              rank {out.most_bytes_rank} holds the most parameter + optimizer bytes "
        f"({out.state_bytes[out.most_bytes_rank] / GIB:.3f} GiB); rank {out.fewest_bytes_rank} the fewest "
        f"({out.state_bytes[out.fewest_bytes_rank] / GIB:.3f} GiB)",
        f"not traced         {m.context / GIB:.2f} GiB CUDA context + {ALLOCATOR_RESERVE:.0%} allocator "
        "reserve (the plan's assumptions)",
        f"dry run            {seconds:.1f} s",
    ]
    lines += [f"WARNING: {w}" for w in out.warnings] or ["every category within 10 % of the plan"]
    return "\n".join(lines)
