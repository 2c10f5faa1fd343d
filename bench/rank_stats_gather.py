"""The per-step collective of ``logging.rank_stats_every=1`` alone: an all-gather of six float64 per
rank through the communication tracker, as the hook issues it, timed over many calls.

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 bench/rank_stats_gather.py [calls]

Prints the median and 99th percentile per call in milliseconds (rank 0).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist

from harness.parallel import comm


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    comm.install()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    mine = torch.zeros(6, dtype=torch.float64)
    rows = torch.empty(world * 6, dtype=torch.float64)
    times = []
    for i in range(calls + 100):
        t0 = time.perf_counter()
        gather(rows, mine)
        if i >= 100:
            times.append(time.perf_counter() - t0)
        comm.tracker().reset()
    if dist.get_rank() == 0:
        times.sort()
        p99 = times[int(0.99 * len(times))]
        print(
            f"all-gather of 6 float64 x {world} ranks: median {1e3 * statistics.median(times):.3f} ms, "
            f"p99 {1e3 * p99:.3f} ms"
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
