"""The GPU benchmark's CPU-runnable parts (argument parsing, model build at a small size, every
variant's step and the Trainer comparison) -- it is run for real only on a lent GPU."""

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_gpu_benchmark_dry_run_on_cpu():
    mod = _gpu_bench()
    out = mod.main(["--dry-run", "--variants", "eager mb1", "eager mb4 + act. ckpt", "compile mb2"])
    assert [r["variant"] for r in out["rows"]] == ["eager mb1", "eager mb4 + act. ckpt", "compile mb2"]
    assert all(r["tokens_per_second"] > 0 for r in out["rows"])
    assert out["trainer_tokens_per_second"] > 0 and out["ratio_vs_trainer"] is None  # no "eager mb2" row
    cfg = mod.model_config("llama_1b", dry_run=False)
    assert (cfg.hidden_size, cfg.num_layers) == (2048, 16)


def test_gpu_benchmark_refuses_to_run_without_a_gpu():
    proc = subprocess.run([sys.executable, "bench/gpu.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")]).returncode == 0
