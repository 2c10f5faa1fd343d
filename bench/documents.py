"""Throughput with and without document masking (``data.document_mask``), on this machine.

    .venv/bin/python bench/documents.py [--steps 20] [--rounds 2] [--json bench/documents.json]

The default model and run, with the masking off and on, interleaved (off, on, off, on...) so a
change in the machine's load hits both, on two corpora: the default one (the standard library, one
document per module: few boundaries per 256-token window) and the same files split by paragraph
(``data.sample_by=paragraph``: many short documents, so most windows take the masked path). The
table gives the median tokens/s over steps 2..N of each run and the ratio on/off, and how many
windows hold a boundary (the share that cannot use SDPA's plain causal kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.data import _cfg, run_records  # noqa: E402  (the same default run as the data benchmark)

CORPORA = {"stdlib (documents = modules)": [], "stdlib by paragraph": ["data.sample_by=paragraph"]}


def tokens_per_second(corpus: list[str], mask: bool, steps: int) -> float:
    """Median tokens/s over steps 2..``steps`` of the default run with ``data.document_mask=mask``."""
    recs = run_records([*corpus, f"data.document_mask={str(mask).lower()}"], steps)
    return statistics.median(r["tokens_per_second"] for r in recs)


def boundary_share(corpus: list[str], windows: int = 2000) -> float:
    """Share of the first ``windows`` training windows that hold an EOS (a document boundary)."""
    import numpy as np

    from harness.config import to_object
    from harness.data import build_data

    cfg = to_object(_cfg(corpus))
    data = build_data(cfg.data, cfg.tokenizer, cfg.train.global_batch_size, False, cfg.seed)
    seqs = data.train.get(np.arange(min(windows, len(data.train))))[:, :-1]
    return float((seqs == data.tokenizer.eos_token_id).any(dim=1).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="bench/documents.json")
    args = ap.parse_args()
    rows = []
    for name, corpus in CORPORA.items():
        runs = {False: [], True: []}
        for _ in range(args.rounds):
            for mask in (False, True):
                runs[mask].append(tokens_per_second(corpus, mask, args.steps))
        off, on = statistics.median(runs[False]), statistics.median(runs[True])
        rows.append(
            {"corpus": name, "off": off, "on": on, "ratio": on / off, "boundary": boundary_share(corpus)}
        )
    print("| corpus | windows with a boundary | tokens/s, mask off | tokens/s, mask on | on / off |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['corpus']} | {r['boundary']:.0%} | {r['off']:,.0f} | {r['on']:,.0f} | {r['ratio']:.3f} |"
        )
    with open(REPO / args.json, "w") as f:
        json.dump({"steps": args.steps, "rounds": args.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
