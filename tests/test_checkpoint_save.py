"""Asynchronous checkpoint saves (``harness.saving``): kills at each point of a save resume bitwise, a
failed save on one rank ends every rank with one line, asynchronous and synchronous checkpoints are the
same bytes of state, and at most one save is in flight."""

import errno
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, SMALL, checkpoint_state, checkpoints, read_metrics, train_small

from harness import checkpoint as ckpt

KEEP = ("step", "loss", "grad_norm", "lr", "tokens_total")
ARGS = [
    "parallel=fsdp",
    "train.max_steps=8",
    "checkpoint.every=3",
    "checkpoint.export_hf=false",
    "eval.every=0",
]


def _rows(run_dir):
    return [{k: r[k] for k in KEEP} for r in read_metrics(run_dir)]


def _torchrun(run_dir, corpus, *args, fault=None, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "harness.train", *SMALL, f"data.path={corpus}", *ARGS, *args, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("HARNESS_FAULT", None)
    if fault:
        env["HARNESS_FAULT"] = fault
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus):
    """An uninterrupted asynchronous run: fsdp at world 2, 8 steps, checkpoints at 3, 6 and 8."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = _torchrun(run_dir, small_corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.distributed
def test_manifest_entries_name_the_rank_that_wrote_them(straight):
    files = json.loads((straight / "checkpoints" / "step_00000008" / "manifest.json").read_text())["files"]
    ranks = {name: entry["rank"] for name, entry in files.items()}
    assert ranks["dcp/__0_0.distcp"] == 0 and ranks["dcp/__1_0.distcp"] == 1
    assert ranks["rng/rank_0.pt"] == 0 and ranks["rng/rank_1.pt"] == 1
    assert ranks["dcp/.metadata"] == 0 and ranks["trainer_state.json"] == 0
    assert {n for n, r in ranks.items() if r == 1} == {"dcp/__1_0.distcp", "rng/rank_1.pt"}
    assert all(len(e["sha256"]) == 64 for e in files.values())
    assert ckpt.verify(str(straight / "checkpoints" / "step_00000008")) is None
    log = (straight / "train.log").read_text()
    assert log.count("in the background)") == 3  # steps 3, 6 and 8, asynchronous


@pytest.mark.slow
@pytest.mark.distributed
def test_a_kill_at_each_point_of_an_async_save_resumes_bitwise(straight, tmp_path, small_corpus):
    """SIGKILL of one rank as step 6's save is staged (rank 1), while its files are written in the
    background (rank 1), and on rank 0 once every rank's hashes are in, before the manifest: each time
    step 3 stays the newest complete checkpoint, and the run that finishes logs the uninterrupted
    run's losses bitwise."""
    run_dir = tmp_path / "run"
    for fault in ("kill_staging:6:1", "kill_writing:6:1", "kill_finishing:6"):
        proc = _torchrun(run_dir, small_corpus, fault=fault)
        assert proc.returncode != 0, (fault, proc.stderr[-3000:])
        assert checkpoints(run_dir) == ["step_00000003"], fault
        assert ckpt.latest_checkpoint(str(run_dir / "checkpoints"), check=True).endswith("step_00000003")
        assert os.path.isdir(run_dir / "checkpoints" / ".tmp-step_00000006"), fault  # never renamed
    proc = _torchrun(run_dir, small_corpus)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(run_dir) == _rows(straight)
    assert checkpoints(run_dir) == ["step_00000006", "step_00000008"]
    assert not [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".tmp-")]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_save_that_fails_on_rank_1_ends_both_ranks_with_one_line(straight, tmp_path, small_corpus):
    run_dir, codes = tmp_path / "run", tmp_path / "codes"
    codes.mkdir()
    proc = _torchrun(
        run_dir, small_corpus, fault="checkpoint_enospc:6:1", env={"HARNESS_EXIT_CODE_DIR": str(codes)}
    )
    assert proc.returncode != 0
    assert {p.name: p.read_text() for p in codes.iterdir()} == {"rank_0": "74", "rank_1": "74"}
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    host = socket.gethostname()
    assert errors == [
        f"error: checkpoint save failed on rank 1 (host {host}): {run_dir}/checkpoints/step_00000006: "
        "OSError: No space left on device"
    ], proc.stderr[-3000:]
    assert checkpoints(run_dir) == ["step_00000003"]
    assert ckpt.verify(str(run_dir / "checkpoints" / "step_00000003")) is None
    rerun = _torchrun(run_dir, small_corpus)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_00000003 at step 3" in rerun.stdout + rerun.stderr
    assert _rows(run_dir) == _rows(straight)


@pytest.mark.slow
@pytest.mark.distributed
def test_async_and_sync_checkpoints_hold_the_same_state_and_resume_alike(straight, tmp_path, small_corpus):
    """``checkpoint.async_save=false`` writes the same tensors as the asynchronous save (bitwise, model
    and optimizer, at steps 6 and 8), and a run stopped at 6 under one mode and resumed under the other
    logs the uninterrupted run's losses."""
    sync = tmp_path / "sync"
    proc = _torchrun(sync, small_corpus, "checkpoint.async_save=false", "train.stop_at_step=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(training blocked" in (sync / "train.log").read_text()
    assert "in the background" not in (sync / "train.log").read_text()
    proc = _torchrun(sync, small_corpus)  # resumed asynchronously
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(sync) == _rows(straight)
    for step in ("step_00000006", "step_00000008"):
        a = checkpoint_state(straight / "checkpoints" / step)
        b = checkpoint_state(sync / "checkpoints" / step)
        assert a["model"].keys() == b["model"].keys() and len(a["model"]) == 21
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        sa, sb = a["optim"]["state"], b["optim"]["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[p][k], sb[p][k]) for p in sa for k in sa[p])


def test_at_most_one_save_in_flight(tmp_path, small_corpus, monkeypatch):
    """checkpoint.every=1 with a finisher slower than a step (checkpoint_sleep): each save is staged
    only once the previous one is complete, inside the watchdog's ``checkpoint`` phase."""
    from harness import phases, saving

    events = []
    stage, commit = saving._Save.stage, saving.commit

    def recording_stage(self):
        events.append(("stage", self.step, phases.current()[0]))
        stage(self)

    def recording_commit(tmp, final, root, step, files, faults):
        commit(tmp, final, root, step, files, faults)
        events.append(("complete", step, os.path.isdir(final)))

    monkeypatch.setattr(saving._Save, "stage", recording_stage)
    monkeypatch.setattr(saving, "commit", recording_commit)
    monkeypatch.setenv("HARNESS_FAULT", "checkpoint_sleep:0.3")
    train_small(
        tmp_path / "run",
        small_corpus,
        "train.max_steps=4",
        "checkpoint.every=1",
        "checkpoint.export_hf=false",
    )
    assert events == [e for s in (1, 2, 3, 4) for e in (("stage", s, "checkpoint"), ("complete", s, True))]
    assert checkpoints(tmp_path / "run") == ["step_00000003", "step_00000004"]


def test_one_process_save_failure_is_one_line_and_status_74(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.train", *SMALL, f"data.path={small_corpus}", "train.max_steps=8"]
    cmd += ["checkpoint.every=3", "checkpoint.export_hf=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_FAULT": "checkpoint_enospc:6"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 74, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: checkpoint save failed on rank 0 (host {socket.gethostname()}): "
        f"{run_dir}/checkpoints/step_00000006: OSError: No space left on device"
    ]
    assert checkpoints(run_dir) == ["step_00000003"]
    assert ckpt.verify(str(run_dir / "checkpoints" / "step_00000003")) is None


def _saver(tmp_path, rank):
    import torch.distributed as dist

    from harness.faults import Faults
    from harness.saving import Saver

    env = SimpleNamespace(rank=rank, world_size=2, is_main=rank == 0)
    backend = SimpleNamespace(async_save=True, name="fsdp", cfg=SimpleNamespace(timeout_s=60))
    return Saver(str(tmp_path), env, backend, Faults(), 2, True, store=dist.HashStore())


def _failing(monkeypatch):
    from harness import failures

    lines = []

    def fail(line, error=None):
        lines.append(line)
        raise SystemExit(74)

    monkeypatch.setattr(failures, "fail", fail)
    return lines


def test_a_checkpoint_exception_in_the_background_write_is_the_failing_ranks_line(tmp_path, monkeypatch):
    """DCP's CheckpointException (a BaseException) out of the write's future, in the background
    thread: the rank it names as failed announces its own error."""
    from concurrent.futures import Future

    from torch.distributed.checkpoint.api import CheckpointException

    from harness.saving import _Save

    lines = _failing(monkeypatch)
    saver = _saver(tmp_path, rank=1)
    job = _Save(saver, 0, 6, "{}", tokenizer=None)
    job.future = Future()
    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    job.future.set_exception(CheckpointException("write failed", {1: (disk_full, None)}))
    with pytest.raises(SystemExit):
        job._run()
    host = socket.gethostname()
    assert lines == [
        f"checkpoint save failed on rank 1 (host {host}): {tmp_path}/step_00000006: OSError: No space left "
        "on device"
    ]


def test_a_checkpoint_exception_of_another_rank_is_left_to_that_rank(tmp_path, monkeypatch):
    """Rank 0 sees rank 1's failure in DCP's exception: it waits for rank 1's own line (here it never
    comes), then names rank 1 itself, saying who saw it."""
    from torch.distributed.checkpoint.api import CheckpointException

    from harness import saving

    lines = _failing(monkeypatch)
    monkeypatch.setattr(saving, "ANNOUNCE_WAIT_S", 0.05)
    saver = _saver(tmp_path, rank=0)
    saver.poll_s = 0.001
    job = SimpleNamespace(final=f"{tmp_path}/step_00000006")
    e = CheckpointException("write failed", {1: (OSError(errno.EIO, os.strerror(errno.EIO)), None)})
    with pytest.raises(SystemExit):
        saver.fail(job, e)
    assert lines == [
        f"checkpoint save failed on rank 1 (host ?): {tmp_path}/step_00000006: OSError: Input/output error "
        "(seen by rank 0)"
    ]


def test_the_job_store_serves_about_500_polls_a_second_at_any_world_size():
    """Every rank polls the failure key (and, waiting, a save's keys) every poll_interval seconds."""
    from harness.failures import poll_interval

    assert [poll_interval(w) for w in (1, 2, 500, 512, 4096)] == [1.0, 1.0, 1.0, 1.024, 8.192]
    assert 4096 / poll_interval(4096) == 500
