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


def _startup_bench():
    spec = importlib.util.spec_from_file_location("bench_startup", REPO / "bench" / "startup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_startup_benchmark_writes_before_and_after_row_sets(tmp_path, monkeypatch):
    mod = _startup_bench()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## CPU\n\n### Other\n\ntext\n\n## GPU\n\nnone\n")
    monkeypatch.setattr(mod, "DOC", doc)
    gib = 2**30

    def res(peak_gib: float, stepped: bool) -> dict:
        snap = {"vmhwm_bytes": int(peak_gib * gib), "time_s": 90.0}
        ranks = [{"rank": r, "built": snap, **({"stepped": snap} if stepped else {})} for r in range(2)]
        return {"ranks": ranks, "record": None, "t0": 0.0, "peak_sum_bytes": 2 * gib, "wall_s": 99.0}

    args = mod.argparse.Namespace(
        world=2, model="llama_1b", parallel="fsdp", phase="start", doc="before", note=""
    )
    mod.write_doc(args, res(4.77, False), "before (abc: full)")
    mod.write_doc(args, res(4.5, False), "before (abd: full)")  # replaces the before rows
    args.doc = "after"
    mod.write_doc(args, res(1.25, True), "after (def: meta)")
    text = doc.read_text()
    assert text.count("### Start-up memory and time to first step (llama_1b, fsdp, world 2, CPU)") == 1
    assert "abc" not in text and "to be measured |" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith(("| before (", "| after ("))]
    assert rows == [
        "| before (abd: full) | 0 | 4.50 | 90.0 | not run | not run |",
        "| before (abd: full) | 1 | 4.50 | 90.0 | not run | not run |",
        "| after (def: meta) | 0 | 1.25 | 90.0 | 1.25 | 90.0 |",
        "| after (def: meta) | 1 | 1.25 | 90.0 | 1.25 | 90.0 |",
    ]
    assert text.index("### Start-up") > text.index("### Other") and text.endswith("\n\n## GPU\n\nnone\n")
