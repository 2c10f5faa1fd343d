"""Tensor parallelism on CPU: the default ``tiny`` model (untied embeddings) at world size 2 under
fsdp tp=1 (dp_shard 2), tp=2, tp=2 with sequence parallelism and tp=2 with loss parallelism: tokens/s,
communication time and bytes per step by mesh dimension, and the final loss (every layout must give
the same losses; the bytes follow harness/layouts.py).

    .venv/bin/python bench/tensor_parallel.py [--steps 20] [--reps 2] [--json bench/tensor_parallel.json]

Global batch 16 (micro 4), seq 256, gloo, OMP_NUM_THREADS=1 per process, runs interleaved by
repetition, medians over steps 3..N. On 2 cores this shows what the collectives cost relative to the
compute, not a GPU's speed: gloo all-reduces the activations through shared memory, NCCL over NVLink.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from scaling import interleaved, parse_args, run

COMMON = ["model.tie_word_embeddings=false", "parallel=fsdp"]
VARIANTS = {
    "fsdp tp=1 (dp_shard 2)": [],
    "tp=2": ["parallel.tp=2"],
    "tp=2 + sequence_parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp=2 + loss_parallel": ["parallel.tp=2", "parallel.loss_parallel=true"],
}


def _dims(rs: list[dict]) -> dict[str, tuple[float, float]]:
    """dim -> (median comm_s, median MB per step)."""
    names = sorted({d for r in rs for d in (r["comm_by_dim"] or {})})
    return {
        d: (
            statistics.median(r["comm_by_dim"].get(d, {}).get("comm_s", 0.0) for r in rs),
            statistics.median(r["comm_by_dim"].get(d, {}).get("comm_bytes", 0) for r in rs) / 1e6,
        )
        for d in names
    }


def main() -> None:
    args = parse_args(__doc__, 20, 2, "bench/tensor_parallel.json")
    per_rep = interleaved(
        VARIANTS, args.reps, lambda extra, out: run(2, [*COMMON, *extra], "1", args.steps, out)
    )
    recs = {name: [r for rep in reps for r in rep] for name, reps in per_rep.items()}
    last_loss = {name: reps[-1][-1]["loss"] for name, reps in per_rep.items()}
    rows = []
    for name, rs in recs.items():
        rows.append(
            {
                "layout": name,
                "tokens_per_second": statistics.median(r["tokens_per_second"] for r in rs),
                "step_time_s": statistics.median(r["step_time_s"] for r in rs),
                "comm_by_dim": _dims(rs),
                "final_loss": last_loss[name],
            }
        )
    print(f"\n{'layout':<26} {'tok/s':>8} {'step s':>7} {'final loss':>11}  comm per step by dim (s, MB)")
    for r in rows:
        dims = ", ".join(f"{d} {s:.3f} s {mb:.1f} MB" for d, (s, mb) in r["comm_by_dim"].items())
        print(
            f"{r['layout']:<26} {r['tokens_per_second']:>8,.0f} {r['step_time_s']:>7.3f} "
            f"{r['final_loss']:>11.6f}  {dims}"
        )
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
