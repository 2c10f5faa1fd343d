"""DeepSpeed ZeRO-3 builds its parameters partitioned (``DeepSpeedBackend.partition``): the initial
weights equal one process's, and after construction each rank stores its partitions only
(tests/init_probe.py under torchrun)."""

import json
import os
import subprocess

import pytest
import torch
from conftest import REPO, TORCHRUN2, compose

from harness.config import to_object

# tied embeddings (one parameter under two names), every parameter's element count even
TINY = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.vocab_size=300",
    "logging.wandb.mode=disabled",
]
FULL_BYTES = 405_760  # 101,440 fp32 parameters


def probe(out, nproc: int, *overrides: str) -> tuple[dict, list[dict]]:
    """Run tests/init_probe.py: the whole initial model gathered on rank 0, and each rank's figures."""
    cmd = [*TORCHRUN2[:-1], f"--nproc_per_node={nproc}", "tests/init_probe.py", str(out), *TINY, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(open(f"{out}.rank{r}.json").read()) for r in range(nproc)]
    return torch.load(f"{out}.pt"), ranks


def test_materialize_each_gives_a_whole_builds_weights_one_parameter_at_a_time():
    """Each parameter is filled through a one-parameter view under its bare name and converted before
    the next exists; the weights are a whole build's, bitwise, and the tied embedding stays one
    parameter."""
    from harness.model import build_model
    from harness.weights import init_weights, materialize_each

    model_cfg = to_object(compose(*TINY)).model
    ref = build_model(model_cfg, 300, 7, None, device="cpu")
    net = build_model(model_cfg, 300, 7, None, device="meta")
    seen, converted = [], []

    def init(view):
        seen.append([name for name, _ in view.named_parameters()])
        assert len(converted) == len(seen) - 1  # the previous one was converted before this one
        init_weights(view, model_cfg, 7)

    materialize_each(net, torch.device("cpu"), init, converted.append)
    assert seen[:2] == [["model.embed_tokens.weight"], ["model.layers.0.self_attn.q_proj.weight"]]
    assert len(seen) == len(converted) == 20  # 21 names, lm_head.weight tied to the embedding
    assert net.lm_head.weight is net.model.embed_tokens.weight is converted[0]
    assert not any(p.is_meta for p in net.parameters())
    for (name, a), (_, b) in zip(net.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    state, (rank0,) = probe(tmp_path_factory.mktemp("none") / "init", 1, "parallel=none")
    assert rank0["full"] == rank0["local"] == FULL_BYTES
    return state


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("bf16", [False, True])
def test_zero3_starts_from_one_process_weights_holding_only_its_partitions(tmp_path, one_process, bf16):
    """Bitwise the one-process weights (with bf16, their bf16 rounding: the engine's dtype), and each
    rank of 2 stores half of every parameter after construction (``p.ds_tensor``; no whole copy), where
    the whole-model path stored all ``FULL_BYTES`` on each rank."""
    args = ["parallel=deepspeed", "parallel.zero_stage=3", f"parallel.bf16={str(bf16).lower()}"]
    state, ranks = probe(tmp_path / "init", 2, *args)
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert sorted(state) == sorted(one_process) and len(state) == 21
    for name, ref in one_process.items():
        assert state[name].dtype == dtype, name
        assert torch.equal(state[name], ref.to(dtype)), name
    per_rank = FULL_BYTES // 2 // (2 if bf16 else 1)  # fp32 or bf16 halves
    assert [r["local"] for r in ranks] == [per_rank, per_rank]
    assert all(r["full"] == FULL_BYTES for r in ranks)
