"""Activation memory per rank and step time of context parallelism on CPU (``parallel.cp``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/context.py [--cps 1 2 4] [--seq 8192] [--json bench/context.json]

For each ``cp`` a ``torchrun --nproc_per_node cp`` (gloo) runs this file as a worker: a Llama of 4 layers
(hidden 256, 8 heads, 4 kv heads, fp32) through :mod:`harness.parallel.context` (each rank its two
chunks of one ``--seq``-token sequence, attention over the keys and values all-gathered across ``cp``),
forward and backward of the summed loss, 5 times. Activation memory is what autograd saves for the
backward during one forward (every tensor passed to ``saved_tensors_hooks``, counted once by storage:
the activations the step holds at its peak, without the parameters), on rank 0; the step time is the
median forward + backward. What it shows: the activations per rank fall as ``1 / cp`` plus the
gathered keys and values (``2 x seq x kv_dim`` per layer, whole), the harness.plan's arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAYERS, HIDDEN, HEADS, KV_HEADS, VOCAB = 4, 256, 8, 4, 512


def worker(seq: int) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.parallel.context import ContextParallel

    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=seq,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    tokens = torch.randint(0, VOCAB, (1, seq + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if cp > 1:
        from harness.data import MicroBatch

        dims = type("Dims", (), {"cp": cp, "cp_rank": lambda self, r: r, "cp_group": lambda self, d: None})()
        env = type("Env", (), {"rank": rank, "device": torch.device("cpu")})()
        part = ContextParallel(dims, env)
        part.group = dist.group.WORLD
        part.apply(model)
        mb = part.shard(MicroBatch(inputs, labels))
        kwargs, labels = {"input_ids": mb.input_ids, "position_ids": mb.position_ids}, mb.labels
    else:
        kwargs = {"input_ids": inputs}
    saved: dict[int, int] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    times = []
    for i in range(5):
        t0 = time.perf_counter()
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(**kwargs).logits
        else:
            logits = model(**kwargs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in params)
    if rank == 0:
        print(json.dumps({"cp": cp, "activation_bytes": activations, "step_s": statistics.median(times[1:])}))
    dist.destroy_process_group()


def run(cp: int, seq: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"]
    cmd += [__file__, "--worker", "--seq", str(seq)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"cp={cp}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.seq)
    results = [run(cp, args.seq) for cp in args.cps]
    kv = 2 * args.seq * KV_HEADS * (HIDDEN // HEADS) * 4 * LAYERS  # gathered keys and values, fp32
    base = results[0]["activation_bytes"]
    print("| cp | activations per rank MiB | x cp=1 | 1/cp of cp=1 + gathered k,v MiB | step s (median) |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        ideal = base / r["cp"] + (kv if r["cp"] > 1 else 0)
        print(
            f"| {r['cp']} | {r['activation_bytes'] / 2**20:,.1f} | {r['activation_bytes'] / base:.2f} | "
            f"{ideal / 2**20:,.1f} | {r['step_s']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
