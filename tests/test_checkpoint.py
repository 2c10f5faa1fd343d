"""Atomic checkpoints: completeness, keep_last, resume lookup, weights-only loading."""

import json
import os

import pytest
import torch
from conftest import compose

from harness import checkpoint as ckpt
from harness.errors import CheckpointError


def _save(root, step, keep=3):
    return ckpt.save_checkpoint(
        str(root), step, {"model": {"w": torch.full((4,), float(step))}}, {"step": step}, keep
    )


def test_save_load_roundtrip_and_keep_last(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [30, 40]
    objs, state = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path)), names=("model",))
    assert state == {"step": 40} and torch.equal(objs["model"]["w"], torch.full((4,), 40.0))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_incomplete_checkpoints_are_never_chosen(tmp_path, caplog):
    ckpt._warned.clear()
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    # a kill mid-save leaves a temporary directory, a missing manifest, or a truncated file
    os.makedirs(tmp_path / ".tmp-step_00000030-999")
    os.makedirs(tmp_path / "step_00000040")
    torch.save({"w": torch.zeros(1)}, tmp_path / "step_00000040" / "model.pt")
    assert ckpt.latest_checkpoint(str(tmp_path)) == newest
    with open(os.path.join(newest, "model.pt"), "r+b") as f:
        f.truncate(10)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000010")
    assert "skipping incomplete checkpoint" in caplog.text and "step_00000040" in caplog.text
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(newest)


def test_same_step_saved_twice_is_replaced(tmp_path):
    _save(tmp_path, 10)
    path = ckpt.save_checkpoint(
        str(tmp_path), 10, {"model": {"w": torch.ones(2)}}, {"step": 10, "again": True}, 3
    )
    assert json.load(open(os.path.join(path, ckpt.STATE)))["again"] is True
    assert len(ckpt.list_checkpoints(str(tmp_path))) == 1


def test_unwritable_directory_is_a_clear_error_and_keeps_previous(tmp_path):
    good = _save(tmp_path, 10)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*file/step_00000020"):
        _save(blocker, 20)
    assert ckpt.latest_checkpoint(str(tmp_path)) == good


def test_loading_refuses_pickled_code(tmp_path):
    path = _save(tmp_path, 10)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, os.path.join(path, "model.pt"))
    manifest = json.load(open(os.path.join(path, ckpt.MANIFEST)))
    manifest["files"]["model.pt"] = os.path.getsize(os.path.join(path, "model.pt"))
    json.dump(manifest, open(os.path.join(path, ckpt.MANIFEST), "w"))
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(path, names=("model",))


def test_a_checkpoint_of_another_format_suggests_a_new_run_name_first():
    """A command that lands on another backend's run directory (the README's commands after ``make
    train`` did) is told first how to start a new run."""
    from types import SimpleNamespace

    backend = SimpleNamespace(name="fsdp", checkpoint_format="dcp", reshardable=True)
    manager = ckpt.CheckpointManager(None, "run", SimpleNamespace(world_size=2), backend, {}, None)
    with pytest.raises(CheckpointError) as e:
        manager._check_format(
            "runs/default/checkpoints/step_00000200", {"parallel": "deepspeed", "world_size": 2}
        )
    assert str(e.value) == (
        "checkpoint runs/default/checkpoints/step_00000200 was written by parallel=deepspeed, which "
        "parallel=fsdp cannot load (deepspeed format); for a new run give it a new name (run_name=<new "
        "name>, or hydra.run.dir), to continue this one resume with parallel=deepspeed, or export it "
        "(python -m harness.export runs/default/checkpoints/step_00000200 OUT) and start a new run from it"
    )


# -- one format for one process, DDP and FSDP2 ------------------------------------------------------

# Fixed global batch of 8 (no ramp): 4 x 2 accumulated on one process, 2 x 2 on each of two ranks.
FIXED = ["schedule.batch_warmup.start_global_batch_size=null", "eval.every=0", "checkpoint.export_hf=false"]
KEEP = ("step", "lr", "tokens_total", "global_batch_size")


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.slow
@pytest.mark.distributed
def test_one_process_checkpoint_continues_on_two_ranks_and_back(tmp_path, small_corpus):
    """A one-process checkpoint resumes under DDP and FSDP2 at world size 2 (the same steps, LR and
    tokens as the one-process run that continued it; losses to 1e-5, fp32 reduction order), and an
    FSDP2 world-2 checkpoint resumes on one process with exactly its weights and optimizer state."""
    from conftest import SMALL, checkpoint_state, read_metrics, torchrun_train, train_small
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from harness.trainer import Trainer

    one = tmp_path / "one"
    train_small(
        one, small_corpus, *FIXED, "train.max_steps=8", "checkpoint.every=4", "train.micro_batch_size=4"
    )
    ref = read_metrics(one)[4:]
    start = one / "checkpoints" / "step_00000004"
    assert (start / "dcp").is_dir() and not (start / "model.pt").exists()
    for backend in ("ddp", "fsdp"):
        args = [*SMALL, *FIXED, f"data.path={small_corpus}", "train.max_steps=8", "train.micro_batch_size=2"]
        run = tmp_path / backend
        proc = torchrun_train(
            2, *args, f"parallel={backend}", f"checkpoint.resume={start}", f"hydra.run.dir={run}"
        )
        assert f"resumed from {start} at step 4" in proc.stdout + proc.stderr
        got = read_metrics(run)
        assert [{k: r[k] for k in KEEP} for r in got] == [{k: r[k] for k in KEEP} for r in ref], backend
        assert max(_rel(a["loss"], b["loss"]) for a, b in zip(got, ref)) < 1e-5, backend
    # back to one process: exactly the FSDP2 run's state after the load
    sharded = tmp_path / "fsdp" / "checkpoints" / "step_00000008"
    cfg = compose(
        *SMALL, *FIXED, f"data.path={small_corpus}", "train.max_steps=10", f"checkpoint.resume={sharded}"
    )
    with Trainer.from_config(cfg, str(tmp_path / "back")) as trainer:
        saved = checkpoint_state(sharded)
        model, optim = get_state_dict(trainer.model, trainer.optimizer)
        assert saved["model"].keys() == model.keys() and len(model) == 21
        assert all(torch.equal(saved["model"][k], model[k]) for k in model)
        assert saved["optim"]["state"].keys() == optim["state"].keys() and len(optim["state"]) == 20
        for name, moments in optim["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(moments[key], saved["optim"]["state"][name][key]), (name, key)
        assert trainer.train().step == 10


def test_a_one_process_checkpoint_of_the_older_format_still_resumes(tmp_path, small_corpus, monkeypatch):
    """A run directory written before one-process checkpoints were DCP (``model.pt``, format
    ``torch``) continues bitwise as an uninterrupted run."""
    from conftest import read_metrics, train_small

    from harness.parallel.base import Backend
    from harness.parallel.none import SingleProcess

    train_small(tmp_path / "straight", small_corpus, "train.max_steps=8", "checkpoint.export_hf=false")
    with monkeypatch.context() as m:  # the one-process backend as it was
        m.setattr(SingleProcess, "save", Backend.save)
        m.setattr(SingleProcess, "written_files", Backend.written_files)
        m.setattr(SingleProcess, "async_save", False)
        m.setattr(SingleProcess, "checkpoint_format", "torch")
        train_small(tmp_path / "old", small_corpus, "train.max_steps=8", "train.stop_at_step=4")
    old = tmp_path / "old" / "checkpoints" / "step_00000004"
    assert (old / "model.pt").is_file() and ckpt.read_state(str(old))["format"] == "torch"
    train_small(tmp_path / "old", small_corpus, "train.max_steps=8", "checkpoint.export_hf=false")
    keep = ("step", "loss", "grad_norm", "lr", "tokens_total")
    got, want = read_metrics(tmp_path / "old"), read_metrics(tmp_path / "straight")
    assert [{k: r[k] for k in keep} for r in got] == [{k: r[k] for k in keep} for r in want]
