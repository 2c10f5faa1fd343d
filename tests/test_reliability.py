"""Reliability: damaged and crafted checkpoints, a full disk, non-finite steps, loss spikes, secrets,
a rank that dies (no hang), torchrun restarts, and kills at random moments (chaos) -- each fault
injected, each outcome checked against an uninterrupted run."""

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import REPO, SMALL, checkpoint_state, checkpoints, compose, read_metrics, train_small

from harness import checkpoint as ckpt
from harness.errors import CheckpointError, NonFiniteError

PY = sys.executable
KEEP = ("step", "loss", "grad_norm", "lr", "tokens_total")


def _rows(run_dir):
    return [{k: r[k] for k in KEEP} for r in read_metrics(run_dir)]


def _cli(*args, env=None, timeout=600):
    return subprocess.run(
        [PY, "-m", "harness.train", *SMALL, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


# -- checkpoint integrity -------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    train_small(
        run_dir, small_corpus, "train.max_steps=6", "checkpoint.every=3", "checkpoint.export_hf=false"
    )
    assert checkpoints(run_dir) == ["step_00000003", "step_00000006"]
    return run_dir


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(two_checkpoints, damage, caplog):
    root = two_checkpoints / "checkpoints"
    target = root / "step_00000006" / "dcp" / "__0_0.distcp"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte changed: only the checksum sees it
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    assert ckpt.verify(str(root / "step_00000003")) is None
    assert "dcp/__0_0.distcp" in ckpt.verify(str(root / "step_00000006"))
    with caplog.at_level("WARNING", logger="harness"):
        assert ckpt.latest_checkpoint(str(root), check=True) == str(root / "step_00000003")
    assert any("step_00000006" in r.getMessage() for r in caplog.records)  # the warning names it


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(two_checkpoints, small_corpus):
    root = two_checkpoints / "checkpoints"
    for step in ("step_00000003", "step_00000006"):
        (root / step / "dcp" / "__0_0.distcp").write_bytes(b"x" * 10)
    before = {p: p.read_bytes() for p in two_checkpoints.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="holds 2 checkpoint.* none is complete and intact"):
        train_small(two_checkpoints, small_corpus, "train.max_steps=8", "checkpoint.every=3")
    assert {p: p.read_bytes() for p in two_checkpoints.rglob("*") if p.is_file()} == before


def test_crafted_pickle_is_refused_before_it_runs(two_checkpoints, small_corpus, tmp_path):
    """A model.pt whose unpickling would run code, with a manifest that matches it (as an attacker
    would write it): the resume is refused naming the file, and the code never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = two_checkpoints / "checkpoints" / "step_00000006"
    torch.save({"weight": Payload()}, path / "model.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.pt"] = {
        "size": (path / "model.pt").stat().st_size,
        "sha256": ckpt._sha256(str(path / "model.pt")),
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="model.pt holds pickled objects other than tensors"):
        train_small(two_checkpoints, small_corpus, "train.max_steps=8", "checkpoint.every=3")
    # the DCP metadata path: a crafted .metadata is refused too
    dcp = tmp_path / "dcp_ckpt" / "dcp"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(
        CheckpointError, match=r"dcp/.metadata holds pickled objects .*refusing global posix.system"
    ):
        ckpt.scan_pickles(str(tmp_path / "dcp_ckpt"))
    assert not marker.exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    proc = _cli(
        f"data.path={small_corpus}",
        "train.max_steps=8",
        "checkpoint.every=3",
        f"hydra.run.dir={run_dir}",
        env={"HARNESS_FAULT": "checkpoint_enospc:6"},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 74 and lines[-1].startswith("error: checkpoint save failed on rank 0"), (
        proc.stderr[-2000:]
    )
    assert "step_00000006: OSError: No space left on device" in lines[-1]
    assert (
        checkpoints(run_dir) == ["step_00000003"]
        and ckpt.verify(str(run_dir / "checkpoints" / "step_00000003")) is None
    )
    # the failed save's directory is never renamed (the next complete save prunes it)
    assert [n for n in os.listdir(run_dir / "checkpoints") if n.startswith(".tmp-")] == [".tmp-step_00000006"]


def test_unwritable_checkpoint_directory_is_a_clear_error(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    proc = _cli(
        f"data.path={small_corpus}", "train.max_steps=4", "checkpoint.every=2", f"hydra.run.dir={run_dir}"
    )
    assert proc.returncode == 74, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint save failed on rank 0")
    assert "checkpoints/step_00000002: NotADirectoryError: Not a directory" in last


# -- numerical faults -----------------------------------------------------------------------------


def test_nonfinite_step_is_skipped_without_touching_the_weights(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("HARNESS_FAULT", "nan_loss:4")
    run_dir = tmp_path / "run"
    train_small(
        run_dir,
        small_corpus,
        "train.max_steps=6",
        "checkpoint.every=1",
        "checkpoint.keep_last=10",
        "checkpoint.export_hf=false",
    )
    recs = read_metrics(run_dir)
    assert recs[3]["step"] == 4 and recs[3]["loss"] is None and recs[3]["events"] == ["skipped_nonfinite"]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 0, 1, 1, 1]
    assert all(r["loss"] is not None for r in recs if r["step"] != 4)
    root = run_dir / "checkpoints"
    for name in ("model", "optim"):  # no parameter or optimizer-state change at step 4
        a = checkpoint_state(root / "step_00000003")[name]
        b = checkpoint_state(root / "step_00000004")[name]
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert len(flat_a) > 20 and flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
    assert json.loads((root / "step_00000006" / "trainer_state.json").read_text())["skipped_steps"] == 1


def _tensors(obj, prefix=""):
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}.{i}"))
    return out


def test_nonfinite_abort_saves_nothing_new(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("HARNESS_FAULT", "nan_loss:4")
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 4: non-finite loss nan .*train.nonfinite=abort"):
        train_small(run_dir, small_corpus, "train.max_steps=6", "checkpoint.every=3", "train.nonfinite=abort")
    assert checkpoints(run_dir) == ["step_00000003"] and len(read_metrics(run_dir)) == 3


def test_too_many_consecutive_skips_abort(tmp_path, small_corpus, monkeypatch):
    monkeypatch.setenv("HARNESS_FAULT", "nan_loss:3,nan_loss:4")
    with pytest.raises(NonFiniteError, match="2 steps in a row were non-finite"):
        train_small(tmp_path / "run", small_corpus, "train.max_steps=6", "train.max_consecutive_skips=2")


def test_loss_spikes_are_logged_as_events(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    train_small(
        run_dir,
        small_corpus,
        "train.max_steps=40",
        "checkpoint.every=0",
        "train.spike_factor=1.0",
        "train.spike_window=10",
        "schedule.warmup_steps=2",
        "optim.lr=0.05",
    )
    recs = read_metrics(run_dir)
    import statistics

    expected = [
        r["step"]
        for i, r in enumerate(recs)
        if i >= 10 and r["loss"] > statistics.median(x["loss"] for x in recs[i - 10 : i])
    ]
    got = [r["step"] for r in recs if r["events"] and "loss_spike" in r["events"]]
    assert got == expected and got  # factor 1.0: every step above its running median


# -- secrets ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_key_never_written(tmp_path, small_corpus):
    secret = "0123456789abcdef0123456789abcdef01234567"  # the shape of a wandb API key
    run_dir = tmp_path / "run"
    proc = _cli(
        f"data.path={small_corpus}",
        "train.max_steps=5",
        "logging.wandb.mode=offline",
        f"hydra.run.dir={run_dir}",
        env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    subprocess.run([PY, "-m", "harness.report", str(run_dir)], cwd=REPO, check=True, capture_output=True)
    assert secret not in proc.stdout + proc.stderr
    for dirpath, _, names in os.walk(run_dir):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(dirpath, n)
    from harness.cluster.slurm_config import validate_slurm
    from harness.config import to_object

    cfg = to_object(compose("+slurm.env.WANDB_API_KEY=abc", schema="slurm"))
    with pytest.raises(Exception, match="looks like a secret"):
        validate_slurm(cfg.slurm, "none")


# -- a metrics sink that fails ----------------------------------------------------------------------


class _Sink:
    def __init__(self, name, fail_on=None):
        self.name, self.fail_on, self.steps, self.closed, self.abandoned = name, fail_on, [], False, False

    def write(self, rec):
        if self.fail_on == "write" and rec.step == 2:
            raise ConnectionResetError("Connection lost")
        self.steps.append(rec.step)

    def close(self):
        if self.fail_on == "close":
            raise OSError("No space left on device")
        self.closed = True

    def abandon(self):
        self.abandoned = True
        raise RuntimeError("its own teardown fails too")  # ignored


def test_a_failing_sink_is_dropped_with_one_warning(caplog):
    from types import SimpleNamespace

    from harness.metrics import MetricsLogger

    ok, bad, bad_close = _Sink("jsonl"), _Sink("tracker", "write"), _Sink("other", "close")
    logger = MetricsLogger([bad, ok, bad_close])
    for step in (1, 2, 3):
        logger.write(SimpleNamespace(step=step))
    logger.close()
    assert (ok.steps, bad.steps, bad_close.steps) == ([1, 2, 3], [1], [1, 2, 3])
    assert (ok.closed, bad.closed, bad.abandoned, bad_close.abandoned) == (True, False, True, True)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "metrics sink tracker failed (step 2, ConnectionResetError: Connection lost); training goes on "
        "without it",
        "metrics sink other failed (closing, OSError: No space left on device); training goes on without it",
    ]


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_wandb_still_checkpoints(tmp_path, small_corpus):
    """``scancel`` signals every process of the job: SIGTERM to the trainer and to its wandb-core
    process (wandb starts it in a session of its own). The dead wandb is dropped with one warning; the
    stop checkpoint is written at the step the run stopped on, exit 75, and a rerun continues."""
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        "logging.wandb.mode=offline",
        f"data.path={small_corpus}",
        "train.max_steps=30",
        "checkpoint.every=0",
        "eval.every=0",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [PY, "-m", "harness.train", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3
        ):
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)  # wandb-core and its helpers
        assert "wandb-core" in [os.path.basename(c.exe()) for c in children]
        os.killpg(proc.pid, signal.SIGTERM)  # the trainer's process group
        for child in children:  # and wandb's own session, as scancel does
            child.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, out[-2000:] + err[-3000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 3 <= stopped_at < 30 and checkpoints(run_dir) == [f"step_{stopped_at:08d}"]
    with open(run_dir / "invocations.jsonl") as f:
        assert json.loads(f.readlines()[-1])["outcome"] == "preempt"
    warnings = [line for line in (out + err).splitlines() if "metrics sink" in line]
    assert len(warnings) == 1 and "metrics sink wandb failed" in warnings[0], out + err
    assert "Traceback" not in err, err[-3000:]
    rerun = _cli(*args[len(SMALL) :], env={"OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in rerun.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 31))


# -- multi-process: no hang, restarts ---------------------------------------------------------------


def _torchrun(run_dir, *args, env=None, nproc=2, extra=(), timeout=600):
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        "-m",
        "harness.train",
        *SMALL,
        *args,
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_that_raises_ends_the_job_with_one_report(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    t0 = time.time()
    proc = _torchrun(
        run_dir,
        f"data.path={small_corpus}",
        "parallel=fsdp",
        "train.max_steps=8",
        "parallel.timeout_s=60",
        env={"HARNESS_FAULT": "raise:3:1"},
    )
    wall = time.time() - t0
    assert proc.returncode != 0 and wall < 60, (wall, proc.stderr[-2000:])
    log = (run_dir / "train.log").read_text()
    reports = [line for line in log.splitlines() if "training failed:" in line]
    assert (
        reports == [reports[0]]
        and "rank 1 raised first: RuntimeError: injected fault at step 3" in reports[0]
    )
    print(f"rank 1 raised at step 3: the job ended in {wall:.1f} s (timeout 60 s)")


@pytest.mark.slow
@pytest.mark.distributed
def test_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, small_corpus):
    args = [f"data.path={small_corpus}", "parallel=ddp", "train.max_steps=6", "checkpoint.export_hf=false"]
    proc = _torchrun(tmp_path / "nan", *args, env={"HARNESS_FAULT": "nan_loss:4:1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = read_metrics(tmp_path / "nan")
    assert [r["skipped_steps"] for r in recs] == [0, 0, 0, 1, 1, 1]
    # both ranks skipped: the weights stay identical across ranks, so the final losses are finite
    assert all(r["loss"] is not None and r["loss"] < 10 for r in recs if r["step"] != 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path, small_corpus):
    args = [
        f"data.path={small_corpus}",
        "parallel=ddp",
        "train.max_steps=10",
        "checkpoint.every=2",
        "checkpoint.export_hf=false",
    ]
    straight = _torchrun(tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = _torchrun(
        tmp_path / "restarted", *args, env={"HARNESS_FAULT": "raise_once:7:1"}, extra=["--max-restarts=1"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (tmp_path / "restarted" / "train.log").read_text()
    assert _rows(tmp_path / "restarted") == _rows(tmp_path / "straight")


# -- chaos: SIGKILL at random moments ---------------------------------------------------------------


def _chaos(tmp_path, corpus, kills: int, seed: int, nproc: int):
    """Kill the job with SIGKILL ``kills`` times (some while a checkpoint is being written), resume each
    time with checkpoint.resume=auto, and return (straight run dir, chaos run dir, steps lost per kill)."""
    steps = max(24, 8 * kills + 8)  # room for every kill to land before the run ends
    args = [
        f"data.path={corpus}",
        f"train.max_steps={steps}",
        "checkpoint.every=3",
        "eval.every=0",
        *(["parallel=fsdp"] if nproc > 1 else []),
    ]
    if nproc > 1:
        base = [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "harness.train",
        ]
    else:
        base = [PY, "-m", "harness.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_FAULT": "checkpoint_sleep:0.4"}
    straight = tmp_path / "straight"
    subprocess.run(
        [*base, *SMALL, *args, f"hydra.run.dir={straight}"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    run_dir = tmp_path / "chaos"
    rng = random.Random(seed)
    lost, attempts = [], 0
    while True:
        attempts += 1
        assert attempts <= kills + 3, "too many attempts"
        proc = subprocess.Popen(
            [*base, *SMALL, *args, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if len(lost) >= kills:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()[-3000:]
            break
        mode = rng.choice(["during_checkpoint", "at_step", "at_time"])
        done_before = len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        target = done_before + rng.randint(1, 4)
        deadline = time.time() + 300
        start = time.time()
        delay = rng.uniform(0.5, 4.0)
        while proc.poll() is None and time.time() < deadline:
            root = run_dir / "checkpoints"
            if (
                mode == "during_checkpoint"
                and root.is_dir()
                and any(n.startswith(".tmp-") for n in os.listdir(root))
            ):
                break
            if (
                mode == "at_step"
                and (run_dir / "metrics.jsonl").exists()
                and len(read_metrics(run_dir)) >= target
            ):
                break
            if mode == "at_time" and time.time() - start > delay:
                break
            time.sleep(0.02)
        if proc.poll() is not None:  # finished before the kill: nothing to kill
            assert proc.returncode == 0, proc.stderr.read().decode()[-3000:]
            break
        logged = len(read_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(
            proc.pid, signal.SIGKILL
        )  # torchrun (or the one process); torchrun's workers are in their own
        proc.wait()  # sessions and must die with it (harness.dist.die_with_launcher), not live on as orphans
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned training processes: {alive}"
        newest = ckpt.latest_checkpoint(str(run_dir / "checkpoints"))
        resumed = int(os.path.basename(newest)[5:]) if newest else 0
        lost.append((mode, logged - resumed))
    return straight, run_dir, lost


def _assert_identical(straight, run_dir):
    assert _rows(run_dir) == _rows(straight)  # per-step losses, bitwise
    from safetensors.torch import load_file

    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(run_dir / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # final weights, bitwise


CHAOS_KILLS = int(os.environ.get("HARNESS_CHAOS_KILLS", "3"))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "fsdp-world2"])
def test_chaos_kills_then_resume_exactly(tmp_path, small_corpus, nproc):
    straight, run_dir, lost = _chaos(tmp_path, small_corpus, CHAOS_KILLS, seed=nproc, nproc=nproc)
    _assert_identical(straight, run_dir)
    assert len(lost) == CHAOS_KILLS
    print(
        f"chaos ({'fsdp x2' if nproc > 1 else '1 process'}): {len(lost)} kills survived; steps lost per kill "
        f"(logged but not yet checkpointed): {[n for _, n in lost]} ({[m for m, _ in lost]})"
    )
    # at most 2 x checkpoint.every steps of work lost per kill: the save of step s is asynchronous, so
    # steps s+1..s+every may run before it is complete (and the save of s+every waits for it)
    assert all(n <= 6 for _, n in lost)
    shutil.rmtree(tmp_path, ignore_errors=True)
