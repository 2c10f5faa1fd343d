"""Bad input, nothing lost: 60 bad configurations and 14 bad data inputs, each refused with one
``error:`` line that names the key or file, exit status 2, before any model is built, with an
existing run's checkpoints and logs left byte for byte as they were."""

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest
from conftest import REPO, SMALL, compose, train_small

import harness.train as harness_train
import harness.trainer
from harness.cluster import slurm
from harness.config import to_object
from harness.errors import ConfigError, DataError, HarnessError

BAD_CONFIGS = [  # (overrides, text the error line must contain)
    ("train.max_stepz=5", "train.max_stepz"),
    ("+foo=1", "foo is not a config key"),
    ("+model.bar=2", "model.bar is not a config key"),
    ("train.max_steps=abc", "full_key: train.max_steps"),
    ("optim.lr=fast", "full_key: optim.lr"),
    ("optim.betas=0.9", "full_key: optim.betas"),
    ("model=nonexistent", "Could not find 'model/nonexistent'"),
    ("parallel=nonexistent", "Could not find 'parallel/nonexistent'"),
    ("parallel.zero_stage=[1", "no viable alternative at input '[1'"),
    ("train.global_batch_size=0", "train.global_batch_size=0 must be a positive integer"),
    ("train.micro_batch_size=-2", "train.micro_batch_size=-2 must be a positive integer"),
    (
        "train.gradient_accumulation_steps=3",
        "train.global_batch_size=8 != micro_batch_size=2 x gradient_accumulation",
    ),
    ("train.global_batch_size=7", "train.global_batch_size=7 is not divisible by micro_batch_size=2"),
    ("train.global_batch_size=null train.micro_batch_size=null", "set two of train.global_batch_size"),
    ("train.max_steps=0", "train.max_steps=0 must be > 0"),
    ("train.max_steps=null", "set exactly one budget: train.max_steps or train.max_tokens"),
    ("train.max_steps=5 train.max_tokens=1000", "set exactly one budget"),
    (
        "schedule.warmup_steps=-3 schedule.min_lr=-1",
        "schedule.warmup_steps=-3 must be >= 0; schedule.min_lr=-1.0 must",
    ),
    ("schedule.warmup_steps=-1", "schedule.warmup_steps=-1 must be >= 0"),
    ("schedule.name=linear", "schedule.name='linear' is not one of cosine, constant, wsd"),
    ("schedule.min_lr=-0.1", "schedule.min_lr=-0.1 must be >= 0"),
    ("schedule.min_lr=1.0", "schedule.min_lr=1.0 is larger than optim.lr"),
    (
        "schedule.batch_warmup.start_global_batch_size=3",
        "schedule.batch_warmup.start_global_batch_size=3 does not reach",
    ),
    (
        "schedule.batch_warmup.tokens=0 schedule.batch_warmup.steps=0",
        "schedule.batch_warmup.tokens=0 must be > 0",
    ),
    ("schedule.batch_warmup.start_global_batch_size=16", "start_global_batch_size=16 must be in [1, "),
    ("schedule.batch_warmup.increment=null", "schedule.batch_warmup.increment is required with a batch ramp"),
    (
        "schedule.batch_warmup.increment=0",
        "schedule.batch_warmup.increment=0 must be a positive number of sequences",
    ),
    (
        "tokenizer.eos_token=<|endoftext|>",
        "cannot parse the override 'tokenizer.eos_token=<|endoftext|>' (token recognition error at: '<'); "
        "quote a value with special characters for Hydra inside the shell's quotes: "
        "'tokenizer.eos_token=\"<|endoftext|>\"'",
    ),
    (
        "schedule.warmup_steps=-3 schedule.min_lr=5",
        "schedule.warmup_steps=-3 must be >= 0; schedule.min_lr=5.0 is larger than optim.lr=",
    ),
    ("schedule.name=wsd schedule.decay_fraction=1.5", "schedule.decay_fraction=1.5 must be in [0, 1]"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be >= 0"),
    ("optim.name=sgd", "optim.name='sgd' is not one of adamw"),
    ("model.hidden_size=0", "model.hidden_size=0 must be > 0"),
    ("model.num_heads=3", "model.hidden_size=64 is not divisible by model.num_heads=3"),
    ("model.num_kv_heads=3", "model.num_heads=2 is not divisible by model.num_kv_heads=3"),
    ("model.arch=mamba", "model.arch='mamba' is not one of llama, gpt2"),
    ("model.attn_implementation=magic", "model.attn_implementation='magic' is not one of"),
    ("model.vocab_size=100", "model.vocab_size=100 is smaller than the tokenizer's vocabulary"),
    ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_position_embeddings=1024"),
    ("data.seq_len=0", "data.seq_len=0 must be > 0"),
    ("data.format=xml", "data.format='xml' is not one of text, json, parquet"),
    ("data.sample_by=word", "data.sample_by='word' is not one of document, line, paragraph"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 must be in [0, 1)"),
    ("data.num_proc=0", "data.num_proc=0 must be > 0"),
    ("data.loader_workers=-1", "data.loader_workers=-1 must be >= 0"),
    ("tokenizer.train_vocab_size=0", "tokenizer.train_vocab_size=0 must be > 0"),
    ("tokenizer.path=/nonexistent/tok", "tokenizer.path: '/nonexistent/tok' is not a directory"),
    ("eval.batches=0", "eval.batches=0 must be > 0"),
    ("eval.every=-5", "eval.every=-5 must be >= 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be > 0"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0"),
    (
        "checkpoint.resume=/nonexistent/ckpt",
        "checkpoint.resume='/nonexistent/ckpt' is not auto, never, or a complete",
    ),
    ("checkpoint.resume=never", "checkpoint.resume=never, but"),
    ("parallel.zero_stage=3", "Key 'zero_stage' not in 'NoneParallelConfig'"),
    (
        "parallel=deepspeed parallel.reshard_after_forward=false",
        "Key 'reshard_after_forward' not in 'DeepSpeedConfig'",
    ),
    ("parallel=fsdp parallel.name=ddp", "parallel.name=ddp does not match the parallel config group"),
    (
        "parallel=deepspeed parallel.activation_checkpointing=true",
        "parallel.activation_checkpointing is for ddp/fsdp",
    ),
    (
        "parallel=deepspeed train.nonfinite=skip",
        "train.nonfinite=skip is not supported with parallel=deepspeed",
    ),
    (
        "parallel=deepspeed parallel.ds_config=/nonexistent.json",
        "parallel.ds_config='/nonexistent.json' is not a",
    ),
    ("parallel.timeout_s=0", "parallel.timeout_s=0.0 must be a finite number of seconds > 0"),
    ("parallel.timeout_s=nan", "parallel.timeout_s=nan must be a finite number of seconds > 0"),
    ("parallel.timeout_s=inf", "parallel.timeout_s=inf must be a finite number of seconds > 0"),
    ("parallel.hang_timeout_s=inf", "parallel.hang_timeout_s=inf must be a finite number of seconds > 0"),
    ("parallel.activation_checkpointing_every=0", "parallel.activation_checkpointing_every=0 must be >= 1"),
    ("train.device=tpu", "train.device='tpu' is not one of auto, cpu, cuda"),
    ("train.dtype=float8", "train.dtype='float8' is not one of auto, float32, bfloat16"),
    ("train.nonfinite=ignore", "train.nonfinite='ignore' is not one of skip, abort"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips=0 must be >= 1"),
    ("logging.every=0", "logging.every=0 must be > 0"),
    ("logging.wandb.mode=sometimes", "logging.wandb.mode='sometimes' is not one of"),
    (
        "model.hidden_size=128",
        "was written with a different model (model.hidden_size: checkpoint 64 vs now 128)",
    ),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan must be a finite number"),
    ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
    ("seed=-1", "seed=-1 must be in [0, 2**32)"),
    ("train.max_steps=99999999999", "train.max_steps=99999999999 is beyond 1e+09"),
    ("hydra.run.dir=/dev/null", "hydra.run.dir='/dev/null' is a file, not a directory"),
]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, small_corpus):
    """Files that are not usable corpora or tokenizers."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.jsonl").write_text("")
    (d / "emptydir").mkdir()
    rng = random.Random(0)
    (d / "binary.txt").write_bytes(bytes(rng.randrange(256) for _ in range(20000)))
    (d / "badutf8.txt").write_bytes(b"hello \xff\xfe world\n" * 500)
    (d / "notext.jsonl").write_text(
        "".join(json.dumps({"content": "some text " * 50}) + "\n" for _ in range(50))
    )
    (d / "shortdocs.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(50)))
    (d / "tiny.jsonl").write_text(json.dumps({"text": "just a few words here"}) + "\n")
    (d / "malformed.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    (d / "corrupt.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-gzip" * 10)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["abc " * 100] * 20}), d / "nocol.parquet")
    (d / "tokdir").mkdir()
    (d / "tokdir" / "vocab.json").write_text("{}")
    return d


BAD_DATA = [  # (overrides with {d} = the bad-data directory, text the error line must contain)
    ("data.path={d}/empty.jsonl", "empty.jsonl' is empty (0 bytes)"),
    ("data.path={d}/emptydir/*.jsonl", "emptydir/*.jsonl' matches no file"),
    ("data.path={d}/emptydir", "emptydir' holds no .txt/.json/.jsonl/.parquet file"),
    ("data.path={d}/binary.txt", "cannot read {d}/binary.txt as text: UnicodeDecodeError"),
    ("data.path={d}/badutf8.txt", "cannot read {d}/badutf8.txt as text: UnicodeDecodeError"),
    (
        "data.path={d}/notext.jsonl",
        "data.text_field='text': no such column in '{d}/notext.jsonl' (columns: content)",
    ),
    (
        "data.path={d}/nocol.parquet",
        "data.text_field='text': no such column in '{d}/nocol.parquet' (columns: body)",
    ),
    ("data.path={d}/shortdocs.jsonl", "every document of {d}/shortdocs.jsonl is empty (0 tokens)"),
    ("data.path={d}/tiny.jsonl", "the corpus is too small for one batch"),
    ("data.path={d}/malformed.jsonl", "cannot read {d}/malformed.jsonl as json"),
    ("data.path={d}/corrupt.json.gz", "cannot read {d}/corrupt.json.gz as json"),
    ("data.path={corpus} data.format=parquet", "as parquet"),
    ("tokenizer.path={d}/tokdir", "tokenizer.path: cannot load a tokenizer from '{d}/tokdir'"),
    ("data.path={d}/nothing-here.jsonl", "nothing-here.jsonl' matches no file"),
]


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, small_corpus):
    """A finished run (checkpoints, metrics, log) that every bad invocation is pointed at."""
    run_dir = tmp_path_factory.mktemp("existing") / "run"
    train_small(
        run_dir, small_corpus, "train.max_steps=6", "checkpoint.every=3", "checkpoint.export_hf=false"
    )
    return run_dir


def _snapshot(run_dir) -> dict:
    out = {}
    for dirpath, _, names in os.walk(run_dir):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, run_dir)] = (
                    hashlib.sha256(f.read()).hexdigest(),
                    os.stat(p).st_mtime_ns,
                )
    return out


def _attempt(argv, run_dir, capsys, monkeypatch) -> tuple[int, list[str]]:
    """What ``python -m harness.train ARGV`` does, in-process; building a model is a test failure."""

    def no_model(*a, **k):
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(harness.trainer, "build_model", no_model)
    capsys.readouterr()
    try:
        harness_train.check_overrides(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    else:
        code = harness_train.run_cli(compose(*argv), str(run_dir), argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(overrides, message, existing_run, small_corpus, capsys, monkeypatch):
    before = _snapshot(existing_run)
    argv = [*SMALL, f"data.path={small_corpus}", "train.max_steps=6", *overrides.split()]
    code, errors = _attempt(argv, existing_run, capsys, monkeypatch)
    assert code == 2 and len(errors) == 1, errors
    assert message in errors[0], errors[0]
    assert _snapshot(existing_run) == before


@pytest.mark.parametrize("overrides, message", BAD_DATA, ids=[c[0].split("/")[-1] for c in BAD_DATA])
def test_bad_data(overrides, message, bad_data, existing_run, small_corpus, capsys, monkeypatch):
    before = _snapshot(existing_run)
    fill = {"d": bad_data, "corpus": small_corpus}
    argv = [*SMALL, f"data.path={small_corpus}", "train.max_steps=6", *overrides.format(**fill).split()]
    code, errors = _attempt(argv, existing_run, capsys, monkeypatch)
    assert code == 2 and len(errors) == 1, errors
    assert message.format(**fill) in errors[0], errors[0]
    assert _snapshot(existing_run) == before


def test_counts():
    assert len(BAD_CONFIGS) >= 40 and len(BAD_DATA) >= 10


@pytest.mark.parametrize(
    "override, message",
    [("slurm.nodes=0", "slurm.nodes=0 must be >= 1"), ("slurm.nodes=null", "full_key: slurm.nodes")],
)
def test_slurm_config_without_nodes(tmp_path, override, message):
    with pytest.raises(HarnessError, match=message):
        slurm.submit([override, "slurm.dry_run=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_a_document_mask_this_transformers_cannot_apply_is_refused_before_a_model(
    existing_run, small_corpus, tmp_path, capsys, monkeypatch
):
    """The one check that needs a part (harness.model reads the installed transformers) runs after
    the config's own, in the trainer, the plan and the Slurm submitter, before anything is built."""
    import transformers

    from harness.plan import make_plan

    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # as in transformers < 4.56
    message = (
        "data.document_mask=true needs transformers >= 4.56 (packed sequences from position_ids); "
        f"this is {transformers.__version__}: upgrade it or set data.document_mask=false"
    )
    before = _snapshot(existing_run)
    argv = [*SMALL, f"data.path={small_corpus}", "train.max_steps=6", "data.document_mask=true"]
    assert _attempt(argv, existing_run, capsys, monkeypatch) == (2, [f"error: {message}"])
    assert _snapshot(existing_run) == before
    with pytest.raises(ConfigError) as e:
        make_plan(to_object(compose(*argv, schema="plan")))
    assert str(e.value) == message
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(f"{message} (world size 1 = slurm.nodes=1 x ")):
        slurm.submit(
            [*argv, "slurm.nodes=1", "slurm.gpus_per_node=1", "slurm.dry_run=true", f"hydra.run.dir={run}"]
        )
    assert not run.exists()


@pytest.mark.slow
def test_command_line_prints_one_line_and_exits_2(existing_run, bad_data):
    before = _snapshot(existing_run)
    for args, message in (
        (["train.max_stepz=5"], "train.max_stepz"),
        (["+foo=1"], "foo is not a config key"),
        ([f"data.path={bad_data}/binary.txt"], "binary.txt as text"),
        ([f"data.path={bad_data}/tiny.jsonl", "data.format=parquet"], "tiny.jsonl as parquet"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "harness.train", *SMALL, *args, f"hydra.run.dir={existing_run}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert _snapshot(existing_run) == before


def test_a_file_datasets_cannot_parse_is_our_one_line_without_datasets_own(
    bad_data, small_corpus, capfd, caplog, monkeypatch
):
    """datasets logged 'Failed to read schema from ...' (to stderr and to the root logger) before our
    error line: the read's log records are dropped when it fails, given out when it succeeds."""
    import logging

    import datasets

    from harness.data.sources import Corpus, load_corpus

    cache = str(bad_data / "cache")
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG), pytest.raises(DataError) as e:
        load_corpus(Corpus((small_corpus,), "parquet"), "text", "document", "train", cache)
    assert str(e.value).startswith(f"data.path: cannot read {small_corpus} as parquet: ArrowInvalid: ")
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.name.startswith("datasets")] == []
    real_load = datasets.load_dataset

    def load_with_a_warning(*args, **kwargs):
        logging.getLogger("datasets.load").warning("a warning of a read that succeeds")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_with_a_warning)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_corpus(Corpus((small_corpus,), "json"), "text", "document", "train", cache)
    assert [r.getMessage() for r in caplog.records] == ["a warning of a read that succeeds"]
