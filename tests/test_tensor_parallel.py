"""Tensor (and sequence) parallelism on the mesh: every layout gives the one-process losses and grad
norms (rel 1e-5, fp32, gloo), resumes across layouts through DCP, and its communication bytes per mesh
dimension are the arithmetic of harness.layouts (which the plan prints)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import SMALL, compose, read_metrics, torchrun_train, train_small

from harness.config import to_object, validate
from harness.errors import ConfigError

# SMALL with untied embeddings (tied ones: test_tp2_with_tied_embeddings_matches_one_process), clipping that
# bites (grad norms are > 0.5), 6 steps with the batch ramp (4, 4, 6, 6, 8, 8) and accumulation.
TP = [
    "model.tie_word_embeddings=false",
    "train.max_steps=6",
    "optim.grad_clip=0.5",
    "eval.every=3",
    "checkpoint.every=2",
    "checkpoint.keep_last=3",
    "train.dtype=float32",
]
MICRO1 = ["train.micro_batch_size=1"]  # dp=2 layouts: another micro-batch size, the same batches and val set


def _launch(nproc: int, run_dir, *overrides: str, env_extra: dict | None = None, check: bool = True):
    args = [*SMALL, *TP, "parallel=fsdp", *overrides, f"hydra.run.dir={run_dir}"]
    return torchrun_train(nproc, *args, env=env_extra, check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    """The one-process run every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("tp") / "one_process"
    train_small(run_dir, small_corpus, *TP)
    return {r["step"]: r for r in read_metrics(run_dir)}, run_dir


def _assert_parity(run_dir, reference, steps=None):
    reference = reference[0]
    rows = read_metrics(run_dir)
    steps = steps or sorted(reference)
    assert [r["step"] for r in rows] == steps
    for r in rows:
        ref = reference[r["step"]]
        assert r["tokens"] == ref["tokens"] and r["lr"] == ref["lr"]
        for key in ("loss", "grad_norm", "val_loss"):
            if ref.get(key) is not None:
                assert math.isclose(r[key], ref[key], rel_tol=1e-5), (r["step"], key, r[key], ref[key])


def _tp_bytes(record, sp: bool, L=2, b=2, s=32, h=64, vocab=320) -> dict:
    """The arithmetic of harness.layouts for one recorded step, plus the scalar all-reduces of the
    gradient norm (8 bytes: one float64 per group of mesh dims)."""
    from harness.layouts import tp_bytes

    class M:
        num_layers, hidden_size = L, h

    k = record["gradient_accumulation_steps"]
    want = tp_bytes(M, s, b, k, vocab, 2, sp, False, 4)
    want["all_reduce"] += 8  # the gradient norm: one float64 sum of squares over tp
    return want


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_world2_matches_one_process_through_a_kill_and_reshards_to_tp1_and_back(
    tmp_path, small_corpus, reference
):
    """tp=2 (dp 1) killed as step 4 starts (step 3 is done everywhere, so the step-2 checkpoint is
    complete) and resumed: the one-process run, bytes per step by dimension;
    its step-2 checkpoint resumes at tp=1 x dp_shard=2 (tp 2 -> 1, dp 1 -> 2), whose step-4 checkpoint
    resumes at tp=2 with sequence parallelism (tp 1 -> 2, dp 2 -> 1)."""
    data = f"data.path={small_corpus}"
    tp2 = tmp_path / "tp2"
    killed = _launch(2, tp2, data, "parallel.tp=2", env_extra={"HARNESS_FAULT": "kill:4:1"}, check=False)
    assert killed.returncode != 0
    shutil.copytree(tp2, tmp_path / "tp1")  # holds the step-2 checkpoint written at tp=2
    _launch(2, tp2, data, "parallel.tp=2")
    _assert_parity(tp2, reference)
    for r in read_metrics(tp2):
        assert set(r["comm_by_dim"]) == {"tp"}, r["comm_by_dim"]  # dp = 1: nothing else moves
        assert r["comm_by_dim"]["tp"]["bytes_by_op"] == _tp_bytes(r, sp=False), r["step"]
    assert (tp2 / "hf" / "config.json").exists()

    tp1 = tmp_path / "tp1"
    proc = _launch(2, tp1, data, *MICRO1)  # tp=1: FSDP over dp_shard=2
    assert "resharded from mesh dp_replicate 1 x dp_shard 1 x tp 2 to dp_replicate 1 x dp_shard 2" in (
        proc.stderr + proc.stdout
    )
    _assert_parity(tp1, reference)  # steps 1-2 from the tp=2 run, 3-6 at tp=1

    back = tmp_path / "back"
    os.makedirs(back / "checkpoints")
    shutil.copytree(tp1 / "checkpoints" / "step_00000004", back / "checkpoints" / "step_00000004")
    _launch(2, back, data, "parallel.tp=2", "parallel.sequence_parallel=true")
    _assert_parity(back, reference, steps=[5, 6])
    for r in read_metrics(back):
        assert r["comm_by_dim"]["tp"]["bytes_by_op"] == _tp_bytes(r, sp=True), r["step"]


@pytest.mark.slow
@pytest.mark.distributed
def test_2d_tp2_x_dp_shard2_world4_with_sequence_parallel_matches_one_process(
    tmp_path, small_corpus, reference
):
    """FSDP2 over dp_shard=2 x tensor parallel over tp=2 (gloo, 4 processes): the one-process losses
    and grad norms (gloo's reduce-scatter must not scale them, pytorch #162338); the dp_shard bytes are
    FSDP2's gathers and one reduce-scatter of this rank's parameters; the export is the same model."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "2d"
    cmd = [f"data.path={small_corpus}", "parallel.tp=2", "parallel.sequence_parallel=true", *MICRO1]
    _launch(4, run_dir, *cmd)
    _assert_parity(run_dir, reference)
    from harness.layouts import tp_local_params

    local = tp_local_params(_params(), 2, 64, 2)  # this rank's tp shard: matrices / 2 + the norm gains
    for r in read_metrics(run_dir):
        k = r["gradient_accumulation_steps"]
        dp = r["comm_by_dim"]["dp_shard"]["bytes_by_op"]
        assert dp["all_gather"] == 2 * k * local * 4 and dp["reduce_scatter"] == local * 4, (r["step"], dp)
        assert r["comm_by_dim"]["tp"]["bytes_by_op"] == _tp_bytes(r, sp=True, b=1), r["step"]
    ours = load_file(str(next((run_dir / "hf").glob("*.safetensors"))))
    ref = load_file(str(next((reference[1] / "hf").glob("*.safetensors"))))
    from harness.export import export  # python -m harness.export, from the 2-D DCP checkpoint

    exported = export(str(run_dir / "checkpoints" / "step_00000006"), str(tmp_path / "exported"))
    offline = load_file(str(next(Path(exported).glob("*.safetensors"))))
    assert offline.keys() == ours.keys() and all((offline[k] == ours[k]).all() for k in ours)
    assert ours.keys() == ref.keys()
    for name, t in ref.items():  # Adam turns 1e-7 gradient differences into up to ~1e-5 in the weights
        assert ours[name].shape == t.shape and (ours[name] - t).abs().max() < 1e-4, name


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_with_tied_embeddings_matches_one_process(tmp_path, small_corpus):
    """The row-wise embedding and the column-wise LM head both shard the vocabulary rows of the tied
    weight, which stays one Parameter sharded once (as in Megatron-LM): every step's loss and grad norm
    are the one-process run's (rel 1e-5; measured at most 9e-8), clipping biting, and the export is
    the tied one-process model (no lm_head.weight, weights within 1e-4)."""
    from safetensors.torch import load_file

    tied = [*(o for o in TP if not o.startswith(("model.tie", "train.max_steps"))), "train.max_steps=4"]
    tied += ["model.tie_word_embeddings=true", "checkpoint.every=4"]
    ref_dir = tmp_path / "one_process"
    train_small(ref_dir, small_corpus, *tied)
    ref = read_metrics(ref_dir)
    run_dir = tmp_path / "tp2"
    torchrun_train(
        2,
        *SMALL,
        *tied,
        f"data.path={small_corpus}",
        "parallel=fsdp",
        "parallel.tp=2",
        f"hydra.run.dir={run_dir}",
    )
    got = read_metrics(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 0.5 for r in ref)  # optim.grad_clip=0.5 bites
    for a, b in zip(got, ref):
        for key in ("loss", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (a["step"], key, a[key], b[key])
    ours = load_file(str(next((run_dir / "hf").glob("*.safetensors"))))
    theirs = load_file(str(next((ref_dir / "hf").glob("*.safetensors"))))
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours
    assert all((ours[k] - theirs[k]).abs().max() < 1e-4 for k in ours)


def _params() -> int:
    from harness.model import model_stats

    cfg = to_object(compose(*SMALL, *TP))
    return model_stats(cfg.model, 320, cfg.data.seq_len).params


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel=ddp", "parallel.tp=2"], 2, "parallel.tp=2 needs parallel=fsdp"),
        (["parallel=fsdp", "parallel.tp=2", "model=gpt2_tiny"], 2, "model.arch=gpt2 fuses q/k/v"),
        (
            ["parallel=fsdp", "parallel.tp=4", "model.num_heads=4", "model.num_kv_heads=2"],
            4,
            "model.num_kv_heads=2 is not divisible",
        ),
        (["parallel=fsdp", "parallel.tp=3", "model.num_heads=3"], 3, "model.num_heads=3"),
        (["parallel=fsdp", "parallel.tp=2"], 3, "parallel.tp=2 does not divide world_size=3"),
        (
            ["parallel=fsdp", "parallel.sequence_parallel=true"],
            2,
            "sequence_parallel=true needs parallel.tp > 1",
        ),
        (["parallel=fsdp", "parallel.tp=0"], 2, "parallel.tp=0 must be >= 1"),
    ],
)
def test_tensor_parallel_settings_that_cannot_run_are_refused_by_the_config_check(overrides, world, message):
    cfg = to_object(compose(*SMALL, "model.tie_word_embeddings=false", *overrides))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world)


def test_batch_arithmetic_counts_data_parallel_ranks_only():
    cfg = to_object(
        compose(*SMALL, *TP, "parallel=fsdp", "parallel.tp=2", "train.gradient_accumulation_steps=null")
    )
    batch = validate(cfg, 4)  # dp = 2: global 8 = micro 2 x accumulation 2 x dp 2
    assert (batch.world_size, batch.gradient_accumulation_steps) == (2, 2)
    with pytest.raises(ConfigError, match=r"x data-parallel ranks \(world_size / tp=2\)=2 = 6"):
        validate(
            to_object(compose(*SMALL, *TP, "parallel=fsdp", "parallel.tp=2", "train.micro_batch_size=3")), 4
        )


def test_plan_compares_layouts_and_its_tp_bytes_are_the_runs_arithmetic():
    from harness.layouts import tp_bytes
    from harness.plan import make_plan, render_text

    overrides = [
        "model=llama3_8b",
        "model.vocab_size=128256",
        "parallel=fsdp",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
        "plan.gpus=8",
        "data.seq_len=8192",
        "train.global_batch_size=64",
        "train.micro_batch_size=1",
        "train.gradient_accumulation_steps=null",
        "train.max_steps=100",
        "plan.dataset_tokens=1000000000",
    ]
    pl = make_plan(to_object(compose(*overrides, schema="plan")))
    cfg = to_object(compose(*overrides, schema="plan"))
    assert pl.communication["tp"] == tp_bytes(cfg.model, 8192, 1, 16, 128256, 2, True, False, 2)
    assert [r["tp"] for r in pl.layouts] == [1, 2, 4, 8]
    assert [(r["dp_shard"], r["gradient_accumulation_steps"]) for r in pl.layouts] == [
        (8, 8),
        (4, 16),
        (2, 32),
        (1, 64),
    ]
    mem = [r["memory"] for r in pl.layouts]
    assert mem == sorted(mem, reverse=True)  # more tp: less memory per device
    assert "tp" not in pl.layouts[0]["comm_bytes"] and "dp_shard" not in pl.layouts[3]["comm_bytes"]
    assert "== Layouts on 8 x H100" in render_text(pl)
    tied = make_plan(to_object(compose("parallel=fsdp", "plan.gpus=2", schema="plan")))
    assert [(r["tp"], r["note"]) for r in tied.layouts] == [(1, None), (2, None)]  # tied runs tp > 1
