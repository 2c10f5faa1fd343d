"""Step time of every pipeline schedule on CPU beside its theoretical bubble (``parallel.pp``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/pipeline.py [--pps 2 4] [--steps 8] [--json bench/pipeline.json]

For each ``pp`` (world = pp, ``parallel=fsdp``, one data-parallel rank) and each schedule, a fresh run
of ``--steps`` steps of an 8-layer model (hidden 256, seq 128, fp32) with 8 micro-batches of 1 per
step and no batch ramp; the table gives the median step time of the steps after the first two
(each schedule's set-up) and tokens/s, beside the schedule's bubble fraction in theory:
``(p - 1) / (v m + p - 1)`` for ``p`` ranks, ``v`` stages per rank and ``m`` micro-batches (GPipe and
1F1B: ``v = 1``, Narayanan et al. 2021, Sec. 2.2; Interleaved1F1B, LoopedBFS: ``v = 2``, ibid.
Sec. 2.2.2); the zero-bubble schedules (Qi et al. 2024) fill it with the weight-gradient halves of
the backward, 0 in theory at enough micro-batches. On 2 CPU cores with ``pp`` processes the times
show the schedules' overheads (send/recv through gloo, the split backward), not GPU behaviour.
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
sys.path.insert(0, str(REPO))

from harness.config.validate import PP_SCHEDULES  # noqa: E402
from harness.layouts import pp_bubble  # noqa: E402

MODEL = [
    "model.hidden_size=256",
    "model.num_layers=8",
    "model.num_heads=4",
    "model.num_kv_heads=4",
    "model.intermediate_size=512",
    "model.tie_word_embeddings=false",
    "data.seq_len=128",
]
MICRO_BATCHES = 8


def bubble(schedule: str, pp: int, m: int = MICRO_BATCHES) -> float:
    """The schedule's idle fraction in theory (:func:`harness.layouts.pp_bubble`)."""
    return pp_bubble(schedule, pp, m, PP_SCHEDULES[schedule])


def run(pp: int, schedule: str, steps: int, root: Path) -> dict:
    run_dir = root / f"pp{pp}-{schedule}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={pp}"]
    cmd += ["-m", "harness.train", *MODEL, "parallel=fsdp", f"parallel.pp={pp}"]
    cmd += [f"parallel.pp_schedule={schedule}", f"train.max_steps={steps}", "train.micro_batch_size=1"]
    cmd += [f"train.global_batch_size={MICRO_BATCHES}", "schedule.batch_warmup.start_global_batch_size=null"]
    cmd += ["eval.every=0", "checkpoint.every=0", "checkpoint.export_hf=false", "logging.wandb.mode=disabled"]
    cmd += ["logging.progress=off", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"pp={pp} {schedule}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:]
    step_s = statistics.median(r["step_time_s"] for r in steady)
    pp_s = statistics.median(r["comm_by_dim"]["pp"]["comm_s"] for r in steady)
    return {
        "pp": pp,
        "schedule": schedule,
        "step_s": step_s,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steady),
        "pp_comm_s": pp_s,
        "bubble": bubble(schedule, pp),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pp in args.pps:
            for schedule in PP_SCHEDULES:
                results.append(run(pp, schedule, args.steps, Path(tmp)))
                r = results[-1]
                print(f"pp={pp} {schedule}: {r['step_s']:.3f} s/step", file=sys.stderr)
    print(
        "| pp | schedule | stages per rank | step s (median) | tokens/s | pp send/recv span s "
        "| bubble in theory |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['pp']} | {r['schedule']} | {PP_SCHEDULES[r['schedule']]} | {r['step_s']:.3f} | "
            f"{r['tokens_per_second']:,.0f} | {r['pp_comm_s']:.3f} | {r['bubble']:.1%} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
