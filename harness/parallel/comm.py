"""Per-iteration communication accounting that sees every backend's collectives unmodified.

Mechanism: :func:`install` wraps the ``torch.distributed`` collective functions (the module
attributes that FSDP2, DDP comm hooks and DeepSpeed call; DeepSpeed copies its references
when ``deepspeed.init_distributed`` runs, so the wrapper is installed before that) and
``Work.wait``. Each call records its payload bytes and times; nothing is synchronized per
collective:

* CPU / gloo: an async collective's interval runs from its issue to the completion callback
  of its future (gloo runs it on its own thread); a synchronous one from call to return.
  ``comm_s`` is the length of the union of the intervals of the step, ``comm_exposed_s``
  the time the training thread was blocked: inside synchronous collectives or ``Work.wait``.
* CUDA / NCCL: with ``TORCH_NCCL_ENABLE_TIMING=1`` (set by ``harness.dist`` before the process
  group exists) each ``Work`` carries CUDA start/end events; the GPU durations are read once at
  the end of the step, after the step's single synchronization. ``comm_exposed_s`` is None
  there (overlap with kernels on other streams needs the profiler).

DTensor (tensor parallelism) issues functional collectives (``torch.distributed._functional_collectives``:
``all_reduce``, ``all_gather_single``/``all_gather_tensor``, ``reduce_scatter_single``/``..._tensor``,
``all_to_all_single``, which run ``torch.ops._c10d_functional`` kernels without passing through the
functions above); :func:`install` wraps those module functions too. Each one is waited on at once
(DTensor uses the result in its next op anyway): on CPU the call is synchronous and timed as such; on
CUDA the wait only orders the streams, and the interval is read from CUDA events around it. Calls
inside ``torch.compile``'d regions are not seen.

Every call is attributed to the mesh dimension of its process group (``CommTracker.group_dims``,
filled by the backend from :meth:`ParallelDims.group_dims`), so a step's record splits ``comm_s`` and
``comm_bytes`` by dimension (``tp``, ``dp_shard``, ``dp_replicate``, ``dp`` for the flattened
data-parallel group, ``world`` for the default group when no dimension spans the world). A group
created outside the mesh (DeepSpeed's copy of the world group for ZeRO's gradient reduction) is
labelled by the ranks it spans (``CommTracker.rank_dims``, from :meth:`ParallelDims.rank_dims`).

Bytes follow nccl-tests' "size": the tensor for all-reduce/broadcast, the gathered output for
all-gather, the input for reduce-scatter. Bus bandwidth = bytes x factor / time with factor
2(n-1)/n for all-reduce and (n-1)/n for all-gather, reduce-scatter and all-to-all
(nccl-tests, doc/PERFORMANCE.md).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# function name -> (kind, index of the tensor whose size is the payload, or "list" for a tensor list)
_OPS = {
    "all_reduce": ("all_reduce", 0),
    "all_gather_into_tensor": ("all_gather", 0),
    "all_gather_single": ("all_gather", 0),
    "_all_gather_base": ("all_gather", 0),
    "reduce_scatter_tensor": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1),
    "all_gather": ("all_gather", "list0"),
    "reduce_scatter": ("reduce_scatter", "list1"),
    "broadcast": ("broadcast", 0),
    "reduce": ("reduce", 0),
    "all_to_all_single": ("all_to_all", 1),
    "send": ("send", 0),  # point to point (a pipeline's validation): synchronous
    "recv": ("recv", 0),
}
_BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
    "send": lambda n: 1.0,
    "recv": lambda n: 1.0,
}


@dataclass
class _Call:
    kind: str
    nbytes: int
    group_size: int
    start: float
    end: float | None = None
    work: object = None
    group: str = ""  # process group name
    events: tuple | None = None  # CUDA (start, end) events of a functional collective


def _duration(c: _Call, cuda_timing: bool, now: float) -> float:
    """Seconds of one call: CUDA events or the Work's GPU time with ``cuda_timing``, else wall time."""
    if cuda_timing:
        try:
            if c.events is not None:
                return c.events[0].elapsed_time(c.events[1]) / 1e3
            if c.work is not None:
                return c.work._get_duration() / 1e3
        except RuntimeError:
            return 0.0
    return (c.end if c.end is not None else now) - c.start


def _union_s(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (seconds)."""
    if not spans:
        return 0.0
    spans = sorted(spans)
    total, cur_s, cur_e = 0.0, spans[0][0], spans[0][1]
    for s, e in spans[1:]:
        if s > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + cur_e - cur_s


@dataclass
class CommTracker:
    """Collects the collectives of the current step (see the module docstring)."""

    cuda_timing: bool = False
    calls: list[_Call] = field(default_factory=list)
    blocked_s: float = 0.0
    enabled: bool = True
    # process group name -> mesh dimension (other groups are looked up by their ranks, then cached)
    group_dims: dict[str, str] = field(default_factory=dict)
    # sorted global ranks of a group -> the mesh dimension of those ranks (a group spanning none keeps
    # its own name)
    rank_dims: dict[tuple[int, ...], str] = field(default_factory=dict)
    # the latest collective issued (set before it runs, so a hang inside it is named)
    last: _Call | None = None
    # the training thread: collectives of other threads (a checkpoint's background write, on its own
    # process group) are not the step's
    thread: int = field(default_factory=threading.get_ident)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def describe_last(self) -> str:
        """One line on the latest collective: kind, bytes, mesh dimension, age, whether it finished."""
        c = self.last
        if c is None:
            return "no collective issued yet"
        dim = self.dim_of(c.group)
        state = "finished" if c.end is not None else "not finished"
        age = time.perf_counter() - c.start
        ranks = f"{c.group_size} ranks"
        return f"{c.kind} of {c.nbytes:,} bytes over {dim} ({ranks}), issued {age:.1f} s ago, {state}"

    def dim_of(self, group: str) -> str:
        """The mesh dimension of the process group named ``group``: by name (``group_dims``), else by
        the ranks it spans (``rank_dims``; cached); its own name when it spans no dimension, ``world``
        for an unnamed group."""
        dim = self.group_dims.get(group)
        if dim is None:
            dim = self.rank_dims.get(_group_ranks(group), group) if group else "world"
            self.group_dims[group] = dim
        return dim

    def reset(self) -> None:
        with self._lock:
            self.calls = []
            self.blocked_s = 0.0

    def stats(self):
        """CommStats of the calls since :meth:`reset` (call after the step's synchronization)."""
        from harness.parallel.base import CommStats

        with self._lock:
            calls = list(self.calls)
            blocked = self.blocked_s
        if not calls:
            return CommStats(0.0, 0.0, 0, None, {}, {})
        now = time.perf_counter()
        nbytes = sum(c.nbytes for c in calls)
        by_op: dict[str, int] = {}
        for c in calls:
            by_op[c.kind] = by_op.get(c.kind, 0) + c.nbytes
        bus_bytes = sum(c.nbytes * _BUS_FACTOR[c.kind](max(c.group_size, 1)) for c in calls)
        by_dim = self._by_dim(calls, now)
        if self.cuda_timing:
            total = sum(_duration(c, True, now) for c in calls)
            exposed = None
        else:
            total = _union_s([(c.start, c.end if c.end is not None else now) for c in calls])
            exposed = min(blocked, total)
        busbw = bus_bytes / total / 1e9 if total > 0 else None
        return CommStats(total, exposed, nbytes, busbw, by_op, by_dim)

    def _by_dim(self, calls: list[_Call], now: float) -> dict[str, dict]:
        """``{dim: {comm_s, comm_bytes, calls, bytes_by_op}}`` of the step's calls."""
        groups: dict[str, list[_Call]] = {}
        for c in calls:
            groups.setdefault(self.dim_of(c.group), []).append(c)
        out = {}
        for dim, cs in sorted(groups.items()):
            if self.cuda_timing:
                seconds = sum(_duration(c, True, now) for c in cs)
            else:
                seconds = _union_s([(c.start, c.end if c.end is not None else now) for c in cs])
            ops: dict[str, int] = {}
            for c in cs:
                ops[c.kind] = ops.get(c.kind, 0) + c.nbytes
            out[dim] = {"comm_s": seconds, "comm_bytes": sum(c.nbytes for c in cs), "calls": len(cs)}
            out[dim]["bytes_by_op"] = ops
        return out

    # -- recording -------------------------------------------------------------------------

    def _record(self, call: _Call) -> None:
        with self._lock:
            self.calls.append(call)

    def _blocked(self, seconds: float) -> None:
        with self._lock:
            self.blocked_s += seconds


def _group_ranks(name: str) -> tuple[int, ...]:
    """The sorted global ranks of the process group named ``name`` (``()`` when it is not known)."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return tuple(sorted(dist.get_process_group_ranks(_resolve_process_group(name))))
    except Exception:
        return ()


_TRACKER: CommTracker | None = None


def tracker() -> CommTracker | None:
    """The installed tracker, or None."""
    return _TRACKER


def _payload(args, kwargs, names: tuple[str, ...], spec) -> int:
    """Bytes of the payload argument, passed positionally or by keyword."""
    idx = int(spec[-1]) if isinstance(spec, str) else spec
    value = args[idx] if len(args) > idx else kwargs.get(names[idx]) if idx < len(names) else None
    if isinstance(spec, str):  # a list of tensors
        return sum(t.numel() * t.element_size() for t in value or [])
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _group_of(group) -> tuple[str, int]:
    """``(name, size)`` of a c10d process group (None: the default group)."""
    try:
        pg = group if group is not None else dist.group.WORLD
        return pg.group_name, pg.size()
    except Exception:
        return "", 1


def _time_work(tr: CommTracker, call: _Call, work) -> None:
    """An asynchronous call ends when its work does: read from the work's CUDA timing at the step's
    end, or from its future's completion callback (gloo's thread)."""
    if tr.cuda_timing:
        call.work = work
        return
    try:
        work.get_future().add_done_callback(lambda _f, c=call: setattr(c, "end", time.perf_counter()))
    except (RuntimeError, AttributeError):
        call.work = work


def _wrap(fn, kind: str, spec):
    names = tuple(inspect.signature(fn).parameters)
    group_index = names.index("group") if "group" in names else None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tr = _TRACKER
        if tr is None or not tr.enabled or threading.get_ident() != tr.thread:
            return fn(*args, **kwargs)
        group = kwargs.get("group")
        if group is None and group_index is not None and len(args) > group_index:
            group = args[group_index]
        name, n = _group_of(group)
        call = _Call(kind, _payload(args, kwargs, names, spec), n, time.perf_counter(), group=name)
        tr.last = call
        work = fn(*args, **kwargs)
        if work is None:  # synchronous: the caller was blocked the whole time
            call.end = time.perf_counter()
            tr._blocked(call.end - call.start)
        else:
            _time_work(tr, call, work)
        tr._record(call)
        return work

    wrapper.__harness_wrapped__ = fn
    return wrapper


# torch.distributed._functional_collectives (DTensor): name -> kind; the payload is the first
# argument (the output, input x group size, for all-gather). Both the torch 2.13 names and the older ones.
_FUNCOL_OPS = {
    "all_reduce": "all_reduce",
    "all_gather_single": "all_gather",
    "all_gather_tensor": "all_gather",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_to_all_single": "all_to_all",
}


_GROUP_SIZES: dict[str, int] = {}  # process group name -> ranks (looked up once per group)


def _funcol_group(funcol, group, tag: str) -> tuple[str, int]:
    """``(name, size)`` of a functional collective's group (any of its RANK_TYPES forms)."""
    try:
        name = funcol._resolve_group_name(group, tag)
        if name not in _GROUP_SIZES:
            from torch.distributed.distributed_c10d import _resolve_process_group

            _GROUP_SIZES[name] = _resolve_process_group(name).size()
        return name, _GROUP_SIZES[name]
    except Exception:
        return "", 1


def _wrap_funcol(fn, kind: str, funcol):
    names = tuple(inspect.signature(fn).parameters)
    gi = names.index("group")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tr = _TRACKER
        if tr is None or not tr.enabled or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        x = args[0] if args else kwargs.get("self")
        group = args[gi] if len(args) > gi else kwargs.get("group")
        name, n = _funcol_group(funcol, group, kwargs.get("tag", args[gi + 1] if len(args) > gi + 1 else ""))
        nbytes = x.numel() * x.element_size() * (n if kind == "all_gather" else 1)
        call = _Call(kind, nbytes, n, time.perf_counter(), group=name)
        tr.last = call
        if tr.cuda_timing and x.is_cuda:
            call.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            call.events[0].record()
        out = fn(*args, **kwargs)
        if hasattr(out, "wait"):  # AsyncCollectiveTensor: CPU blocks here; CUDA orders the streams
            out.wait()
        call.end = time.perf_counter()
        if call.events is not None:
            call.events[1].record()
        else:
            tr._blocked(call.end - call.start)
        tr._record(call)
        return out

    wrapper.__harness_wrapped__ = fn
    return wrapper


def _wrap_p2p_batch(fn):
    """The pipeline schedules' batches of sends and receives (``pipelining.schedules._batch_p2p``):
    one ``send`` or ``recv`` call per op, its bytes the op's tensor, timed from the issue to its work's
    completion. (``dist.isend`` itself cannot be wrapped: ``P2POp`` accepts only the original.)"""

    @functools.wraps(fn)
    def wrapper(p2p_op_list, *args, **kwargs):
        tr = _TRACKER
        if tr is None or not tr.enabled or threading.get_ident() != tr.thread:
            return fn(p2p_op_list, *args, **kwargs)
        start = time.perf_counter()
        works = fn(p2p_op_list, *args, **kwargs)
        paired = works if works is not None and len(works) == len(p2p_op_list) else [None] * len(p2p_op_list)
        if works and not any(paired):  # one work for the coalesced batch
            paired = [works[0]] * len(p2p_op_list)
        for op, work in zip(p2p_op_list, paired):
            kind = "send" if getattr(op.op, "__name__", "") == "isend" else "recv"
            name, n = _group_of(op.group)
            call = _Call(kind, op.tensor.numel() * op.tensor.element_size(), n, start, group=name)
            if work is None:
                call.end = time.perf_counter()
            else:
                _time_work(tr, call, work)
            tr._record(call)
        return works

    wrapper.__harness_wrapped__ = fn
    return wrapper


def track_pipeline() -> None:
    """Count the pipeline schedules' sends and receives (wraps ``_batch_p2p`` of
    ``torch.distributed.pipelining.schedules``, where torch 2.11 to 2.13 issue them; without it, they
    are not counted)."""
    from torch.distributed.pipelining import schedules

    fn = getattr(schedules, "_batch_p2p", None)
    if fn is not None and not hasattr(fn, "__harness_wrapped__"):
        schedules._batch_p2p = _wrap_p2p_batch(fn)


def _wrap_wait(orig):
    @functools.wraps(orig)
    def wait(self, *args, **kwargs):
        tr = _TRACKER
        if tr is None or threading.get_ident() != tr.thread:
            return orig(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return orig(self, *args, **kwargs)
        finally:
            tr._blocked(time.perf_counter() - t0)

    wait.__harness_wrapped__ = orig
    return wait


def install(cuda_timing: bool = False) -> CommTracker:
    """Wrap the ``torch.distributed`` collectives once per process and return the tracker."""
    global _TRACKER
    if _TRACKER is None:
        for name, (kind, spec) in _OPS.items():
            fn = getattr(dist, name, None)
            if fn is not None and not hasattr(fn, "__harness_wrapped__"):
                setattr(dist, name, _wrap(fn, kind, spec))
        from torch.distributed import _functional_collectives as funcol

        for name, kind in _FUNCOL_OPS.items():
            fn = getattr(funcol, name, None)
            if fn is not None and not hasattr(fn, "__harness_wrapped__"):
                setattr(funcol, name, _wrap_funcol(fn, kind, funcol))
        work_cls = torch._C._distributed_c10d.Work
        if not hasattr(work_cls.wait, "__harness_wrapped__"):
            work_cls.wait = _wrap_wait(work_cls.wait)
        _TRACKER = CommTracker(cuda_timing=cuda_timing)
    return _TRACKER
