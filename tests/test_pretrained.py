"""Continued pretraining from released weights (``model.init_from``): a run started from another run's
Hugging Face export computes, on its first batch, the loss of the exported weights on that batch (bitwise
in one process; rel 1e-5 under fsdp, ddp and tp=2 at world 2 and tp=2 x dp_shard=2 at world 4, where rank 0
reads only its slices, byte counts asserted); a checkpoint that does not fit the configured model is
refused with one line naming the first offending tensor, before any model is built.

The reference ("the exporting run's loss on that batch"): the exported weights loaded by ``transformers``
itself (``from_pretrained``) into a one-process run of the same config without ``init_from``, whose first
step is on the same batch (same seed, data, tokenizer and batch plan); its step-1 loss is computed before
any update, so it is the exported weights' loss on the continuing run's first batch.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import SMALL, compose, read_metrics, torchrun_train, train_small

import harness.train as harness_train
import harness.trainer
from harness.config import ModelConfig
from harness.model import build_model
from harness.pretrained import check_pretrained, load_pretrained

ONE = ["train.max_steps=2", "eval.every=0", "checkpoint.every=100"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_corpus):
    """``<run>/hf`` of a 3-step SMALL run (tied embeddings, vocabulary 320, fp32)."""
    run = tmp_path_factory.mktemp("exporting")
    train_small(run, small_corpus, "train.max_steps=3", "eval.every=0", "checkpoint.export_hf=true")
    return run / "hf"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus, exported):
    """Step 1 of a one-process run whose weights ``transformers`` loaded from the export (see above)."""
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("reference")
    cfg = compose(*SMALL, f"data.path={small_corpus}", *ONE, f"tokenizer.path={exported}")
    with harness.trainer.Trainer.from_config(cfg, str(run)) as t:
        weights = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
        t.backend.unwrapped().load_state_dict(weights)
        t.train()
    return read_metrics(run)


def test_round_trip_one_process_is_bitwise(tmp_path, small_corpus, exported, reference):
    train_small(tmp_path / "b", small_corpus, *ONE, f"model.init_from={exported}")
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == [1, 2]
    assert (
        f"{exported}: 20 tensors from 1 file(s), 410,880 of the checkpoint's 410,880 bytes read"
        in (tmp_path / "b" / "train.log").read_text()
    )
    assert rows[0]["loss"] == reference[0]["loss"]  # bitwise
    assert rows[1]["loss"] == reference[1]["loss"] and rows[0]["lr"] == reference[0]["lr"]
    train_small(tmp_path / "random", small_corpus, *ONE)  # the same run from random weights
    assert abs(read_metrics(tmp_path / "random")[0]["loss"] - rows[0]["loss"]) > 0.1


# What rank 0 reads of the 102,720 fp32 parameters (410,880 bytes). fsdp: rows [0, n/2) of every tensor;
# tp=2: half of every weight matrix and of the embedding, and the 5 norms (5 x 64 x 4 bytes) whole;
# tp=2 x dp_shard=2: a quarter of those, half of each norm.
LAYOUTS = {
    "fsdp": (2, ["parallel=fsdp"], 205_440),
    "tp2": (2, ["parallel=fsdp", "parallel.tp=2"], 206_080),
    "ddp": (2, ["parallel=ddp"], 410_880),  # replicated: every rank reads everything
    "tp2_dp2": (4, ["parallel=fsdp", "parallel.tp=2", "train.micro_batch_size=1"], 103_040),
    # filled one parameter at a time as DeepSpeed partitions it (rank 0's values are kept): no one line
    "zero3": (2, ["parallel=deepspeed", "parallel.zero_stage=3"], None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_distributed(tmp_path, small_corpus, exported, reference, layout):
    nproc, overrides, rank0_bytes = LAYOUTS[layout]
    args = [*SMALL, f"data.path={small_corpus}", *ONE, f"model.init_from={exported}", *overrides]
    torchrun_train(nproc, *args, f"hydra.run.dir={tmp_path}")
    log = (tmp_path / "train.log").read_text()
    if rank0_bytes is not None:
        assert f"{rank0_bytes:,} of the checkpoint's 410,880 bytes read on this rank" in log
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for got, ref in zip(rows, reference):
        assert math.isclose(got["loss"], ref["loss"], rel_tol=1e-5), (got["step"], got["loss"], ref["loss"])


def test_resume_continues_from_its_own_checkpoint(tmp_path, small_corpus, exported, reference, caplog):
    run = tmp_path / "b"
    train_small(run, small_corpus, *ONE, f"model.init_from={exported}", "train.stop_at_step=1")
    with caplog.at_level("INFO", logger="harness"):
        train_small(run, small_corpus, *ONE, f"model.init_from={exported}")
    assert f"model.init_from={exported} is ignored: the run continues from its checkpoint" in caplog.text
    assert [r["loss"] for r in read_metrics(run)] == [r["loss"] for r in reference]


def _model(**kw) -> ModelConfig:
    shape = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128)
    return ModelConfig(**{**shape, **kw})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_index_checkpoint_loads(tmp_path, exported, dtype):
    """save_pretrained with a small max_shard_size: an index and several files; bf16 converts to fp32."""
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype)
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    check_pretrained(_model(init_from=str(tmp_path)), 320)
    net = build_model(_model(), 320, seed=7)
    load_pretrained(net, str(tmp_path))
    want = source.state_dict()
    for name, p in net.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, want[name].float()), name
    assert net.lm_head.weight is net.model.embed_tokens.weight


def _write(directory, tensors: dict) -> str:
    from safetensors.torch import save_file

    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return str(directory)


def _edited(tmp_path, exported, drop=(), add=None) -> str:
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(exported / "model.safetensors")).items() if k not in drop}
    return _write(tmp_path / "edited", {**tensors, **(add or {})})


def _refused(argv, run_dir, capsys, monkeypatch) -> tuple[int, list[str]]:
    """``python -m harness.train ARGV`` in-process; building a (real) model is a test failure."""

    def no_model(*a, **k):
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(harness.trainer, "build_model", no_model)
    capsys.readouterr()
    code = harness_train.run_cli(compose(*argv), str(run_dir), argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


MISMATCHES = [  # (overrides, the checkpoint: "export" | "missing" | "unexpected" | "int" | "empty", error)
    (
        ["model.intermediate_size=96"],
        "export",
        "model.init_from={d}: model.layers.0.mlp.gate_proj.weight is [128, 64] there, [96, 64] in the "
        "configured model; configure the checkpoint's shape (model.hidden_size, model.num_layers, "
        "model.num_heads, ...)",
    ),
    (
        [],
        "missing",
        "model.init_from={d} has no tensor model.layers.1.mlp.down_proj.weight (the configured model's is "
        "[64, 128])",
    ),
    (
        ["model.vocab_size=384"],
        "export",
        "model.init_from={d}: model.embed_tokens.weight is [320, 64] there, [384, 64] in the configured "
        "model: a vocabulary of 320 rows there, 384 here (model.vocab_size=384); set model.vocab_size=320 "
        "and use "
        "the checkpoint's tokenizer (leave tokenizer.path unset)",
    ),
    (
        [],
        "unexpected",
        "model.init_from={d} has a tensor lm_head.weight [320, 64] the configured model does not have; set "
        "model.tie_word_embeddings=false",
    ),
    (
        [],
        "int",
        "model.init_from={d}: model.norm.weight is I64; only float tensors (F32, BF16, F16, F64) load into "
        "the model's fp32 parameters",
    ),
    (
        [],
        "empty",
        "model.init_from={d} holds no model.safetensors or model.safetensors.index.json (a directory "
        "save_pretrained or python -m harness.export writes)",
    ),
]


@pytest.mark.parametrize(
    "overrides, kind, message", MISMATCHES, ids=[m[1] + str(i) for i, m in enumerate(MISMATCHES)]
)
def test_mismatch_is_one_line_before_any_model(
    tmp_path, small_corpus, exported, overrides, kind, message, capsys, monkeypatch
):
    if kind == "export":
        d = str(exported)
    elif kind == "missing":
        d = _edited(tmp_path, exported, drop=["model.layers.1.mlp.down_proj.weight"])
    elif kind == "unexpected":
        d = _edited(tmp_path, exported, add={"lm_head.weight": torch.zeros(320, 64)})
    elif kind == "int":
        d = _edited(tmp_path, exported, add={"model.norm.weight": torch.ones(64, dtype=torch.int64)})
    else:
        d = str(tmp_path / "empty")
        (tmp_path / "empty").mkdir()
    argv = [*SMALL, f"data.path={small_corpus}", *ONE, f"tokenizer.path={exported}", f"model.init_from={d}"]
    code, errors = _refused([*argv, *overrides], tmp_path / "run", capsys, monkeypatch)
    assert code == 2 and errors == [f"error: {message.format(d=d)}"], errors
    assert not (tmp_path / "run").exists()


def test_command_line_exits_2_with_one_line(tmp_path, small_corpus, exported):
    import subprocess

    from conftest import REPO

    args = [*SMALL, f"data.path={small_corpus}", *ONE, f"model.init_from={exported}", "model.vocab_size=384"]
    proc = subprocess.run(
        [sys.executable, "-m", "harness.train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: model.init_from={exported}: model.embed_tokens.weight is [320, 64]")


def test_tokenizer_comes_from_the_checkpoint(tmp_path):
    from harness.config import TokenizerConfig
    from harness.pretrained import tokenizer_config

    model = _model(init_from=str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_config(model, TokenizerConfig()).path == str(tmp_path)
    assert tokenizer_config(model, TokenizerConfig(path="/x")).path == "/x"
    assert tokenizer_config(_model(), TokenizerConfig()).path is None


def test_plan_reads_the_checkpoints_tokenizer_and_checks_its_tensors(small_corpus, exported):
    from harness.config import to_object
    from harness.errors import ConfigError
    from harness.plan import make_plan

    argv = [*SMALL, f"data.path={small_corpus}", *ONE, f"model.init_from={exported}", "plan.gpus=1"]
    plan = make_plan(to_object(compose(*argv, schema="plan")))
    assert plan.params == 64 * 320 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    with pytest.raises(ConfigError, match=r"model.embed_tokens.weight is \[320, 64\] there, \[384, 64\]"):
        make_plan(to_object(compose(*argv, "model.vocab_size=384", schema="plan")))


def test_a_checkpoint_without_a_tokenizer_names_tokenizer_path(
    tmp_path, small_corpus, exported, capsys, monkeypatch
):
    """Weights alone (no tokenizer files) and tokenizer.path unset: one line naming both keys, not the
    tokenizer loader's complaint about a tokenizer.path the user never set."""
    d = _edited(tmp_path, exported)  # model.safetensors only
    argv = [*SMALL, f"data.path={small_corpus}", *ONE, f"model.init_from={d}"]
    code, errors = _refused(argv, tmp_path / "run", capsys, monkeypatch)
    assert code == 2 and errors == [
        f"error: model.init_from={d} holds no tokenizer (tokenizer.json / tokenizer_config.json / "
        "tokenizer.model / vocab.json) and tokenizer.path is unset; set tokenizer.path to the checkpoint's "
        "tokenizer"
    ], errors
    assert not (tmp_path / "run").exists()


def test_a_cut_file_or_a_broken_index_is_one_line_before_any_model(
    tmp_path, small_corpus, exported, capsys, monkeypatch
):
    """A copy cut short (its header lists data the file lacks) and an index that is not JSON: one line
    each, before any model (both used to fail inside the build with a traceback, exit 1)."""
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(exported, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "model.safetensors.index.json").write_text("{not json")
    expected = {
        cut: f"error: model.init_from: {cut}/model.safetensors is not a safetensors file (truncated: its "
        f"header needs {len(data):,} bytes, the file has {len(data) // 2:,})",
        broken: f"error: model.init_from: {broken}/model.safetensors.index.json is not a safetensors index "
        "(JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); "
        'save_pretrained writes {"weight_map": {tensor name: file name}}',
    }
    for d, message in expected.items():
        argv = [*SMALL, f"data.path={small_corpus}", *ONE, f"model.init_from={d}"]
        code, errors = _refused(argv, tmp_path / "run", capsys, monkeypatch)
        assert code == 2 and errors == [message], errors
        assert not (tmp_path / "run").exists()
