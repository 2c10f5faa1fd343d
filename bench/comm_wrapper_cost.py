"""Cost per collective of the communication accounting's wrapper, measured directly: a 1-process
gloo group, N tiny all-reduces (sync and async + wait), with and without the wrapper installed.
Multiply by the collectives per step (bench/comm_overhead.py's runs: ~6-30) for the bound on
per-step overhead, which two shared CPU cores cannot resolve from step times.

    .venv/bin/python bench/comm_wrapper_cost.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def bench(calls: int) -> tuple[float, float]:
    t = torch.ones(1)
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(t)
    sync = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(t, async_op=True).wait()
    return sync, (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    bench(1000)
    plain = bench(args.calls)
    from harness.parallel import comm

    tracker = comm.install()
    bench(1000)
    tracker.reset()
    wrapped = bench(args.calls)
    print(f"{'':<22} {'sync us':>9} {'async+wait us':>14}")
    print(f"{'plain':<22} {plain[0] * 1e6:>9.1f} {plain[1] * 1e6:>14.1f}")
    print(f"{'with accounting':<22} {wrapped[0] * 1e6:>9.1f} {wrapped[1] * 1e6:>14.1f}")
    print(
        f"{'cost per collective':<22} {(wrapped[0] - plain[0]) * 1e6:>9.1f} "
        f"{(wrapped[1] - plain[1]) * 1e6:>14.1f}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
