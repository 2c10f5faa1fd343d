"""Atomic checkpoints: completeness, keep_last, resume lookup, weights-only loading."""

import json
import os

import pytest
import torch

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
