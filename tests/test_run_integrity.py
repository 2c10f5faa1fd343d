"""Run-directory integrity and resume correctness (a second fresh-user trial): LR rule on resume,
export paths, one error line under torchrun, reruns that train nothing, one process per run
directory, MFU against a stable peak, hub look-ups that fail fast, Ctrl-C, the progress bar and
the plan line after a resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, SMALL, checkpoints, compose, read_metrics, train_small

from harness.config import to_object
from harness.errors import ConfigError
from harness.schedule import LRSchedule

PY = sys.executable


def _cli(*args, env=None, timeout=300, module="harness.train"):
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [PY, "-m", module, *args], cwd=REPO, capture_output=True, text=True, env=full, timeout=timeout
    )


def _hashes(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


# -- 1. the new config's LR schedule applies from the resume step --------------------------------


@pytest.mark.parametrize("new_lr", [1e-3, 1e-2])
def test_lr_after_resume_follows_the_new_config(tmp_path, small_corpus, caplog, new_lr):
    train_small(tmp_path, small_corpus, "train.max_steps=6", "eval.every=0")  # optim.lr 3e-3
    with caplog.at_level(logging.WARNING, logger="harness"):
        train_small(tmp_path, small_corpus, "train.max_steps=9", f"optim.lr={new_lr}", "eval.every=0")
    cfg = to_object(compose(*SMALL, "train.max_steps=9", f"optim.lr={new_lr}"))
    new = LRSchedule("cosine", new_lr, cfg.schedule.min_lr, cfg.schedule.warmup_steps, 9)
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 10))
    for r in recs[6:]:
        assert r["lr"] == pytest.approx(new(r["step"]), rel=1e-12), r["step"]
    assert recs[-1]["lr"] == pytest.approx(cfg.schedule.min_lr, rel=1e-12)
    warnings = [r.getMessage() for r in caplog.records if "changed optimizer/schedule" in r.getMessage()]
    assert len(warnings) == 1
    assert f"optim.lr 0.003 -> {new_lr}" in warnings[0] and "train.max_steps 6 -> 9" in warnings[0]
    assert f"(LR at step 7: {new(7):.4g})" in warnings[0]


# -- 2. export paths ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("export_src")
    train_small(run_dir, small_corpus, "train.max_steps=4", "eval.every=0", "checkpoint.export_hf=false")
    return str(run_dir / "checkpoints" / "step_00000004")


@pytest.mark.slow
def test_export_accepts_trailing_slash_and_empty_dirs_and_refuses_full_ones(one_checkpoint, tmp_path):
    for target in (f"{tmp_path}/a/", str(tmp_path / "empty")):
        if target.endswith("empty"):
            os.mkdir(target)
        proc = _cli(one_checkpoint, target, module="harness.export")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert os.path.isfile(os.path.join(target, "config.json"))
        assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temporaries left
    before = _hashes(tmp_path / "a")
    proc = _cli(one_checkpoint, str(tmp_path / "a"), module="harness.export")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: export target {str(tmp_path / 'a')!r} is not empty; choose a new directory or pass "
        "--overwrite to replace it"
    ]
    assert _hashes(tmp_path / "a") == before
    (tmp_path / "a" / "stale.txt").write_text("x")
    proc = _cli(one_checkpoint, f"{tmp_path}/a/", "--overwrite", module="harness.export")
    assert proc.returncode == 0 and not (tmp_path / "a" / "stale.txt").exists()


# -- 3. one error line under torchrun, exit 2 through launch/torchrun.sh ------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_refused_config_under_torchrun_prints_one_error_line_from_rank_0(tmp_path):
    bad = [*SMALL, "parallel=ddp", "train.gradient_accumulation_steps=3"]
    message = "error: train.global_batch_size=8 != micro_batch_size=2 x gradient_accumulation_steps=3"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        proc = subprocess.run(
            [
                PY,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "harness.train",
                *bad,
                f"hydra.run.dir={tmp_path}/r{attempt}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1, proc.stderr[-2000:]  # torchrun's own status for a failed worker
        assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]
    proc = subprocess.run(
        ["bash", "launch/torchrun.sh", *bad, f"hydra.run.dir={tmp_path}/w"],
        cwd=REPO,
        env={**env, "NPROC": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")][0].startswith(message)
    assert not list(tmp_path.iterdir())  # no run directory was created


# -- 4. a rerun with nothing to train leaves the record alone -------------------------------------


@pytest.mark.slow
def test_rerun_with_nothing_to_train_keeps_the_record(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    args = [*SMALL, f"data.path={small_corpus}", "eval.every=0", f"hydra.run.dir={run_dir}"]
    assert _cli(*args, "train.max_steps=4").returncode == 0
    keep = {
        k: v for k, v in _hashes(run_dir).items() if k.startswith((".hydra", "hf", "checkpoints", "metrics"))
    }
    proc = _cli(*args, "train.max_steps=4", "optim.lr=1e-2", "schedule.warmup_steps=1")
    assert proc.returncode == 0 and "nothing to train" in proc.stdout + proc.stderr
    assert {k: v for k, v in _hashes(run_dir).items() if k in keep} == keep
    lines = [json.loads(line) for line in (run_dir / "invocations.jsonl").read_text().splitlines()]
    starts = [r for r in lines if r["event"] == "start"]
    assert [r["trains"] for r in starts] == [True, False]
    assert "optim.lr=1e-2" in starts[1]["overrides"] and starts[1]["start_step"] == 4
    assert [r["outcome"] for r in lines if r["event"] == "end"] == ["done", "done"]


# -- 5. one process per run directory -----------------------------------------------------------


@pytest.mark.slow
def test_a_second_process_in_a_live_run_directory_is_refused(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        f"data.path={small_corpus}",
        "train.max_steps=30",
        "eval.every=0",
        "checkpoint.every=0",
        f"hydra.run.dir={run_dir}",
    ]
    first = subprocess.Popen(
        [PY, "-m", "harness.train", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HARNESS_FAULT": "slow:0.5"},
    )  # 15 s of training
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    second = _cli(*args)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2
    assert (
        second.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"error: run directory {run_dir} is in use by pid {first.pid} on host {socket.gethostname()} "
            "(since "
        )
    )
    assert "(since " in second.stderr and "wait for it to end" in second.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 31))  # the first run's records, once
    assert sum(1 for line in (run_dir / "train.log").read_text().splitlines() if "plan: " in line) == 1


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, small_corpus, caplog):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": "gone-host", "pid": 999999, "since": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="harness"):
        train_small(tmp_path, small_corpus, "train.max_steps=4", "eval.every=0")
    assert any("left by pid 999999 on host gone-host" in r.getMessage() for r in caplog.records)
    assert (tmp_path / ".lock").read_text() == ""  # released at the end


def test_a_live_lock_holder_refuses_an_in_process_run(tmp_path, small_corpus):
    holder = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys, time; from harness.rundir import RunDirLock; "
            f"RunDirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); "
            "time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            ConfigError, match=rf"is in use by pid {holder.pid} on host {socket.gethostname()}"
        ):
            train_small(tmp_path, small_corpus, "train.max_steps=4", "eval.every=0")
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


# -- 6. MFU against a stable peak ----------------------------------------------------------------


def test_peak_is_the_best_of_several_measurements(monkeypatch):
    import torch

    from harness import metrics

    values = iter([3e9, 9e9, 1e9, 4e9, 2e9])
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda device, seconds: next(values))
    assert metrics.device_peak_flops(torch.device("cpu")) == (9e9, "best of 5 measured fp32 matmuls on cpu")


def test_mfu_above_100_percent_is_warned_once_naming_the_peak(tmp_path, small_corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="harness"):
        train_small(
            tmp_path, small_corpus, "train.max_steps=4", "eval.every=0", "train.peak_flops_per_device=1e6"
        )
    assert all(r["mfu"] > 1 for r in read_metrics(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "is above 100%" in r.getMessage()]
    assert len(warned) == 1 and "1e+06 FLOP/s per device (train.peak_flops_per_device)" in warned[0]


# -- 7. small ones ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_org_name_path_offline_fails_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    start = time.time()
    proc = subprocess.run(
        [
            PY,
            "-m",
            "harness.train",
            *SMALL,
            "data.path=no_such_org/no_such_data",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and time.time() - start < 30
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.path: 'no_such_org/no_such_data' matches no local file")
    proc = _cli(*SMALL, "data.path=tests/no_such_file", f"hydra.run.dir={tmp_path}/r", env=env)
    assert (
        proc.stderr.strip().splitlines()[-1] == "error: data.path: 'tests/no_such_file' matches no file "
        "(check the path or glob)"
    )


@pytest.mark.slow
def test_ctrl_c_checkpoints_logs_and_a_rerun_continues_identically(tmp_path, small_corpus):
    budget = ["train.max_steps=30", "checkpoint.every=0", "eval.every=0"]
    args = [*SMALL, f"data.path={small_corpus}", *budget]
    train_small(tmp_path / "straight", small_corpus, *budget)  # the reference in-process: same numbers
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [PY, "-m", "harness.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists()
        and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped = read_metrics(run_dir)[-1]["step"]
    assert 3 <= stopped < 30 and checkpoints(run_dir) == [f"step_{stopped:08d}"]
    log_text = (run_dir / "train.log").read_text()
    assert f"stopping after step {stopped} on Ctrl-C (SIGINT)" in log_text and "checkpoint: " in log_text
    assert _cli(*args, f"hydra.run.dir={run_dir}").returncode == 0
    keep = ("step", "loss", "grad_norm", "lr", "tokens_total")
    assert [{k: r[k] for k in keep} for r in read_metrics(run_dir)] == [
        {k: r[k] for k in keep} for r in read_metrics(tmp_path / "straight")
    ]


def test_progress_bar_shows_this_steps_values_and_log_lines_get_their_own_line(capsys):
    from harness.metrics import ConsoleSink, StepMetrics

    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        sink = ConsoleSink(max_steps=3, start_step=0, every=100, progress="on")
        sink.bar.mininterval, sink.bar.miniters = 0, 1  # redraw on every update (no time throttling)
        for step, loss in ((1, 5.1234), (2, 4.5678)):
            rec = StepMetrics(
                step=step,
                epoch=0.0,
                tokens=1,
                tokens_total=step,
                loss=loss,
                lr=1e-3 * step,
                grad_norm=1.0,
                global_batch_size=1,
                gradient_accumulation_steps=1,
                step_time_s=1.0,
                data_s=0.0,
                forward_backward_s=1.0,
                optimizer_s=0.0,
                comm_s=0.0,
                comm_exposed_s=0.0,
                comm_bytes=0,
                comm_busbw_gbps=None,
                comm_bytes_by_op=None,
                comm_by_dim=None,
                tokens_per_second=1.0,
                mfu=0.1,
                max_memory_bytes=0,
                elapsed_s=1.0,
            )
            sink.write(rec)
            last_bar = capsys.readouterr().err.split("\r")[-1]
            assert f"loss={loss:.4f}" in last_bar and f"lr={1e-3 * step:.2e}" in last_bar
        logging.getLogger("harness").warning("checkpoint: somewhere")
        err = capsys.readouterr().err
        before = err[: err.index("checkpoint: somewhere")]
        assert before == "" or before[-1] in "\r\n", repr(err)  # not glued to the bar's text
        sink.close()
    finally:
        root.removeHandler(handler)


def test_plan_line_after_a_resume_at_another_batch_layout_says_where_the_run_ends(
    tmp_path, small_corpus, caplog
):
    train_small(tmp_path, small_corpus, "train.max_steps=4", "eval.every=0")  # ramp 4, 4, 6, 6 (increment 2)
    with caplog.at_level(logging.INFO, logger="harness"):
        train_small(tmp_path, small_corpus, "train.max_steps=8", "eval.every=0", "train.micro_batch_size=4")
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan: ")][-1]
    total = read_metrics(tmp_path)[-1]["tokens_total"]
    assert f"{total:,} tokens in total" in plan
