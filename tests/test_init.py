"""Initial weights: the same under every layout, built on the meta device, only this rank's shards.

tests/init_probe.py builds the model as the trainer does and gathers it on rank 0.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from harness.config import ModelConfig
from harness.model import build_model, model_stats
from harness.weights import canonical_name, draw, param_seed

TINY = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.vocab_size=320",
    "model.tie_word_embeddings=true",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
]
# name -> (processes, overrides)
LAYOUTS = {
    "none": (1, ["parallel=none"]),
    "ddp": (2, ["parallel=ddp"]),
    "fsdp": (2, ["parallel=fsdp"]),
    "zero3": (2, ["parallel=deepspeed", "parallel.zero_stage=3"]),
    "tp2": (2, ["parallel=fsdp", "parallel.tp=2"]),
    "tp2_dp2": (4, ["parallel=fsdp", "parallel.tp=2"]),
}


def _probe(tmp_path, name: str, nproc: int, overrides: list[str]) -> tuple[dict, list[dict]]:
    out = str(tmp_path / name)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "tests/init_probe.py", out, *overrides]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out + ".pt") if "--no-gather" not in overrides else None
    ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]
    return state, ranks


@pytest.mark.slow
def test_every_layout_starts_from_the_same_weights(tmp_path):
    """One process, DDP, FSDP2, ZeRO-3, tp=2 and tp=2 x dp_shard=2 (tied embeddings): bitwise equal."""
    ref, _ = _probe(tmp_path, "none", *LAYOUTS["none"][:1], [*LAYOUTS["none"][1], *TINY])
    assert len(ref) == 21 and torch.equal(ref["lm_head.weight"], ref["model.embed_tokens.weight"])
    for name, (nproc, overrides) in LAYOUTS.items():
        if name == "none":
            continue
        state, _ = _probe(tmp_path, name, nproc, [*overrides, *TINY])
        assert sorted(state) == sorted(ref), name
        for key, value in ref.items():
            assert torch.equal(state[key].float(), value), (name, key)


def test_the_scheme_draws_each_parameter_by_name():
    """A one-process build equals the documented scheme: N(0, init_std) from a generator seeded by
    sha256("seed:name"), biases 0, norm weights 1; GPT-2's c_proj scaled by 1/sqrt(2 * layers)."""
    cfg = ModelConfig(arch="gpt2", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    net = build_model(cfg, 128, seed=7)
    params = dict(net.named_parameters())
    w = params["transformer.h.1.attn.c_proj.weight"]
    gen = torch.Generator().manual_seed(param_seed(7, "transformer.h.1.attn.c_proj.weight"))
    expected = torch.empty(32, 32).normal_(0.0, 0.02 / math.sqrt(4), generator=gen)
    assert torch.equal(w, expected)
    assert torch.equal(params["transformer.h.0.ln_1.weight"], torch.ones(32))
    assert torch.equal(params["transformer.h.0.ln_1.bias"], torch.zeros(32))
    assert canonical_name("model.layers.0._checkpoint_wrapped_module._orig_mod.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    a = draw(cfg, 7, "transformer.wte.weight", (128, 32), "cpu")
    assert torch.equal(a, params["transformer.wte.weight"]) and not torch.equal(
        a, draw(cfg, 8, "transformer.wte.weight", (128, 32), "cpu")
    )


def test_a_meta_build_holds_no_parameter_storage():
    cfg = ModelConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_size=28672)
    net = build_model(cfg, 128256, seed=0, device="meta")  # LLaMA-3 70B's shape
    assert all(p.is_meta for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) == model_stats(cfg, 128256, 8192).params > 69e9
    assert net.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers computed for real


# ~270M parameters (1.08 GB in fp32): a full copy is far above the bound, the test is not noise
BIG = [
    "model.hidden_size=1024",
    "model.num_layers=16",
    "model.num_heads=8",
    "model.num_kv_heads=8",
    "model.intermediate_size=2816",
    "model.vocab_size=32000",
    "train.global_batch_size=2",
    "train.micro_batch_size=1",
]
FIXED_OVERHEAD = 200 * 2**20  # imports done while building (transformers' model classes), allocator


@pytest.mark.slow
def test_startup_peak_rss_is_the_shards_plus_the_largest_parameter(tmp_path):
    """FSDP2 at world 2: the RSS each rank grows by while building and initializing stays under its
    shards + the largest single parameter + a fixed overhead, below a whole fp32 copy."""
    ranks = _probe(tmp_path, "big", 2, ["--no-gather", "parallel=fsdp", *BIG])[1]
    for r in ranks:
        bound = r["local"] + r["largest"] + FIXED_OVERHEAD
        assert r["full"] > bound, r  # the bound is meaningful at this size
        assert r["grown"] < bound, r
