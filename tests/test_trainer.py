"""The Trainer's shape: parts built from their sections, hooks in order, state round trip, the mesh,
the backend registry, and the small behaviours of the redesign (WANDB_MODE, no DeepSpeed import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, SMALL, compose

from harness.errors import ConfigError
from harness.hooks import (
    CheckpointHook,
    EvalHook,
    ExportHook,
    FaultHook,
    HangWatchdog,
    LossSpikeHook,
    MetricsHook,
    MixtureHook,
    ProfilerHook,
    RankStatsHook,
    StopHook,
)
from harness.parallel import BACKENDS, ParallelDims, backend_class
from harness.trainer import Trainer


@pytest.fixture
def trainer(tmp_path, small_corpus):
    cfg = compose(*SMALL, f"data.path={small_corpus}", "train.max_steps=4", "checkpoint.export_hf=false")
    with Trainer.from_config(cfg, str(tmp_path)) as t:
        yield t


def test_the_trainer_owns_its_parts_and_calls_the_hooks_in_order(trainer):
    assert [type(h) for h in trainer.hooks] == [
        FaultHook,
        MixtureHook,
        EvalHook,
        LossSpikeHook,
        RankStatsHook,
        ProfilerHook,
        MetricsHook,
        StopHook,
        CheckpointHook,
        ExportHook,
        HangWatchdog,
    ]
    assert trainer.backend.name == "none" and trainer.model is trainer.backend.model
    assert trainer.optimizer is trainer.backend.optimizer and trainer.max_steps == 4
    calls = []

    class Spy(EvalHook.__base__):
        def on_step_start(self, t, info):
            calls.append(("start", info.step))

        def on_step_end(self, t, record):
            calls.append(("end", record.step, t.state.step))

    trainer.hooks.insert(0, Spy())
    state = trainer.train()
    assert state.step == 4
    assert calls == [(k, *v) for s in range(1, 5) for k, v in (("start", (s,)), ("end", (s, s)))]


def test_state_dict_round_trip(trainer):
    trainer.train()
    meta = trainer.state_dict()
    assert meta["step"] == 4 and meta["max_steps"] == 4 and meta["scheduler"]["last_epoch"] == 4
    trainer.state.step = 0
    trainer.load_state_dict(meta)
    assert trainer.state.step == 4 and trainer.scheduler.last_epoch == 4


def test_parallel_dims_multiply_to_the_world_size():
    cfg = compose("parallel=fsdp", "parallel.dp_replicate=2")
    from harness.config import to_object

    dims = ParallelDims.from_config(to_object(cfg).parallel, 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 4, 1, 8)
    ddp = ParallelDims.from_config(to_object(compose("parallel=ddp")).parallel, 4)
    assert (ddp.dp_replicate, ddp.dp_shard) == (4, 1)
    with pytest.raises(ConfigError, match=r"dp_replicate=2 x dp_shard=2 x tp=1 = 4 != world_size=8"):
        ParallelDims(2, 2, 1, 8)


def test_backends_come_from_the_registry_with_their_checkpoint_formats():
    assert set(BACKENDS) == {"none", "ddp", "fsdp", "deepspeed"}
    formats = {name: backend_class(name).checkpoint_format for name in BACKENDS}
    assert formats == {"none": "dcp", "ddp": "dcp", "fsdp": "dcp", "deepspeed": "deepspeed"}
    assert not backend_class("deepspeed").reshardable and backend_class("fsdp").reshardable


@pytest.mark.parametrize(
    "env,key,expected",
    [
        ({"WANDB_MODE": "disabled"}, "k", "disabled"),
        ({"WANDB_MODE": "offline"}, "k", "offline"),
        ({}, "k", "online"),
        ({}, None, "offline"),
        ({"WANDB_MODE": "dryrun"}, None, "offline"),
    ],
)
def test_wandb_auto_honours_wandb_mode(monkeypatch, env, key, expected):
    from harness.metrics import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    assert wandb_mode("auto") == expected
    assert wandb_mode("offline") == "offline"


def test_wandb_mode_disabled_in_the_environment_starts_no_wandb(tmp_path, small_corpus, monkeypatch):
    from conftest import train_small

    monkeypatch.setenv("WANDB_MODE", "disabled")
    train_small(
        tmp_path, small_corpus, "train.max_steps=4", "logging.wandb.mode=auto", "checkpoint.export_hf=false"
    )
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id").exists()


@pytest.mark.slow
def test_a_one_process_run_neither_imports_deepspeed_nor_prints_its_warning(tmp_path, small_corpus):
    code = (
        "import sys\n"
        "from harness.train import main\n"
        f"sys.argv = ['harness.train', *{SMALL!r}, 'data.path={small_corpus}', 'train.max_steps=4',\n"
        f"            'checkpoint.export_hf=false', 'hydra.run.dir={tmp_path}/run']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('deepspeed imported:', 'deepspeed' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert "deepspeed imported: False" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.train",
            *SMALL,
            f"data.path={small_corpus}",
            "train.max_steps=4",
            f"hydra.run.dir={tmp_path}/run2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and (tmp_path / "run2" / "hf" / "config.json").is_file()
    assert "Setting accelerator" not in proc.stdout + proc.stderr  # transformers' export imports DeepSpeed


def test_the_training_path_imports_no_leaf_and_no_launcher_dependency():
    """plan, report and the cluster launcher are leaves; psutil and DeepSpeed stay out of training."""
    code = (
        "import sys, harness.train, harness.trainer\n"
        "print(sorted(m for m in sys.modules if m.startswith(('harness.plan', 'harness.report', "
        "'harness.cluster', 'psutil', 'deepspeed'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
