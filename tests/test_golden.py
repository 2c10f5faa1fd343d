"""Golden per-step values: refactors must not move a loss.

Each case trains a fixed config on WikiText-2 (``../shared/data``) and compares every step's
loss, grad norm, LR, batch size and token counts with ``tests/golden/<case>.json`` bitwise
(exact float equality on CPU). Record them again, only for a change that is meant to move
the numbers (and say why in the commit), with::

    HARNESS_RECORD_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, SMALL, read_metrics

GOLDEN = REPO / "tests" / "golden"
KEYS = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens",
    "tokens_total",
    "global_batch_size",
    "gradient_accumulation_steps",
    "val_loss",
    "epoch",
)
# name -> (processes, overrides): batch ramp 4 -> 8 and accumulation on in every case.
CASES = {
    "none_ramp_accumulation": (1, ["parallel=none", "train.max_steps=12"]),
    "ddp_world2": (2, ["parallel=ddp", "train.max_steps=8"]),
    "fsdp_world2": (2, ["parallel=fsdp", "train.max_steps=8", "train.micro_batch_size=1"]),
}


def _run(nproc: int, run_dir, corpus: str, overrides: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "harness.train",
        *SMALL,
        f"data.path={corpus}",
        "checkpoint.export_hf=false",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_per_step_values_match_the_golden_file(case, tmp_path, shared_data):
    nproc, overrides = CASES[case]
    got = _run(nproc, tmp_path / "run", str(shared_data / "wikitext2" / "valid.jsonl"), overrides)
    path = GOLDEN / f"{case}.json"
    if os.environ.get("HARNESS_RECORD_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps({"overrides": overrides, "nproc": nproc, "steps": got}, indent=1) + "\n")
        pytest.skip(f"recorded {path}")
    want = json.loads(path.read_text())["steps"]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == w, f"step {w['step']}: {g} != golden {w}"


def test_one_process_and_two_ranks_ramp_alike():
    """The same ramp config (4 -> 8, increment 2) gives one process and ddp at world 2 the same batch
    sizes and token counts (item 3 of issue 20: the ramp used to step by micro x world at world 2)."""
    one, two = (json.loads((GOLDEN / f"{c}.json").read_text())["steps"] for c in CASES if c != "fsdp_world2")
    keys = ("global_batch_size", "tokens", "tokens_total")
    assert [[s[k] for k in keys] for s in two] == [[s[k] for k in keys] for s in one[: len(two)]]
    assert [s["global_batch_size"] for s in two] == [4, 4, 6, 6, 8, 8, 8, 8]
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-6)  # same first batch, same weights


def test_the_validation_loss_does_not_depend_on_the_layout():
    """ddp (micro-batch 2) and fsdp (micro-batch 1) at world 2 train on the same batches and evaluate
    the same eval.batches x global_batch_size sequences: equal val_loss (it used to differ by 2e-4,
    the set was eval.batches x micro_batch_size x world_size sequences)."""
    ddp, fsdp = (
        json.loads((GOLDEN / f"{c}.json").read_text())["steps"] for c in ("ddp_world2", "fsdp_world2")
    )
    pairs = [(a["val_loss"], b["val_loss"]) for a, b in zip(ddp, fsdp) if a["val_loss"] is not None]
    assert len(pairs) == 2 and all(a == pytest.approx(b, rel=1e-6) for a, b in pairs)
