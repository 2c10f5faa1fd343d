"""GPU throughput of the training step for a ~1B Llama-style model, one GPU, bf16 (run by bench/gpu.sh).

For each variant -- eager, ``torch.compile`` per block, fused vs foreach AdamW, activation
checkpointing on/off, micro-batch 1/2/4 -- it times optimizer steps of the harness's own step
(``harness.parallel.loss.token_loss_sum`` on a ``harness.model.build_model`` model, bf16 autocast, gradient
clipping, AdamW) on random tokens, and reports tokens/s, MFU against the measured bf16 matmul peak
of this GPU (an 8192^3 matmul loop, measured here) and against the datasheet peak, and peak
memory; then ``transformers.Trainer`` on the same model and batch for the ratio. Prints a
Markdown table and writes JSON.

    python bench/gpu.py [--model llama_1b] [--seq-len 4096] [--steps 12] [--warmup 4] [--json bench/gpu.json]
    python bench/gpu.py --dry-run      # CPU: tiny shapes, 2 steps per variant (what the tests run)

FLOPs per token: ``harness.model.model_stats`` (6N + attention, PaLM App. B).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = [  # name, micro_batch, compile, fused, activation checkpointing
    ("eager mb1", 1, False, True, False),
    ("eager mb2", 2, False, True, False),
    ("eager mb4", 4, False, True, False),
    ("eager mb2 foreach AdamW", 2, False, False, False),
    ("eager mb4 + act. ckpt", 4, False, True, True),
    ("compile mb2", 2, True, True, False),
    ("compile mb4 + act. ckpt", 4, True, True, True),
]


def model_config(name: str, dry_run: bool):
    """The preset from configs/model/<name>.yaml as a ModelConfig (tiny shapes with ``dry_run``)."""
    import yaml

    from harness.config import ModelConfig

    fields = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    if dry_run:
        fields.update(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128)
    return ModelConfig(**{k: v for k, v in fields.items() if k in ModelConfig.__dataclass_fields__})


def measure_bf16_peak(device) -> float:
    """FLOP/s of repeated 8192x8192x8192 bf16 matmuls (2 n^3 FLOPs each) on ``device``."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters, t0 = 50, time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def run_variant(
    mcfg,
    vocab: int,
    seq_len: int,
    micro: int,
    compile_: bool,
    fused: bool,
    ckpt: bool,
    steps: int,
    warmup: int,
    device,
) -> dict:
    """Time ``steps`` optimizer steps of one micro-batch each; returns tokens/s and peak memory (bytes)."""
    import torch

    from harness.data.loader import MicroBatch
    from harness.model import build_model
    from harness.parallel.base import apply_activation_checkpointing, apply_compile
    from harness.parallel.loss import token_loss_sum

    torch.manual_seed(0)
    model = build_model(mcfg, vocab, seed=0, eos_token_id=0, device=device)
    if ckpt:
        apply_activation_checkpointing(model)
    if compile_:
        apply_compile(model)
    use_fused = fused and device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=use_fused, foreach=not use_fused)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    seqs = torch.randint(0, vocab, (micro, seq_len + 1), device=device)
    mb = MicroBatch.from_sequences(seqs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ends = []
    for _ in range(steps):
        loss = token_loss_sum(model, mb, dtype) / mb.labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    tps = micro * seq_len * (steps - warmup) / (ends[-1] - ends[warmup - 1])
    mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    del model, opt
    return {"tokens_per_second": tps, "max_memory_bytes": mem}


def run_trainer(mcfg, vocab: int, seq_len: int, micro: int, steps: int, warmup: int, device) -> float:
    """``transformers.Trainer`` on the same model and micro-batch (bf16 on GPU); steady-state tokens/s."""
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from harness.model import build_model

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    class Rand(torch.utils.data.Dataset):
        def __len__(self):
            return micro * steps

        def __getitem__(self, i):
            x = torch.randint(0, vocab, (seq_len,))
            return {"input_ids": x, "labels": x}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=micro,
            max_steps=steps,
            bf16=device.type == "cuda",
            use_cpu=device.type != "cuda",
            save_strategy="no",
            report_to=[],
            logging_steps=1000,
            disable_tqdm=True,
            optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
        )
        Trainer(
            model=build_model(mcfg, vocab, seed=0, eos_token_id=0),
            args=args,
            train_dataset=Rand(),
            callbacks=[Clock()],
        ).train()
    return micro * seq_len * (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def main(argv: list[str] | None = None) -> dict:
    import torch

    from harness.metrics import GPU_SPECS
    from harness.model import model_stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--variants", nargs="*", help="names from VARIANTS (default: all)")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, 2+1 steps: checks the script runs"
    )
    ap.add_argument("--json", default="bench/gpu.json")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.vocab, args.steps, args.warmup = 32, 512, 3, 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device (use --dry-run to check it on a CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    mcfg = model_config(args.model, args.dry_run)
    flops_per_token = model_stats(mcfg, args.vocab, args.seq_len).flops_per_token
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((v[0] for k, v in GPU_SPECS.items() if k in name), None)
    measured = measure_bf16_peak(device) if device.type == "cuda" else None
    chosen = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    rows = []
    for vname, micro, comp, fused, ckpt in chosen:
        try:
            r = run_variant(
                mcfg, args.vocab, args.seq_len, micro, comp, fused, ckpt, args.steps, args.warmup, device
            )
        except torch.OutOfMemoryError:
            r = {"tokens_per_second": None, "max_memory_bytes": None, "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        tps = r["tokens_per_second"]
        r.update(
            variant=vname,
            micro_batch_size=micro,
            mfu_measured_peak=tps * flops_per_token / measured if tps and measured else None,
            mfu_datasheet=tps * flops_per_token / datasheet if tps and datasheet else None,
        )
        rows.append(r)
        print(json.dumps(r), flush=True)
    trainer = run_trainer(mcfg, args.vocab, args.seq_len, 2, args.steps, args.warmup, device)
    eager2 = next((r["tokens_per_second"] for r in rows if r["variant"] == "eager mb2"), None)
    print(
        f"\n{name}: bf16 matmul peak measured {measured / 1e12 if measured else float('nan'):.0f} TFLOP/s, "
        f"datasheet {datasheet / 1e12 if datasheet else float('nan'):.0f}; model {args.model} "
        f"({model_stats(mcfg, args.vocab, args.seq_len).params / 1e9:.2f}B), seq {args.seq_len}\n"
    )
    print(
        "| variant | tokens/s | MFU (measured peak) | MFU (datasheet) | peak memory GiB "
        "|\n|---|---:|---:|---:|---:|"
    )
    for r in rows:
        t = r["tokens_per_second"]
        print(
            f"| {r['variant']} | {t or 0:,.0f} | {r['mfu_measured_peak'] or 0:.1%} | "
            f"{r['mfu_datasheet'] or 0:.1%} | "
            f"{(r['max_memory_bytes'] or 0) / 2**30:.1f} |"
        )
    print(f"| transformers.Trainer mb2 | {trainer:,.0f} | | | |")
    ratio = eager2 / trainer if eager2 else None
    print(f"\nharness step (eager mb2) / Trainer (mb2) = {ratio or float('nan'):.2f}")
    out = {
        "device": name,
        "measured_peak_flops": measured,
        "datasheet_peak_flops": datasheet,
        "model": args.model,
        "seq_len": args.seq_len,
        "flops_per_token": flops_per_token,
        "rows": rows,
        "trainer_tokens_per_second": trainer,
        "ratio_vs_trainer": ratio,
        "torch": torch.__version__,
    }
    if not args.dry_run:
        with open(REPO / args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
