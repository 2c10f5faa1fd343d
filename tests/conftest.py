"""Shared fixtures: an isolated cache, a small generated corpus, Hydra composition and
in-process training runs at a size that fits 2 CPU cores."""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO / "configs")
# two training processes on this machine: append the module and its arguments
TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train_command(nproc: int, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node <nproc> -m harness.train <args>``."""
    return [*TORCHRUN2[:-1], f"--nproc_per_node={nproc}", "-m", "harness.train", *args]


def torchrun_train(nproc: int, *args: str, env: dict | None = None, check: bool = True):
    """Run :func:`train_command` to completion (one thread per process); the CompletedProcess."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        train_command(nproc, *args), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# Small enough for seconds per run on 2 cores, big enough to exercise every feature.
SMALL = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "data.seq_len=32",
    "tokenizer.train_vocab_size=300",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "schedule.warmup_steps=2",
    "schedule.batch_warmup.start_global_batch_size=4",
    "schedule.batch_warmup.increment=2",
    "schedule.batch_warmup.steps=4",
    "eval.every=5",
    "eval.batches=2",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
    "checkpoint.every=5",
]


@pytest.fixture(scope="session", autouse=True)
def harness_cache(tmp_path_factory):
    """Every test shares one tokenizer/token cache outside the user's home."""
    path = os.environ.get("HARNESS_CACHE_DIR") or str(tmp_path_factory.mktemp("harness_cache"))
    os.environ["HARNESS_CACHE_DIR"] = path
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """A JSON-lines corpus generated from 12 standard-library modules (about 250 KB of text)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    names = [
        "abc",
        "bisect",
        "calendar",
        "colorsys",
        "copy",
        "dataclasses",
        "fractions",
        "heapq",
        "numbers",
        "queue",
        "shlex",
        "textwrap",
    ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for name in names:
            with open(os.path.join(stdlib, f"{name}.py"), encoding="utf-8") as src:
                f.write(json.dumps({"text": src.read(), "id": name}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora and tokenizers of ``../shared/data`` (see its SOURCES.md)."""
    for candidate in (
        REPO.parent / "shared" / "data",
        Path(os.environ.get("HARNESS_SHARED_DATA", "/nonexistent")),
    ):
        if (candidate / "SOURCES.md").is_file():
            return candidate
    pytest.skip("../shared/data (real corpora and tokenizers) is not available")


SCHEMA_MODULES = {
    "train": "harness.config",
    "plan": "harness.plan",
    "slurm": "harness.cluster.slurm",
    "prepare": "harness.prepare_data",
}


def compose(*overrides: str, schema: str = "train"):
    """Compose ``configs/train.yaml`` with overrides, as ``python -m harness.train`` would (or as the
    command line whose schema is ``schema`` would: ``plan``, ``slurm``, ``prepare``)."""
    import importlib

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    importlib.import_module(SCHEMA_MODULES[schema])  # registers the schema (and the resolvers)
    extra = [] if schema == "train" else [f"schema={schema}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[*extra, *overrides])


def train_small(run_dir, corpus: str, *overrides: str):
    """Train the small test model in-process; returns the final TrainState."""
    from harness.train import run

    cfg = compose(*SMALL, f"data.path={corpus}", *overrides)
    return run(cfg, str(run_dir))


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoints(run_dir) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*")))


def checkpoint_state(path) -> dict:
    """A checkpoint's ``{"model": state dict, "optim": optimizer state dict}`` on the CPU, from its
    ``dcp/`` (parallel=none|ddp|fsdp) or the older ``model.pt`` / ``optimizer.pt``. The optimizer's
    state and param groups are keyed by parameter name under DCP, by index in the older files."""
    import tempfile

    import torch

    path = Path(path)
    if not (path / "dcp").is_dir():
        load = lambda n: torch.load(path / f"{n}.pt", map_location="cpu", weights_only=True)  # noqa: E731
        return {"model": load("model"), "optim": load("optimizer")}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path / "dcp", os.path.join(tmp, "state.pt"))
        return torch.load(os.path.join(tmp, "state.pt"), map_location="cpu", weights_only=True)
