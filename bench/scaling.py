"""Scaling shape on CPU: tokens/s of parallel=ddp|fsdp|deepspeed at world size 2 against one process,
with the share of step time in communication (the accounting of harness.parallel.comm).

    .venv/bin/python bench/scaling.py [--steps 20] [--reps 2] [--json bench/scaling.json]

The default ``tiny`` model, global batch 16 (micro 4; accumulation 4 on one process, 2 per rank
at world size 2), seq 256, gloo, OMP_NUM_THREADS=1 per process. Runs are interleaved by
repetition. Medians over steps 3..N. A 2-core machine cannot show speed-up: two processes share
the two cores that one process (with 2 threads) had, and every step adds gloo collectives.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMON = [
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "schedule.batch_warmup.start_global_batch_size=null",
    "eval.every=0",
    "checkpoint.every=0",
    "checkpoint.export_hf=false",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
    "schedule.warmup_steps=2",
]
VARIANTS = {
    "none (1 process, 2 threads)": (1, ["parallel=none"], "2"),
    "ddp (2 processes)": (2, ["parallel=ddp"], "1"),
    "fsdp (2 processes)": (2, ["parallel=fsdp"], "1"),
    "deepspeed ZeRO-2 (2 processes)": (2, ["parallel=deepspeed", "parallel.zero_stage=2"], "1"),
    "deepspeed ZeRO-3 (2 processes)": (2, ["parallel=deepspeed", "parallel.zero_stage=3"], "1"),
}


def run(nproc: int, args: list[str], threads: str, steps: int, out: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "harness.train",
        *COMMON,
        *args,
        f"train.max_steps={steps}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in open(out / "metrics.jsonl")][2:]


def parse_args(doc: str, steps: int, reps: int, json_path: str) -> argparse.Namespace:
    """``--steps``, ``--reps``, ``--json`` of the interleaved benchmarks."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--json", default=json_path)
    return ap.parse_args()


def interleaved(variants: dict, reps: int, run_one) -> dict[str, list[list[dict]]]:
    """``run_one(spec, out_dir) -> records`` for every variant in turn, repetition by repetition (so a
    slow phase of the machine hits all variants alike); ``{name: [records of each repetition]}``."""
    recs: dict[str, list[list[dict]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for i, (name, spec) in enumerate(variants.items()):
                recs[name].append(run_one(spec, Path(tmp) / f"{i}-{rep}"))
                print(f"rep {rep + 1}: {name} done", flush=True)
    return recs


def main() -> None:
    args = parse_args(__doc__, 20, 2, "bench/scaling.json")
    per_rep = interleaved(VARIANTS, args.reps, lambda v, out: run(v[0], v[1], v[2], args.steps, out))
    recs = {name: [r for rep in reps for r in rep] for name, reps in per_rep.items()}
    rows = []
    base = statistics.median(r["tokens_per_second"] for r in recs[next(iter(VARIANTS))])
    for name, rs in recs.items():
        tps = statistics.median(r["tokens_per_second"] for r in rs)
        rows.append(
            {
                "variant": name,
                "tokens_per_second": tps,
                "vs_one_process": tps / base,
                "step_time_s": statistics.median(r["step_time_s"] for r in rs),
                "comm_s": statistics.median(r["comm_s"] for r in rs),
                "comm_share": statistics.median(r["comm_s"] / r["step_time_s"] for r in rs),
                "comm_mb": statistics.median(r["comm_bytes"] for r in rs) / 1e6,
            }
        )
    print("\n| variant | tokens/s | vs 1 process | step s | comm s | comm share | comm MB/step/rank |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['tokens_per_second']:,.0f} | {r['vs_one_process']:.2f} | "
            f"{r['step_time_s']:.3f} | "
            f"{r['comm_s']:.3f} | {r['comm_share']:.1%} | {r['comm_mb']:.1f} |"
        )
    with open(REPO / args.json, "w") as f:
        json.dump({"steps": args.steps, "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
