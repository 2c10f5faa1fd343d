"""What the debugging aids cost per step at world size 2 on CPU: per-rank stats (one all-gather of six
float64 per rank after each step) under ddp and fsdp, a profiler configured for a window the run never
reaches (the hook's check only: no profiler exists outside a window), and the flight recorder's
buffer (on by default in multi-process runs; off with TORCH_FR_BUFFER_SIZE=0).

    .venv/bin/python bench/debugging.py [--steps 30] [--reps 3] [--json bench/debugging.json]

The default ``tiny`` model, global batch 16 (micro 4), seq 256, gloo, OMP_NUM_THREADS=1 per process.
Runs are interleaved by repetition. The cost is outside the step timer (it runs after the step), so
the figure is the wall time per step: the median difference of consecutive records' ``elapsed_s``
over steps 3..N, pooled over repetitions.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from scaling import interleaved, parse_args, run

VARIANTS = {
    "ddp, rank stats every step": (["parallel=ddp"], {}),
    "ddp, rank stats off": (["parallel=ddp", "logging.rank_stats_every=0"], {}),
    "fsdp, rank stats every step": (["parallel=fsdp"], {}),
    "fsdp, rank stats off": (["parallel=fsdp", "logging.rank_stats_every=0"], {}),
    "ddp, profiler outside its window": (["parallel=ddp", "profile.steps=[100000,100001]"], {}),
    "ddp, flight recorder off": (
        ["parallel=ddp"],
        {"TORCH_FR_BUFFER_SIZE": "0", "TORCH_NCCL_TRACE_BUFFER_SIZE": "0"},
    ),
}


def wall_per_step(records: list[dict]) -> list[float]:
    return [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(records, records[1:])]


def _run_with_env(spec, out: Path, steps: int) -> list[dict]:
    extra, env = spec
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run(2, extra, "1", steps, out)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def main() -> None:
    args = parse_args(__doc__, 30, 3, "bench/debugging.json")
    per_rep = interleaved(VARIANTS, args.reps, lambda spec, out: _run_with_env(spec, out, args.steps))
    walls = {name: [w for rep in reps for w in wall_per_step(rep)] for name, reps in per_rep.items()}
    rows = [{"variant": n, "wall_s_per_step": statistics.median(w)} for n, w in walls.items()]
    base = {"ddp": rows[1]["wall_s_per_step"], "fsdp": rows[3]["wall_s_per_step"]}
    print(f"\n{'variant':<36} {'wall s/step':>12} {'vs off':>8}")
    for r in rows:
        ref = base["fsdp" if r["variant"].startswith("fsdp") else "ddp"]
        r["ratio_to_off"] = r["wall_s_per_step"] / ref
        print(f"{r['variant']:<36} {r['wall_s_per_step']:>12.4f} {r['ratio_to_off']:>8.3f}")
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
