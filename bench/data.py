"""Data pipeline throughput (CPU): tokenize-and-pack with the ``datasets`` map on 1 and 2 processes,
cold (empty cache) and cached, and the share of step time the trainer waits for data.

    .venv/bin/python bench/data.py [--corpus stdlib|wikitext2] [--tokenizer PATH] [--steps 30] [--json
    bench/data.json]

Cold: a fresh cache directory, so ``datasets`` reads the files into Arrow, tokenizes with
``Dataset.map`` on ``data.num_proc`` processes and the token store is written (what the first run
on a new corpus pays). Cached: the same call again (what every later run pays). MB/s counts the
corpus's file bytes. The data-wait share is the median of ``data_s / step_time_s`` over a harness
run of the default model (steps 2..N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("HARNESS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _cfg(overrides):
    from hydra import compose, initialize_config_dir

    import harness.config  # noqa: F401

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def tokenize(corpus_args: list[str], tokenizer: str, num_proc: int, cache: str) -> tuple[float, int]:
    from harness.config import to_object
    from harness.data import load_token_store

    cfg = to_object(
        _cfg(
            [
                *corpus_args,
                f"tokenizer.path={tokenizer}",
                f"data.num_proc={num_proc}",
                f"data.cache_dir={cache}",
            ]
        )
    )
    t0 = time.perf_counter()
    _, store = load_token_store(cfg.data, cfg.tokenizer)
    return time.perf_counter() - t0, store.num_tokens


def corpus_bytes(corpus_args: list[str]) -> int:
    from harness.config import to_object
    from harness.data.sources import resolve_corpus

    cfg = to_object(_cfg(corpus_args))
    return sum(os.path.getsize(f) for f in resolve_corpus(cfg.data.path, cfg.data.format).files)


def run_records(overrides: list[str], steps: int) -> list[dict]:
    """The records of steps 2..``steps`` of the default run (full batch, no evaluation, no checkpoint)
    with ``overrides``, trained in a temporary run directory."""
    from harness.train import run

    cfg = _cfg(
        [
            *overrides,
            f"train.max_steps={steps}",
            "eval.every=0",
            "checkpoint.every=0",
            "checkpoint.export_hf=false",
            "schedule.batch_warmup.start_global_batch_size=null",
            "logging.wandb.mode=disabled",
            "logging.progress=off",
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, tmp)
        return [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))][1:]


def data_wait(steps: int) -> tuple[float, float]:
    recs = run_records([], steps)
    share = statistics.median(r["data_s"] / r["step_time_s"] for r in recs)
    return share, statistics.median(r["data_s"] for r in recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", choices=["stdlib", "wikitext2"], default="stdlib")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default="bench/data.json")
    args = ap.parse_args()
    corpus = [] if args.corpus == "stdlib" else [f"data.path={SHARED / 'wikitext2' / 'valid.jsonl'}"]
    size = corpus_bytes(corpus)
    rows = []
    for num_proc in (1, 2):
        cold, cached, tokens = [], [], 0
        for _ in range(args.reps):
            cache = tempfile.mkdtemp(prefix="bench-data-")
            try:
                t, tokens = tokenize(corpus, args.tokenizer, num_proc, cache)
                cold.append(t)
                cached.append(tokenize(corpus, args.tokenizer, num_proc, cache)[0])
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        for kind, times in (("cold", cold), ("cached", cached)):
            t = statistics.median(times)
            rows.append(
                {
                    "num_proc": num_proc,
                    "kind": kind,
                    "seconds": t,
                    "mb_per_s": size / 2**20 / t,
                    "tokens_per_s": tokens / t,
                    "tokens": tokens,
                    "bytes": size,
                }
            )
    print(f"corpus {args.corpus}: {size / 2**20:.2f} MB, {rows[0]['tokens']:,} tokens (GPT-2 tokenizer)\n")
    print("| processes | cache | seconds | MB/s | tokens/s |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['num_proc']} | {r['kind']} | {r['seconds']:.3f} | {r['mb_per_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    share, wait = data_wait(args.steps)
    print(
        f"\ntrainer waiting for data (default run, {args.steps} steps, cached store): median {share:.3%} of "
        "step "
        f"time ({wait * 1e3:.2f} ms per step); goal < 2%"
    )
    with open(REPO / args.json, "w") as f:
        json.dump(
            {"corpus": args.corpus, "rows": rows, "data_wait_share": share, "data_wait_s": wait}, f, indent=1
        )


if __name__ == "__main__":
    main()
