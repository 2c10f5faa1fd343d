"""DeepSpeed ZeRO-3 builds its parameters partitioned (``DeepSpeedBackend.partition``): the initial
weights equal one process's, and after construction each rank stores its partitions only
(tests/init_probe.py under torchrun)."""

import json
import os
import subprocess

import pytest
import torch
from conftest import REPO, TORCHRUN2

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    state, (rank0,) = probe(tmp_path_factory.mktemp("none") / "init", 1, "parallel=none")
    assert rank0["full"] == rank0["local"] == FULL_BYTES
    return state


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
