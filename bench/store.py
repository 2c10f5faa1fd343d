"""Sharded token stores at two corpus sizes: prepare throughput at 1 and 2 workers, and the resident
memory of training on the store (it should not grow with the corpus).

    .venv/bin/python bench/store.py [--sizes-mb 50 200] [--steps 30] [--json bench/store.json]

For each size a JSON-lines corpus of generated text is written (documents of 50-2,000 words drawn
from the words of the standard library's sources, seeded), then ``harness.prepare_data`` tokenizes
it with the GPT-2 tokenizer of ``../shared/data`` on ``data.num_proc`` 1 and 2, each with an empty
cache (so the time includes ``datasets`` reading the JSON into Arrow; MB/s counts the corpus
file's bytes, tokens/s the store's tokens), and the default model trains ``--steps`` steps
on the store in a fresh process; its peak RSS (``max_memory_bytes`` of the last record) is
reported beside the store's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HARNESS_SHARED_DATA", REPO.parent / "shared" / "data"))
GPT2 = SHARED / "tokenizers" / "gpt2"


def generate_corpus(path: Path, size_mb: float, seed: int = 0) -> int:
    """Write about ``size_mb`` MiB of generated documents to ``path`` (JSON lines); returns its bytes."""
    words = sorted(
        set(re.findall(r"[A-Za-z]{2,12}", Path(sysconfig.get_paths()["stdlib"], "typing.py").read_text()))
    )
    rng = random.Random(seed)
    target, written = int(size_mb * 2**20), 0
    with open(path, "w") as f:
        while written < target:
            line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(50, 2000)))}) + "\n"
            f.write(line)
            written += len(line)
    return os.path.getsize(path)


def prepare(corpus: Path, out: Path, num_proc: int) -> tuple[float, dict]:
    """Run ``harness.prepare_data``; returns (seconds, the store's meta.json)."""
    cmd = [
        sys.executable,
        "-m",
        "harness.prepare_data",
        f"data.path={corpus}",
        f"tokenizer.path={GPT2}",
        f"data.num_proc={num_proc}",
        f"data.cache_dir={out.parent / ('cache-' + out.name)}",
        f"prepare.output_dir={out}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - t0, json.loads((out / "meta.json").read_text())


def train_rss(store: Path, steps: int) -> int:
    """Peak RSS (bytes) of a fresh training process of ``steps`` steps of the default model on ``store``."""
    run_dir = store.parent / f"run-{store.name}"
    cmd = [
        sys.executable,
        "-m",
        "harness.train",
        f"data.path={store}",
        f"train.max_steps={steps}",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.export_hf=false",
        "logging.wandb.mode=disabled",
        "logging.progress=off",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    last = (run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["max_memory_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[50, 200])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default="bench/store.json")
    args = ap.parse_args()
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        for size in args.sizes_mb:
            corpus = root / f"corpus-{size:g}.jsonl"
            nbytes = generate_corpus(corpus, size)
            row = {"size_mb": nbytes / 2**20}
            for num_proc in (1, 2):
                out = root / f"store-{size:g}-{num_proc}"
                seconds, meta = prepare(corpus, out, num_proc)
                row[f"prepare_s_{num_proc}"] = seconds
                row[f"mb_per_s_{num_proc}"] = nbytes / 2**20 / seconds
                row[f"tokens_per_s_{num_proc}"] = meta["num_tokens"] / seconds
                row.update(
                    tokens=meta["num_tokens"], shards=len(meta["shards"]), documents=meta["num_documents"]
                )
            store = root / f"store-{size:g}-2"
            row["store_mb"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
            row["train_rss_gib"] = train_rss(store, args.steps) / 2**30
            rows.append(row)
            for out in root.glob(f"store-{size:g}-*"):
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        "| corpus MB | tokens | documents | prepare 1 proc: s, MB/s, tokens/s | 2 procs: s, MB/s, tokens/s "
        "| store MB | training peak RSS |"
    )
    print("|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['size_mb']:.0f} | {r['tokens']:,} | {r['documents']:,} | {r['prepare_s_1']:.1f}, "
            f"{r['mb_per_s_1']:.2f}, {r['tokens_per_s_1']:,.0f} | {r['prepare_s_2']:.1f}, "
            f"{r['mb_per_s_2']:.2f}, {r['tokens_per_s_2']:,.0f} | {r['store_mb']:.0f} | "
            f"{r['train_rss_gib']:.2f} GiB |"
        )
    with open(REPO / args.json, "w") as f:
        json.dump({"steps": args.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
