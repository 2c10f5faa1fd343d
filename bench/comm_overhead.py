"""Overhead of the per-step communication accounting (harness.parallel.comm), CPU/gloo.

Runs the same small model under torchrun --nproc_per_node 2 with logging.comm_timing on and
off, interleaved (A B A B ...), and prints the median step time of each, their ratio, and the
median comm_s share. Writes the table as JSON too. Usage:

    .venv/bin/python bench/comm_overhead.py [--backends ddp fsdp deepspeed] [--model small|tiny] [--reps
    3] [--steps 40]
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
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "schedule.warmup_steps=2",
    "schedule.batch_warmup.start_global_batch_size=null",
    "eval.every=0",
    "checkpoint.every=0",
    "checkpoint.export_hf=false",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
]
# "small": 0.4M parameters, seq 64 (many short collectives); "tiny": the default 4.2M model, seq 256
MODELS = {
    "small": [
        "model.hidden_size=128",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.num_kv_heads=2",
        "model.intermediate_size=256",
        "data.seq_len=64",
    ],
    "tiny": [],
}
BACKEND_ARGS = {
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "deepspeed": ["parallel=deepspeed", "parallel.zero_stage=2"],
}


def run(backend: str, model: str, timing: bool, steps: int, out: Path) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "harness.train",
        *COMMON,
        *MODELS[model],
        *BACKEND_ARGS[backend],
        f"train.max_steps={steps}",
        f"logging.comm_timing={str(timing).lower()}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["ddp", "fsdp", "deepspeed"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--json", default="bench/comm_overhead.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            times = {True: [], False: []}
            shares = []
            for rep in range(args.reps):
                for timing in (True, False):  # interleaved
                    recs = run(
                        backend, args.model, timing, args.steps, Path(tmp) / f"{backend}-{timing}-{rep}"
                    )[5:]
                    times[timing] += [r["step_time_s"] for r in recs]
                    if timing:
                        shares += [r["comm_s"] / r["step_time_s"] for r in recs]
            on, off = statistics.median(times[True]), statistics.median(times[False])
            rows.append(
                {
                    "backend": backend,
                    "model": args.model,
                    "step_s_timing_on": on,
                    "step_s_timing_off": off,
                    "overhead_pct": 100 * (on / off - 1),
                    "comm_share_pct": 100 * statistics.median(shares),
                }
            )
    print(f"model: {args.model}")
    print(f"{'backend':<10} {'step s (on)':>12} {'step s (off)':>13} {'overhead %':>11} {'comm share %':>13}")
    for r in rows:
        print(
            f"{r['backend']:<10} {r['step_s_timing_on']:>12.4f} {r['step_s_timing_off']:>13.4f} "
            f"{r['overhead_pct']:>11.2f} {r['comm_share_pct']:>13.1f}"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
