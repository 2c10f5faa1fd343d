"""Harness overhead against the floor (CPU): the harness vs a bare PyTorch loop vs transformers.Trainer.

The same model (the default ``tiny`` Llama, built by ``harness.model.build_model`` with the same
seed), the same pre-tokenized sequences (the default corpus's token store), the same batch
(global 16 = micro 4 x accumulation 4, seq 256), AdamW with the same hyper-parameters and a
cosine schedule, one process. Each variant runs in a fresh subprocess; the rounds are interleaved
(A B C A B C ...). Throughput is steady-state: tokens of steps ``warmup+1 .. steps`` divided by the
wall time between the end of step ``warmup`` and the end of the last step (everything between
steps counted: logging, metrics, callbacks).

    .venv/bin/python bench/overhead.py [--steps 30] [--warmup 5] [--rounds 5] [--load 0]
                                       [--json bench/overhead.json]

``--load N`` runs N busy-looping processes beside the rounds (a contended host: on 2 cores,
``--load 1`` takes one core away from every variant alike). The table gives each variant's median,
its spread (min-max) and the harness/bare ratio of each round (the two ran back to back).

Variants:
  harness  ``harness.train.run`` with metrics.jsonl, console lines, comm timing and MFU on (wandb off)
  bare     ``zero_grad; for each micro-batch: forward, loss, backward; step`` -- nothing else
  trainer  ``transformers.Trainer`` (per-device batch 4, accumulation 4, cosine, clipping 1.0)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OVERRIDES = [
    "train.global_batch_size=16",
    "train.micro_batch_size=4",
    "schedule.batch_warmup.start_global_batch_size=null",
    "eval.every=0",
    "checkpoint.every=0",
    "checkpoint.export_hf=false",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
    "schedule.warmup_steps=5",
]


def _setup(steps: int):
    """Config, model and the step's micro-batches exactly as the harness would plan them."""
    from hydra import compose, initialize_config_dir

    import harness.config  # noqa: F401
    from harness.config import to_object, validate
    from harness.data import build_data
    from harness.data.loader import StepLoader
    from harness.model import build_model, resolve_vocab_size
    from harness.schedule import build_schedule

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        composed = compose(config_name="train", overrides=[*OVERRIDES, f"train.max_steps={steps}"])
    cfg = to_object(composed)
    batch = validate(cfg, 1)
    data = build_data(cfg.data, cfg.tokenizer, batch.global_batch_size, need_val=False)
    plan = build_schedule(cfg, batch, len(data.train)).plan
    loader = StepLoader(data.train, cfg.seed, batch.micro_batch_size)
    steps_mb = []
    for info in plan.steps():
        steps_mb.append(loader.micro_batches(info))
        if info.step == steps:
            break
    vocab = resolve_vocab_size(cfg.model, len(data.tokenizer))
    return (
        composed,
        cfg,
        steps_mb,
        lambda: build_model(cfg.model, vocab, cfg.seed, data.tokenizer.eos_token_id),
    )


def _steady(ends: list[float], tokens: list[int], warmup: int) -> float:
    return sum(tokens[warmup:]) / (ends[-1] - ends[warmup - 1])


def variant_harness(steps: int, warmup: int) -> float:
    from harness.train import run

    composed, _, _, _ = _setup(steps)
    with tempfile.TemporaryDirectory() as tmp:
        run(composed, tmp)
        recs = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
    return _steady([r["elapsed_s"] for r in recs], [r["tokens"] for r in recs], warmup)


def variant_bare(steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    _, cfg, steps_mb, build = _setup(steps)
    model = build()
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        foreach=True,
    )
    ends, tokens = [], []
    for mbs in steps_mb:
        opt.zero_grad(set_to_none=True)
        for mb in mbs:
            logits = model(input_ids=mb.input_ids).logits
            loss = F.cross_entropy(logits.flatten(0, 1), mb.labels.flatten()) / len(mbs)
            loss.backward()
        opt.step()
        ends.append(time.perf_counter())
        tokens.append(sum(mb.labels.numel() for mb in mbs))
    return _steady(ends, tokens, warmup)


def variant_trainer(steps: int, warmup: int) -> float:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    _, cfg, steps_mb, build = _setup(steps)
    rows = [
        (mb.input_ids[i], mb.labels[i])
        for mbs in steps_mb
        for mb in mbs
        for i in range(mb.input_ids.shape[0])
    ]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            x, y = rows[i]
            return {"input_ids": x, "labels": torch.cat([x[:1], y[:-1]])}  # HF shifts labels itself

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            max_steps=steps,
            learning_rate=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.betas[0],
            adam_beta2=cfg.optim.betas[1],
            max_grad_norm=cfg.optim.grad_clip,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=cfg.seed,
        )
        trainer = Trainer(model=build(), args=targs, train_dataset=Windows(), callbacks=[Clock()])
        trainer.train()
    per_step = 16 * cfg.data.seq_len
    return _steady(ends, [per_step] * len(ends), warmup)


VARIANTS = {"harness": variant_harness, "bare": variant_bare, "trainer": variant_trainer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant in this process (internal)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes beside the rounds")
    ap.add_argument("--json", default="bench/overhead.json")
    args = ap.parse_args()
    if args.variant:
        print(
            json.dumps(
                {
                    "variant": args.variant,
                    "tokens_per_second": VARIANTS[args.variant](args.steps, args.warmup),
                }
            )
        )
        return
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        _rounds(args, results, env)
    finally:
        for p in load:
            p.kill()
    _report(args, results)


def _rounds(args, results: dict[str, list[float]], env: dict) -> None:
    for r in range(args.rounds):
        for v in VARIANTS:  # interleaved: harness bare trainer, harness bare trainer, ...
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--variant",
                    v,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            tps = json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_second"]
            results[v].append(tps)
            print(f"round {r + 1} {v:8s} {tps:9,.0f} tokens/s", flush=True)


def _report(args, results: dict[str, list[float]]) -> None:
    med = {v: statistics.median(x) for v, x in results.items()}
    print(
        f"\n(load: {args.load} busy processes)\n"
        "| variant | median tokens/s | min-max | runs |\n|---|---:|---|---|"
    )
    for v in VARIANTS:
        x = results[v]
        print(f"| {v} | {med[v]:,.0f} | {min(x):,.0f}-{max(x):,.0f} | {', '.join(f'{t:,.0f}' for t in x)} |")
    per_round = [h / b for h, b in zip(results["harness"], results["bare"])]
    print("harness/bare per round: " + ", ".join(f"{r:.3f}" for r in per_round))
    ratios = {
        "harness/bare": med["harness"] / med["bare"],
        "harness/trainer": med["harness"] / med["trainer"],
    }
    print(
        f"\nharness/bare = {ratios['harness/bare']:.3f} (goal >= 0.97); "
        f"harness/Trainer = {ratios['harness/trainer']:.3f} (goal >= 1.2)"
    )
    with open(REPO / args.json, "w") as f:
        json.dump(
            {
                "steps": args.steps,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "load": args.load,
                "harness_over_bare_per_round": per_round,
                "tokens_per_second": results,
                "median": med,
                "ratios": ratios,
                "torch": __import__("torch").__version__,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
