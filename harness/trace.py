"""Reading torch.profiler Chrome traces: communication exposed on the device.

A trace (``rank_<r>.json.gz`` from ``harness/hooks/profiler.py``) is Chrome's JSON trace format:
complete events (``"ph": "X"``) with a start ``ts`` and a duration ``dur`` in microseconds. On GPU the
device kernels carry ``"cat": "kernel"``; NCCL's are named ``ncclDevKernel_*`` / ``ncclKernel_*``.
Exposed communication is the time a communication kernel runs while no compute kernel runs (on any
stream): ``|U(comm) \\ U(compute)|``, the measure of the union of the communication intervals minus
its overlap with the union of the compute intervals. On CPU (gloo) the collectives run on gloo's
threads (``gloo:all_reduce`` ...) and the exposed part stays the training thread's blocked time
(``harness.parallel.comm``).
"""

from __future__ import annotations

import gzip
import json

Span = tuple[float, float]


def load_events(path: str) -> list[dict]:
    """The ``traceEvents`` of a ``.json`` or ``.json.gz`` trace."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union(spans: list[Span]) -> list[Span]:
    """Disjoint, sorted intervals covering the same points as ``spans``."""
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(spans: list[Span]) -> float:
    return sum(e - s for s, e in spans)


def intersection_length(a: list[Span], b: list[Span]) -> float:
    """Measure of the intersection of two disjoint sorted interval lists (two-pointer sweep)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def is_comm_kernel(name: str) -> bool:
    return "nccl" in name.lower()


def device_comm(events: list[dict]) -> tuple[float, float] | None:
    """``(comm_s, exposed_s)`` of the device kernels in ``events``, or None when the trace has no
    device kernels (a CPU trace)."""
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel" and "dur" in e]
    if not kernels:
        return None
    comm = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if is_comm_kernel(e.get("name", ""))])
    compute = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if not is_comm_kernel(e.get("name", ""))])
    total = length(comm)
    return total / 1e6, (total - intersection_length(comm, compute)) / 1e6


def collective_events(events: list[dict]) -> list[dict]:
    """The collectives of a trace: NCCL kernels and gloo's ``gloo:<op>`` events."""
    return [
        e
        for e in events
        if e.get("ph") == "X"
        and (str(e.get("name", "")).startswith("gloo:") or is_comm_kernel(e.get("name", "")))
    ]
