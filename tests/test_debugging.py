"""Where every rank's time goes: per-rank stats and stragglers, the hang watchdog, profiler traces on
demand (steps, SIGUSR2), exposed communication from a trace, and the report's rank heat map."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import REPO, SMALL, checkpoints, compose, read_metrics, torchrun_train, train_command

from harness import phases
from harness.config import to_object, validate
from harness.errors import ConfigError
from harness.hooks.rank_stats import FIELDS, RankStatsHook, StragglerDetector, summarize
from harness.metrics import StepMetrics, wandb_data
from harness.phases import PHASES
from harness.trace import collective_events, device_comm, load_events

BASE = [*SMALL, "checkpoint.every=2", "eval.every=0", "checkpoint.export_hf=false"]


def _cmd(nproc: int, run_dir, *overrides: str) -> list[str]:
    return train_command(nproc, *BASE, *overrides, f"hydra.run.dir={run_dir}")


def _env(fault: str = "") -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_FAULT": fault}


def _run(nproc: int, run_dir, *overrides: str, fault: str = "", check: bool = True):
    return torchrun_train(
        nproc, *BASE, *overrides, f"hydra.run.dir={run_dir}", env={"HARNESS_FAULT": fault}, check=check
    )


# -- per-rank stats and stragglers ------------------------------------------------------------------


def test_straggler_detector_needs_a_whole_window_above_the_factor():
    d = StragglerDetector(factor=1.2, window=3)
    assert d.update([1.0, 1.0, 1.3]) == [] and d.update([1.0, 1.0, 1.3]) == []
    assert d.update([1.0, 1.0, 1.3]) == [2]  # the third consecutive one
    assert d.update([1.0, 1.0, 1.3]) == []  # reported once per episode
    assert d.update([1.0, 1.0, 1.1]) == [] and d.runs[2] == 0  # within the factor: the count restarts
    assert d.update([1.0, 1.19, 1.0]) == []


def _record(step: int) -> StepMetrics:
    """A rank's record of ``step`` before the rank stats hook (fixed values)."""
    return StepMetrics(
        step, 0.5, 256, 256 * step, 5.5, 1e-3, 0.75, 8, 1, 0.5, 0.125, 0.25, 0.125, 0.25, 0.125, 1024, 1.5,
        None, None, 1000.0, 0.25, 1 << 20, 0.5 * step,
    )  # fmt: skip


def _rows(times: list[float]) -> list[list[float]]:
    """One row of :data:`FIELDS` per rank: field ``i`` of rank ``r`` is ``times[r] * (i + 1)``."""
    return [[t * (i + 1) for i in range(len(FIELDS))] for t in times]


def test_a_record_is_as_long_at_1024_ranks_as_at_2(tmp_path):
    """The record of a synthetic 1,024-rank gather serializes to exactly as many bytes as at world 2
    when its values print as wide: world 2 ``[0.25, 0.75]``; 1,024 ranks ``0.25`` (rank 0), ``0.75``
    (rank 1), ``0.65`` (rank 2), ``0.55`` (rank 1000), ``0.5`` elsewhere: the same min / median / max
    and a third slowest rank ``1000`` / ``0.55`` as wide as world 2's padding ``null`` / ``null``."""
    times = [0.5] * 1024
    times[0], times[1], times[2], times[1000] = 0.25, 0.75, 0.65, 0.55
    lines = {}
    for world, t in ((2, [0.25, 0.75]), (1024, times)):
        record = _record(7)
        RankStatsHook(1, 1.2, 5, 0, str(tmp_path)).fill(record, [[v] * len(FIELDS) for v in t])
        lines[world] = record.to_json()
    added = len(lines[1024].encode()) - len(_record(7).to_json().encode())  # over "rank_stats": null, ...
    assert len(lines[1024].encode()) == len(lines[2].encode()) and added == 422, lines
    assert json.loads(lines[1024])["slowest_ranks"] == [
        {"rank": 1, "busy_s": 0.75},
        {"rank": 2, "busy_s": 0.65},
        {"rank": 1000, "busy_s": 0.55},
    ]
    assert json.loads(lines[2])["slowest_ranks"][2] == {"rank": None, "busy_s": None}


def test_rank_stats_summary_is_exact_on_known_vectors():
    """min / median / max per field and the 3 slowest ranks by busy_s (ties: the lower rank first);
    an even count's median is the mean of the two middle values; below 3 ranks the list is padded."""
    stats, slowest = summarize(_rows([0.5, 2.0, 0.25, 2.0, 1.0]))
    assert stats == {
        f: {"min": 0.25 * (i + 1), "median": 1.0 * (i + 1), "max": 2.0 * (i + 1)}
        for i, f in enumerate(FIELDS)
    }
    assert slowest == [{"rank": 1, "busy_s": 4.0}, {"rank": 3, "busy_s": 4.0}, {"rank": 4, "busy_s": 2.0}]
    stats, slowest = summarize(_rows([0.5, 2.0, 0.25, 1.5]))
    assert stats["busy_s"] == {"min": 0.5, "median": 2.0, "max": 4.0}
    assert slowest == [{"rank": 1, "busy_s": 4.0}, {"rank": 3, "busy_s": 3.0}, {"rank": 0, "busy_s": 1.0}]
    stats, slowest = summarize(_rows([0.75, 0.25]))
    assert stats["comm_s"] == {"min": 1.5, "median": 3.0, "max": 4.5}
    assert slowest == [{"rank": 0, "busy_s": 1.5}, {"rank": 1, "busy_s": 0.5}, {"rank": None, "busy_s": None}]


def test_wandb_gets_the_rank_stats_as_scalar_keys(tmp_path):
    record = _record(3)
    RankStatsHook(1, 1.2, 5, 0, str(tmp_path)).fill(record, _rows([0.75, 0.25]))
    data = wandb_data(record)
    assert {k: v for k, v in data.items() if k.startswith("rank_stats/busy_s/")} == {
        "rank_stats/busy_s/min": 0.5,
        "rank_stats/busy_s/median": 1.0,
        "rank_stats/busy_s/max": 1.5,
    }
    assert len([k for k in data if k.startswith("rank_stats/")]) == 3 * len(FIELDS)
    assert {k: v for k, v in data.items() if k.startswith("slowest_ranks/")} == {
        "slowest_ranks/0/rank": 0,
        "slowest_ranks/0/busy_s": 1.5,
        "slowest_ranks/1/rank": 1,
        "slowest_ranks/1/busy_s": 0.5,
    }
    assert "step" not in data and "rank_stats" not in data and data["loss"] == 5.5


def test_rank_stats_file_is_cut_back_on_resume_and_a_failing_write_only_stops_the_file(tmp_path, caplog):
    """A resumed run (at step 4) writes the later steps again, as ``metrics.jsonl``; a write that fails
    (here: no directory) warns once and the hook goes on without the file."""
    path = tmp_path / "rank_stats.jsonl"
    path.write_text("".join(json.dumps({"step": s, "busy_s": [1.0, 2.0]}) + "\n" for s in (2, 4, 6)))
    env = SimpleNamespace(is_main=True, world_size=2)
    RankStatsHook(0, 1.2, 5, 2, str(tmp_path)).on_train_start(
        SimpleNamespace(env=env, state=SimpleNamespace(step=4))
    )
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    hook = RankStatsHook(1, 1.2, 5, 2, str(tmp_path / "gone"))
    for step in (2, 4):
        hook._write_full(step, _rows([0.5, 1.0]))
    assert hook.failed and hook.file is None
    assert len([r for r in caplog.records if "the full per-rank stats stop here" in r.getMessage()]) == 1


@pytest.mark.distributed
def test_full_rank_vectors_go_to_their_own_file_at_their_interval(tmp_path, small_corpus):
    """Stats every 3 steps, full vectors every 2 (gathered then too): the records of steps 2, 3, 4, 6
    have the summary, ``rank_stats.jsonl`` has steps 2, 4, 6 with one value per rank per field."""
    run_dir = tmp_path / "run"
    overrides = [f"data.path={small_corpus}", "parallel=ddp", "train.max_steps=6", "checkpoint.every=0"]
    _run(2, run_dir, *overrides, "logging.rank_stats_every=3", "logging.rank_stats_full_every=2")
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r["rank_stats"]] == [2, 3, 4, 6]
    for r in rows:
        if r["rank_stats"]:
            assert sorted(r["rank_stats"]) == sorted(FIELDS)
            assert [e["rank"] for e in r["slowest_ranks"]][2] is None
            assert sorted(e["rank"] for e in r["slowest_ranks"][:2]) == [0, 1]
    full = [json.loads(line) for line in (run_dir / "rank_stats.jsonl").read_text().splitlines()]
    assert [f["step"] for f in full] == [2, 4, 6]
    for f in full:
        assert sorted(f) == sorted(["step", *FIELDS]) and all(len(f[k]) == 2 for k in FIELDS), f
        record = rows[f["step"] - 1]
        for k in FIELDS:
            assert record["rank_stats"][k] == {"min": min(f[k]), "median": sum(f[k]) / 2, "max": max(f[k])}


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_stats_name_the_slowed_rank_and_profiled_steps_leave_traces_with_the_collectives(
    tmp_path, small_corpus
):
    """rank 1 sleeps 0.15 s in every forward/backward: its busy time, not its step time, stands out (the
    others wait for it in the collectives); steps 3-4 are traced on both ranks."""
    run_dir = tmp_path / "run"
    overrides = [
        f"data.path={small_corpus}",
        "parallel=ddp",
        "train.max_steps=8",
        "logging.straggler_window=3",
        "logging.rank_stats_full_every=1",
    ]
    proc = _run(2, run_dir, *overrides, "profile.steps=[3,4]", fault="slow_step:0.15:1")
    rows = read_metrics(run_dir)
    for r in rows:
        slowest = r["slowest_ranks"]
        assert [e["rank"] for e in slowest] == [1, 0, None], r
        assert r["rank_stats"]["step_time_s"]["min"] <= r["rank_stats"]["step_time_s"]["max"]
        assert slowest[0]["busy_s"] > 0.15 > slowest[1]["busy_s"]
    assert [r["step"] for r in rows if "straggler" in (r["events"] or [])] == [3]
    assert f"straggler: rank 1 ({socket.gethostname()}) busy" in proc.stderr + proc.stdout
    assert f"ranks by host: {socket.gethostname()}: 0-1" in proc.stderr + proc.stdout
    assert [r["step"] for r in rows if "profiled" in (r["events"] or [])] == [3, 4]
    for step in (3, 4):
        for rank in (0, 1):
            events = load_events(str(run_dir / "profile" / f"step_{step:08d}" / f"rank_{rank}.json.gz"))
            names = {e["name"] for e in collective_events(events)}
            assert "gloo:all_reduce" in names, names  # DDP's gradient bucket and the loss sums
            assert device_comm(events) is None  # a CPU trace: the exposed share stays the tracker's
    assert sorted(os.listdir(run_dir / "profile")) == ["step_00000003", "step_00000004"]

    from harness.report import straggler_events, write_report

    assert [e["step"] for e in straggler_events(rows)] == [3]
    html = open(write_report([str(run_dir)])).read()
    assert "straggler events" in html and (run_dir / "report" / "ranks.png").is_file()


def test_sigusr2_profiles_the_next_steps_of_a_running_job(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.train", *BASE, f"data.path={small_corpus}", "train.max_steps=12"]
    cmd += ["profile.active=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env("slow:0.25"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]
    rows = read_metrics(run_dir)
    profiled = [r["step"] for r in rows if "profiled" in (r["events"] or [])]
    assert len(profiled) == 2 and profiled[1] == profiled[0] + 1 and profiled[0] >= 3, profiled
    assert sorted(os.listdir(run_dir / "profile")) == [f"step_{s:08d}" for s in profiled]
    assert [r["step"] for r in rows] == list(range(1, 13))  # SIGUSR2 is not a stop


# -- exposed communication from a trace --------------------------------------------------------------


def test_exposed_communication_of_a_synthetic_device_trace():
    def k(name, ts, dur):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [
        k("ampere_sgemm_128x64", 0, 100),  # compute 0-100
        k("ncclDevKernel_AllReduce_Sum_f32", 50, 100),  # comm 50-150: 50 under compute, 50 exposed
        k("elementwise_kernel", 120, 10),  # compute 120-130 hides 10 more
        k("ncclDevKernel_AllGather", 200, 40),  # 40 exposed, alone
        k("ncclDevKernel_AllGather", 210, 10),  # overlaps the previous comm: counted once
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # host events do not count
    ]
    comm_s, exposed_s = device_comm(events)
    assert comm_s == pytest.approx(140e-6) and exposed_s == pytest.approx(80e-6)


# -- the hang watchdog --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("hang") / "straight"
    _run(2, run_dir, f"data.path={small_corpus}", "parallel=ddp", "train.max_steps=8")
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_is_named_by_the_others_dump_and_the_job_ends_then_resumes(
    tmp_path, small_corpus, uninterrupted, stopped
):
    """SIGSTOP one rank as step 4 starts: the other rank's watchdog (3 s) writes its stacks naming the
    collective it waits in, names the stopped rank, and the job ends within hang_timeout_s + 30 s; the
    step-2 checkpoint is intact and a rerun finishes with the uninterrupted losses. Synchronous saves:
    an asynchronous step-2 save may still be writing when the rank stops at step 4, and a save no rank
    finishes is never complete (test_checkpoint_save covers kills mid-save)."""
    run_dir = tmp_path / "run"
    args = [f"data.path={small_corpus}", "parallel=ddp", "train.max_steps=8", "checkpoint.async_save=false"]
    cmd = _cmd(2, run_dir, *args, "parallel.hang_timeout_s=3")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(f"stop:4:{stopped}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    last_step_done = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and time.time() - last_step_done < 3 + 30
    other = 1 - stopped
    failures = run_dir / "failures"
    dump = (failures / f"hang_rank_{other}.txt").read_text()
    assert "last_finished_step: 3" in dump and "phase: forward_backward" in dump
    assert "last_collective: all_reduce of" in dump and "not finished" in dump
    assert "stacks of all threads (faulthandler)" in dump and "in forward_backward" in dump
    assert not (failures / f"hang_rank_{stopped}.txt").exists()
    summary = (failures / "hang_summary.txt").read_text()
    assert f"ranks that did not report (the likely culprits): [{stopped}]" in summary
    assert "exitcode  : 124" in err.decode()  # EXIT_HANG, as torchrun reports the worker
    trace = json.loads((failures / f"fr_trace_rank_{other}.json").read_text())
    assert any("gloo:all_reduce" in str(e.get("profiling_name")) for e in trace["entries"])
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_00000002"]  # nothing half-written
    if stopped == 0:
        return  # the resume after a hang is the same for either rank (checked with rank 1)
    _run(2, run_dir, *args)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)] == uninterrupted


def _watchdog(*overrides: str):
    from harness.hooks.watchdog import HangWatchdog

    return HangWatchdog.from_config(to_object(compose(*SMALL, *overrides)).parallel, "/nonexistent")


def test_each_phase_has_its_own_timeout_and_the_step_keeps_the_automatic_rule():
    wd = _watchdog("parallel.hang_timeout_checkpoint_s=60", "parallel.hang_timeout_export_s=7.5")
    assert {p: wd.timeout(p) for p in PHASES} == {
        "startup": 1800.0,
        "step": 300.0,  # automatic, no step yet: max(300 s, 10 x median)
        "checkpoint": 60.0,
        "eval": 1800.0,
        "export": 7.5,
    }
    wd.durations.extend([40.0, 50.0, 45.0])
    assert wd.timeout("step") == 450.0 and wd.timeout("checkpoint") == 60.0
    assert wd.timeout_setting("step") == "parallel.hang_timeout_s=null, automatic: 450 s"
    assert wd.timeout_setting("export") == "parallel.hang_timeout_export_s=7.5 s"
    explicit = _watchdog("parallel.hang_timeout_s=3")
    explicit.durations.extend([40.0, 50.0, 45.0])
    assert explicit.timeout("step") == 3.0 and explicit.timeout("startup") == 1800.0
    assert explicit.timeout_setting("step") == "parallel.hang_timeout_s=3 s"


def test_the_watchdog_applies_the_current_phases_timeout_to_the_time_since_it_began():
    wd = _watchdog("parallel.hang_timeout_s=3", "parallel.hang_timeout_checkpoint_s=60")
    phases.enter("startup")
    try:
        with phases.phase("checkpoint"):
            _, since = phases.current()
            assert wd.overdue(now=since + 59.0) is None  # a save far longer than the step timeout
            assert wd.overdue(now=since + 61.0) == ("checkpoint", 61.0)
        name, since = phases.current()  # back to the phase before, timed from the save's end
        assert name == "startup" and wd.overdue(now=since + 1799.0) is None
        phases.enter("step")
        _, since = phases.current()
        assert wd.overdue(now=since + 2.5) is None and wd.overdue(now=since + 3.5) == ("step", 3.5)
    finally:
        phases.enter("startup")


def test_phases_nest_and_come_back_after_an_error():
    phases.enter("step")
    try:
        with pytest.raises(RuntimeError, match="boom"), phases.phase("eval"):
            assert phases.current()[0] == "eval"
            with phases.phase("checkpoint"):
                assert phases.current()[0] == "checkpoint"
            assert phases.current()[0] == "eval"
            raise RuntimeError("boom")
        assert phases.current()[0] == "step"
        with pytest.raises(ValueError, match="unknown phase 'save'; one of startup, step, checkpoint"):
            phases.enter("save")
        assert phases.current()[0] == "step"
    finally:
        phases.enter("startup")


def test_the_trainer_marks_startup_step_checkpoint_eval_and_export(tmp_path, small_corpus, monkeypatch):
    """Where each phase is in force, seen from the code that runs in it (one process)."""
    from harness.hooks import Hook
    from harness.trainer import Trainer

    seen = []

    class Spy(Hook):
        def on_train_start(self, t):
            seen.append(("train_start", phases.current()[0]))

        def on_step_start(self, t, info):
            seen.append((f"step {info.step} starts", phases.current()[0]))

        def on_train_end(self, t):
            seen.append(("train_end", phases.current()[0]))

    cfg = compose(*BASE, f"data.path={small_corpus}", "train.max_steps=2", "eval.every=2")
    cfg.checkpoint.export_hf = True

    def spying(name, inner):
        def spy(*args):
            seen.append((name, phases.current()[0]))
            return inner(*args)

        return spy

    with Trainer.from_config(cfg, str(tmp_path)) as t:
        monkeypatch.setattr(t.checkpoints, "save", spying("save", t.checkpoints.save))
        monkeypatch.setattr(t, "evaluate_sums", spying("evaluate", t.evaluate_sums))
        monkeypatch.setattr(t, "export_hf", spying("export", t.export_hf))
        t.hooks.insert(0, Spy())
        t.train()
    assert seen == [
        ("train_start", "startup"),
        ("step 1 starts", "startup"),  # the first step is start-up (compile, warm-up)
        ("step 2 starts", "step"),
        ("evaluate", "eval"),
        ("save", "checkpoint"),
        ("train_end", "step"),
        ("export", "export"),
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_save_longer_than_the_step_timeout_completes(tmp_path, small_corpus):
    """Each save sleeps 6 s (rank 0, before its manifest) under a 3 s step timeout: the saves are the
    checkpoint phase's (30 min), the run finishes with 0 and both checkpoints."""
    run_dir = tmp_path / "run"
    args = [f"data.path={small_corpus}", "parallel=ddp", "train.max_steps=3", "parallel.hang_timeout_s=3"]
    _run(2, run_dir, *args, fault="checkpoint_sleep:6")  # raises on a non-zero exit (124 before)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert checkpoints(run_dir) == ["step_00000002", "step_00000003"]
    assert not (run_dir / "failures" / "hang_summary.txt").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_stopped_during_a_save_is_reported_as_a_hang_in_the_checkpoint_phase(tmp_path, small_corpus):
    """SIGSTOP rank 1 as the save of step 4 starts: rank 0 waits for it inside the save; its watchdog
    fires on the checkpoint phase's timeout (3 s), names the phase, the key and rank 1; exit 124; the
    step-2 checkpoint stays the newest complete one. Synchronous saves: an asynchronous step-2 save may
    still be writing when rank 1 stops (then it never completes: test_checkpoint_save covers that)."""
    run_dir = tmp_path / "run"
    args = [f"data.path={small_corpus}", "parallel=ddp", "train.max_steps=4", "checkpoint.async_save=false"]
    proc = _run(
        2, run_dir, *args, "parallel.hang_timeout_checkpoint_s=3", fault="checkpoint_stop:4:1", check=False
    )
    assert proc.returncode != 0 and "exitcode  : 124" in proc.stderr  # EXIT_HANG, as torchrun reports it
    failures = run_dir / "failures"
    dump = (failures / "hang_rank_0.txt").read_text()
    assert "last_finished_step: 4\nwatchdog_phase: checkpoint\n" in dump
    assert "timeout: parallel.hang_timeout_checkpoint_s=3 s\n" in dump
    assert "phase: CheckpointHook.on_step_end\n" in dump
    assert "in save_checkpoint" in dump  # rank 0 waits for rank 1 inside the save's collectives
    assert not (failures / "hang_rank_1.txt").exists()
    summary = (failures / "hang_summary.txt").read_text()
    assert summary.startswith("hang: phase checkpoint lasted ")
    assert "s after step 4 (parallel.hang_timeout_checkpoint_s=3 s); ranks that did not report" in summary
    assert "(the likely culprits): [1];" in summary
    assert checkpoints(run_dir) == ["step_00000002"]


# -- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.straggler_factor=1.0", "logging.straggler_factor=1.0 must be > 1"),
        ("logging.straggler_window=0", "logging.straggler_window=0 must be >= 1"),
        ("logging.rank_stats_every=-1", "logging.rank_stats_every=-1 must be >= 0"),
        ("logging.rank_stats_full_every=-1", r"logging.rank_stats_full_every=-1 must be >= 0 \(0: never\)"),
        ("parallel.hang_timeout_s=0", "parallel.hang_timeout_s=0.0 must be a finite number of seconds > 0"),
        (
            "parallel.hang_timeout_checkpoint_s=0",
            r"^parallel.hang_timeout_checkpoint_s=0.0 must be a finite number of seconds > 0 \(the hang "
            r"watchdog's timeout of the checkpoint phase\)$",
        ),
        ("parallel.hang_timeout_startup_s=-5", r"^parallel.hang_timeout_startup_s=-5.0 must be a finite"),
        ("parallel.hang_timeout_export_s=inf", r"^parallel.hang_timeout_export_s=inf must be a finite"),
        ("profile.steps=[5,3]", r"profile.steps=\[5, 3\] must be \[first, last\]"),
        ("profile.every=1", "profile.every=1 must be >= profile.active"),
        ("profile.active=0", "profile.active=0 must be >= 1"),
    ],
)
def test_debugging_settings_that_cannot_work_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(to_object(compose(*SMALL, override)))


def test_profile_steps_and_every_are_exclusive():
    with pytest.raises(ConfigError, match="profile.steps and profile.every are exclusive"):
        validate(to_object(compose(*SMALL, "profile.steps=[2,3]", "profile.every=10")))


def test_profile_windows_from_steps_every_and_a_request():
    from types import SimpleNamespace

    from harness.config import ProfileConfig
    from harness.hooks.profiler import ProfilerHook

    def planned(cfg, steps=range(1, 13)):
        hook = ProfilerHook(cfg, "/nonexistent", 0, SimpleNamespace(profile_requested=False))
        return {s: hook._planned(s) for s in steps if hook._planned(s)}

    assert planned(ProfileConfig(steps=[3, 5])) == {3: 3}
    assert planned(ProfileConfig(every=5, active=2)) == {5: 2, 10: 2}
    assert planned(ProfileConfig()) == {}
