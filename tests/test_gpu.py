"""Single-GPU smoke tests: the default config for a few steps under every backend, bf16.
Skipped (with the reason) where CUDA is absent; ``launch/smoke.sh`` runs the same by hand."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none)"),
]


@pytest.mark.parametrize("backend", ["none", "ddp", "fsdp", "deepspeed"])
def test_default_config_on_one_gpu(tmp_path, backend):
    extra = {
        "fsdp": ["parallel.param_dtype=bfloat16", "parallel.reduce_dtype=float32"],
        "deepspeed": ["parallel.zero_stage=2"],
    }.get(backend, [])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "harness.train",
        f"parallel={backend}",
        *extra,
        "train.max_steps=10",
        "schedule.warmup_steps=2",
        "schedule.batch_warmup.steps=4",
        "eval.every=5",
        "logging.wandb.mode=disabled",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 11))
    for r in recs:
        assert r["tokens_per_second"] > 0 and 0 < r["mfu"] < 1 and r["max_memory_bytes"] > 0
        if backend != "none":
            assert r["comm_bytes"] > 0 and r["comm_s"] >= 0
    assert recs[-1]["loss"] < recs[0]["loss"]
