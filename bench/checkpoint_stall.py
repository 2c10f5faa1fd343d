"""Training stall per checkpoint save, synchronous vs asynchronous (``checkpoint.async_save``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_stall.py [--models tiny llama_125m] [--worlds 1 2]
        [--steps 8] [--every 2] [--json bench/checkpoint_stall.json]

For each model and world size (1: ``parallel=none``; 2: ``parallel=fsdp`` under torchrun) a fresh run
of ``--steps`` steps saves every ``--every`` steps, once with ``checkpoint.async_save=false`` and once
with ``true``, on the default corpus (micro-batch 1 x 64 tokens per rank, so that saves weigh against
steps as they would on a GPU). Each save logs how long the training thread was blocked in it
(``checkpoint: ... (training blocked X s...``: waiting for the save in flight + staging, or the whole
save when synchronous; ``harness.saving``); the table gives the median over the periodic saves (the
final save, which the end of the run waits for anyway, is left out), the median step time, and for
asynchronous saves the median time until the checkpoint was complete in the background.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(
    r"checkpoint: \S+ \(training blocked ([\d.]+) s(?:, ([\d.]+) s of it waiting for the previous save; "
    r"written in ([\d.]+) s)?"
)


def run(model: str, world: int, async_save: bool, steps: int, every: int, root: Path) -> dict:
    """One training run; returns the save stalls, background write times and step times (seconds)."""
    run_dir = root / f"{model}-w{world}-{'async' if async_save else 'sync'}"
    args = [
        f"model={model}",
        f"train.max_steps={steps}",
        f"checkpoint.every={every}",
        f"checkpoint.async_save={str(async_save).lower()}",
        "checkpoint.keep_last=1",
        "checkpoint.export_hf=false",
        "data.seq_len=64",
        f"train.global_batch_size={world}",
        "train.micro_batch_size=1",
        "schedule.warmup_steps=1",
        "schedule.batch_warmup.steps=0",
        "eval.every=0",
        "logging.wandb.mode=disabled",
        "logging.progress=off",
        f"hydra.run.dir={run_dir}",
    ]
    if world == 1:
        cmd = [sys.executable, "-m", "harness.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        cmd += ["-m", "harness.train", "parallel=fsdp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    saves = [LINE.search(line) for line in (run_dir / "train.log").read_text().splitlines()]
    saves = [m for m in saves if m][:-1]  # the periodic ones
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "model": model,
        "world": world,
        "async": async_save,
        "stall_s": [float(m.group(1)) for m in saves],
        "waited_s": [float(m.group(2)) for m in saves if m.group(2)],
        "written_s": [float(m.group(3)) for m in saves if m.group(3)],
        "step_s": statistics.median(r["step_time_s"] for r in records[1:]),
        "checkpoint_mb": sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
        / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "llama_125m"])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--json", default="bench/checkpoint_stall.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for model in args.models:
            for world in args.worlds:
                for async_save in (False, True):
                    rows.append(run(model, world, async_save, args.steps, args.every, Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| model | world | checkpoint | save | stall per save (median, n) | of it waiting for the previous "
        "save | written in (background) | step |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        med = {k: f"{statistics.median(r[k]):.2f} s" if r[k] else "-" for k in ("waited_s", "written_s")}
        print(
            f"| {r['model']} | {r['world']} | {r['checkpoint_mb']:.0f} MB | "
            f"{'async' if r['async'] else 'sync'} | {statistics.median(r['stall_s']):.3f} s "
            f"({len(r['stall_s'])}) | {med['waited_s']} | {med['written_s']} | {r['step_s']:.2f} s |"
        )
    with open(REPO / args.json, "w") as f:
        json.dump({"steps": args.steps, "every": args.every, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
