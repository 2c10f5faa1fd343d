"""Multi-node jobs on a real two-node Slurm cluster on this machine (``tests/cluster/start-nodes.sh``:
each node a network + UTS namespace with its own address and host name, n1 and n2, and its own slurmd).

- every layout across the two nodes (ddp, fsdp, deepspeed ZeRO, tp within a node x fsdp across, tp
  across) gives the per-step losses of the same world size on one node (rel 1e-5), and the ranks are
  grouped by host;
- USR1 from ``scancel`` (to every node's job step) and the time-limit signal (to the batch shell) each
  stop every rank after a step with one checkpoint; the job requeues and resumes bitwise;
- a node lost mid-run, its processes killed or its link cut: the survivors name the lost host and ranks
  in one line, Slurm ends the attempt with NODE_FAIL and requeues it, and once the node is back the job
  resumes from the newest complete checkpoint and finishes bitwise;
- a node that cannot reach the rendezvous port: one error line naming the head host and port.

Needs root (network namespaces); the cluster is started if it is not up (and stopped at the end).
Without root or iproute2 the tests are skipped with the reason.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, SMALL, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.slurm]

PY = sys.executable
CLUSTER = REPO / "tests" / "cluster"
EXEC = str(CLUSTER / "exec.sh")
# The small model at world size 4 (2 nodes x 2 processes): a batch ramp 4 -> 8 every world size divides.
ARGS = [
    *SMALL,
    "schedule.batch_warmup.increment=4",
    "train.max_steps=20",
    "eval.every=10",
    "checkpoint.every=4",
    "checkpoint.export_hf=false",
    "logging.every=1",
]
STOP_AT = "train.stop_at_step=10"  # every layout but fsdp (the reference of the fault tests) stops there
SLURM = ["slurm.nodes=2", "slurm.gpus_per_node=0", "slurm.nproc_per_node=2", "slurm.time=10"]
KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_total", "global_batch_size", "val_loss")
LAYOUTS = {  # name: (overrides, processes per node)
    "ddp": (["parallel=ddp"], 2),
    "fsdp": (["parallel=fsdp"], 2),
    "deepspeed": (["parallel=deepspeed"], 2),
    "tp_in_node_fsdp_across": (["parallel=fsdp", "parallel.tp=2"], 2),
    "tp_across": (["parallel=fsdp", "parallel.tp=2"], 1),
}


def _sh(*cmd: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(list(cmd), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)}: {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


def _ctl(*cmd: str, check: bool = True) -> str:
    """A Slurm command in the controller's namespace."""
    return _sh(EXEC, *cmd, check=check)


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster, started here if it is not up (and then stopped after the module)."""
    if os.geteuid() != 0:
        pytest.skip("the two-node cluster needs root (network and UTS namespaces)")
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"the two-node cluster needs {tool} (iproute2, util-linux)")
    was_up = subprocess.run([EXEC, "scontrol", "ping"], capture_output=True).returncode == 0
    proc = subprocess.run(
        ["bash", str(CLUSTER / "start-nodes.sh")], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield
    if not was_up:
        subprocess.run(["bash", str(CLUSTER / "stop-nodes.sh")], capture_output=True, timeout=300)


def _submit(run_dir, corpus: str, *extra: str, nproc: int = 2, paced: bool = False) -> str:
    """Submit the job of ``ARGS`` + ``extra``; ``paced``: every step sleeps 0.2 s more (the job
    inherits ``HARNESS_FAULT=slow:0.2``), so that a signal or a lost node lands mid-run."""
    slurm = [a for a in SLURM if not a.startswith("slurm.nproc_per_node=")]
    out = _sh(
        *(["env", "HARNESS_FAULT=slow:0.2"] if paced else []),
        EXEC,
        PY,
        "-m",
        "harness.cluster.slurm",
        *ARGS,
        f"data.path={corpus}",
        f"hydra.run.dir={run_dir}",
        *slurm,
        f"slurm.nproc_per_node={nproc}",
        *extra,
    )
    return out.split()[-1]


def _state(job: str) -> str:
    return _ctl("squeue", "-h", "-j", job, "-o", "%T", check=False).strip()


def _wait(job: str, until, what: str, timeout: float = 300, run_dir=None) -> None:
    """Poll ``until()`` every 0.2 s; after ``timeout`` s end the job and fail, with the tail of its
    log when ``run_dir`` is given."""
    deadline = time.time() + timeout
    while not until():
        if time.time() > deadline:
            state = _state(job) or "gone"
            _kill(job)
            log = (
                _log(run_dir, job)[-4000:] if run_dir and (run_dir / "slurm" / f"{job}.out").exists() else ""
            )
            raise AssertionError(f"job {job}: no {what} after {timeout} s (state {state})\n{log}")
        time.sleep(0.2)


def _wait_gone(job: str, timeout: float = 300) -> None:
    _wait(job, lambda: not _state(job), "end", timeout)


def _finish(job: str, timeout: float = 400) -> None:
    """Wait for the end of a job, starting it at once whenever it is requeued again (a stray stop
    after a node loss, see :func:`_start_now`: the job checkpoints, exits 75 and requeues)."""
    deadline = time.time() + timeout
    while _state(job):
        reason = _ctl("squeue", "-h", "-j", job, "-o", "%r", check=False).strip()
        if _state(job) == "PENDING" and reason == "BeginTime":
            _start_now(job)
        assert time.time() < deadline, f"job {job} still {_state(job)} after {timeout} s"
        time.sleep(0.5)


def _kill(job: str) -> None:
    """End a job for good: not requeueable first (TERM makes a harness job checkpoint and requeue itself,
    and a job killed as it requeues comes back), then KILL until it is gone."""
    _ctl("scontrol", "update", f"JobId={job}", "Requeue=0", check=False)
    deadline = time.time() + 60
    while _state(job) and time.time() < deadline:
        _ctl("scancel", "--signal=KILL", "--full", job, check=False)
        _ctl("scancel", job, check=False)
        time.sleep(1)


def _steps_done(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _node_clean(node: str) -> bool:
    """The node is idle in Slurm and its namespace runs nothing but its slurmd (an earlier attempt's
    step is gone: a step started before it is cleaned up is killed with it)."""
    state = _ctl("sinfo", "-h", "-n", node, "-o", "%T", check=False).strip()
    pids = _sh("ip", "netns", "pids", f"hcl-{node}", check=False).split()
    comms = [open(f"/proc/{p}/comm").read().strip() for p in pids if os.path.exists(f"/proc/{p}/comm")]
    return state == "idle" and comms == ["slurmd"]


def _start_now(job: str) -> None:
    """A requeued job waits about 120 s (BeginTime): start it once both nodes are clean. (Slurm's delay
    also keeps a new attempt clear of the cleanup of the one lost with a node, which can still stop
    it: the stopped attempt checkpoints and requeues, and :func:`_finish` starts it again.)"""
    _wait(job, lambda: _node_clean("n1") and _node_clean("n2"), "clean nodes", 180)
    time.sleep(2)  # slurmd refuses a job it killed moments ago
    if _state(job) == "PENDING":
        _ctl("scontrol", "update", f"JobId={job}", "StartTime=now")


def _log(run_dir, job: str) -> str:
    return (run_dir / "slurm" / f"{job}.out").read_text()


def _rows(run_dir) -> list[dict]:
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(run_dir)]


def _close(rows, reference, rel: float = 1e-5) -> list[str]:
    """Steps whose loss, grad norm or validation loss differ from ``reference`` by more than ``rel``."""
    bad = []
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for r, ref in zip(rows, reference, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if (r[key] is None) != (ref[key] is None) or (
                r[key] is not None and abs(r[key] - ref[key]) > rel * abs(ref[key])
            ):
                bad.append(f"step {r['step']} {key}: {r[key]} vs {ref[key]}")
    return bad


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, small_corpus):
    """World size 4 on one node (a local torchrun, fsdp): the rows every layout across nodes gives."""
    run_dir = tmp_path_factory.mktemp("multinode") / "one_node"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "harness.train"]
    cmd += [*ARGS, "parallel=fsdp", f"data.path={small_corpus}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    return rows


def readme_job() -> list[str]:
    """The README's two-node command (``tests/cluster/exec.sh ... harness.cluster.slurm ...``), as
    arguments; it must be the fsdp job of :data:`ARGS`."""
    from test_readme import readme_commands

    line = next(
        c for c in readme_commands() if c.startswith("tests/cluster/exec.sh .venv/bin/python -m harness")
    )
    args = shlex.split(line)
    keys = {a.split("=")[0] for a in args if "=" in a}
    assert {a for a in args if "=" in a} <= {*ARGS, *LAYOUTS["fsdp"][0], *SLURM, "run_name=two-nodes"}, args
    return [*args, *(a for a in ARGS if a.split("=")[0] not in keys)]


def _submit_readme_job(run_dir, corpus: str) -> str:
    args = readme_job()
    args[1] = PY  # .venv/bin/python, as the README says: this interpreter
    return _sh(*args, f"data.path={corpus}", f"hydra.run.dir={run_dir}", timeout=120).split()[-1]


@pytest.fixture(scope="module")
def across(cluster, tmp_path_factory, small_corpus):
    """Every layout of :data:`LAYOUTS` as one Slurm job on 2 nodes (submitted together; fsdp's is the
    README's command, 20 steps; the others stop after step 10): name -> (run dir, job id)."""
    root = tmp_path_factory.mktemp("layouts")
    t0 = time.time()
    jobs = {}
    for name, (overrides, nproc) in LAYOUTS.items():
        if name == "fsdp":
            jobs[name] = _submit_readme_job(root / name, small_corpus)
        else:  # the other layouts stop after step 10 of the same 20-step schedule (time)
            jobs[name] = _submit(root / name, small_corpus, *overrides, STOP_AT, nproc=nproc)
    for job in jobs.values():
        _wait_gone(job, 600)
    print(f"{len(jobs)} two-node jobs: {time.time() - t0:.1f} s")
    return {name: (root / name, job) for name, job in jobs.items()}


def test_every_layout_across_two_nodes_matches_one_node(across, one_node):
    for name, (run_dir, job) in across.items():
        log = _log(run_dir, job)
        assert "[harness] finished with exit status 0" in log, f"{name}:\n{log[-3000:]}"
        world = 2 * LAYOUTS[name][1]
        hosts = "n1: 0-1; n2: 2-3" if world == 4 else "n1: 0; n2: 1"
        assert f"ranks by host: {hosts}" in log, name
        assert _close(_rows(run_dir), one_node if name == "fsdp" else one_node[:10]) == [], name
    plan = _log(*across["tp_in_node_fsdp_across"])
    assert "(micro 2 x accumulation 2 x dp 2; tp 2, world 4)" in plan  # tp pairs 0-1 and 2-3: a node each
    assert "(micro 2 x accumulation 4 x dp 1; tp 2, world 2)" in _log(*across["tp_across"])
    assert "nnodes=2, num_local_procs=2, node_rank=1" in _log(*across["deepspeed"])  # its launcher per node


def test_preemption_signals_reach_both_nodes_and_the_job_resumes_bitwise(
    cluster, tmp_path, small_corpus, across
):
    """USR1 to the job steps (``scancel --signal=USR1``), then, after the requeue, USR1 to the batch
    shell as ``--signal=B:USR1@N`` sends it before the time limit: each time every rank on both nodes
    stops after the same step with one checkpoint; the job finishes with the uninterrupted rows."""
    t0 = time.time()
    run_dir = tmp_path / "run"
    job = _submit(run_dir, small_corpus, "parallel=fsdp", paced=True)
    stops = []
    for start, signal_args in enumerate((["--signal=USR1"], ["--signal=USR1", "--batch"]), 1):
        done = len(stops) and stops[-1]
        _wait(job, lambda d=done: _steps_done(run_dir) >= d + 3, f"3 steps in start {start}")
        _ctl("scancel", *signal_args, job)
        _wait(job, lambda: _state(job) == "PENDING", "requeue", run_dir=run_dir)
        stopped = read_metrics(run_dir)[-1]["step"]
        stops.append(stopped)
        assert f"step_{stopped:08d}" in os.listdir(run_dir / "checkpoints")
        _start_now(job)
    _finish(job)
    log = _log(run_dir, job)
    # each stop reached both nodes' wrappers, which signal their 2 training processes
    assert (
        log.count("[harness.cluster.node] SIGUSR1: asking 2 training processes to checkpoint and stop") == 4
    )
    assert "exit status 75: requeueing (requeue 1 of 10)" in log and "requeue 2 of 10" in log
    for stopped in stops:
        assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}" in log
    assert "[harness] finished with exit status 0" in log, log[-3000:]
    assert _rows(run_dir) == _rows(across["fsdp"][0])  # bitwise: the same losses as without the stops
    print(f"two preemptions (after steps {stops}): {time.time() - t0:.1f} s")


def _lose_node(tmp_path, small_corpus, across, lose, restore, timeout_s: int):
    """Start a job, lose n2 after step 10 (``lose()``; the step-8 checkpoint is complete by then and
    the next is at 12: a loss during an asynchronous save makes the survivors wait for it, up to
    parallel.timeout_s, and Slurm's node-failure cancel comes first), check the survivors' line and Slurm's
    NODE_FAIL requeue, bring n2 back (``restore()``), and check the resumed job's rows. Returns the log."""
    run_dir = tmp_path / "run"
    job = _submit(run_dir, small_corpus, "parallel=fsdp", f"parallel.hang_timeout_s={timeout_s}", paced=True)
    _wait(job, lambda: _steps_done(run_dir) >= 10, "step 10")
    lose()
    try:
        _wait(job, lambda: _state(job) == "PENDING", "requeue after the node loss", 180, run_dir)
        log = _log(run_dir, job)
        lost = [line for line in log.splitlines() if line.startswith("error: lost: ")]
        assert len(lost) == 1 and lost[0].startswith("error: lost: ranks 2-3 (host n2) did not answer"), log[
            -3000:
        ]
        states = _ctl("sacct", "-D", "-n", "-X", "-j", job, "-o", "state%20").split()
        assert states[0] == "NODE_FAIL", states  # the attempt's record; the next one is pending
        newest = sorted(os.listdir(run_dir / "checkpoints"))[-1]
        assert not newest.startswith(".tmp") and (run_dir / "checkpoints" / newest / "manifest.json").exists()
    finally:
        restore()
    _finish(job)
    log = _log(run_dir, job)
    step = int(newest.split("_")[1])
    assert f"resumed from {run_dir}/checkpoints/{newest} at step {step}" in log
    assert "[harness] finished with exit status 0" in log, log[-3000:]
    assert _rows(run_dir) == _rows(across["fsdp"][0])  # bitwise
    return log, lost[0]


def _restart_cluster() -> None:
    _sh("bash", str(CLUSTER / "start-nodes.sh"), timeout=300)


def test_a_killed_node_is_named_and_the_job_resumes_from_the_newest_checkpoint(
    cluster, tmp_path, small_corpus, across
):
    """SIGKILL every process of n2 (its slurmd, its ranks): the ranks on n1 see the connection reset,
    hold the roll call and name n2's ranks; they exit 69; Slurm marks n2 down and requeues the job."""
    t0 = time.time()

    def kill_n2() -> None:
        pids = _sh("ip", "netns", "pids", "hcl-n2").split()
        _sh("kill", "-KILL", *pids, check=False)

    log, line = _lose_node(tmp_path, small_corpus, across, kill_n2, _restart_cluster, timeout_s=60)
    assert "Connection reset by peer" in line or "Connection closed by peer" in line, line
    assert "srun: error: n1: task 0: Exited with exit code 69" in log
    print(f"node killed, requeued, resumed: {time.time() - t0:.1f} s")


def test_a_node_cut_off_is_named_after_the_hang_timeout_and_the_job_resumes(
    cluster, tmp_path, small_corpus, across
):
    """Cut n2's link (``ip link set ... down``): nothing fails, everything waits; after
    parallel.hang_timeout_s every rank's watchdog fires, the roll call in the job store (on n1) names
    n2's ranks, which cannot reach it; Slurm marks n2 down (SlurmdTimeout) and requeues the job."""
    t0 = time.time()
    cut = ["ip", "-n", "hcl-ctl", "link", "set", "hclv-n2"]
    log, line = _lose_node(
        tmp_path, small_corpus, across, lambda: _sh(*cut, "down"), _restart_cluster, timeout_s=10
    )
    assert re.search(r"after: hang: phase step lasted 1\d\.\d s after step \d+", line), line
    assert "hang: phase step lasted" in log and "(parallel.hang_timeout_s=10 s)" in log
    print(f"node cut off, requeued, resumed: {time.time() - t0:.1f} s")


def test_a_node_that_cannot_reach_the_rendezvous_says_so_in_one_line(cluster, tmp_path, small_corpus):
    """n2 cannot open a connection to the rendezvous port (a rule in its own namespace, as a firewall
    would): its wrapper gives up after slurm.rdzv_timeout_s with one line naming n1 and the port and
    exits 2; srun ends the job and no training process wrote anything."""
    port = "29631"
    rule = ["ip", "-n", "hcl-n2", "rule", "add", "ipproto", "tcp", "dport", port, "unreachable"]
    _sh(*rule)
    try:
        run_dir = tmp_path / "run"
        job = _submit(run_dir, small_corpus, f"slurm.rdzv_port={port}", "slurm.rdzv_timeout_s=5")
        _wait_gone(job, 180)
    finally:
        _sh("ip", "-n", "hcl-n2", "rule", "del", *rule[5:])
    log = _log(run_dir, job)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: node n2 cannot reach the rendezvous at n1:{port} within 5 s (last error: OSError: "
        f"Network is unreachable); check that n1 resolves to its address from n2 and that port {port} is "
        "open between the nodes (slurm.rdzv_port, slurm.rdzv_timeout_s)"
    ], log[-3000:]
    # srun stops n1's task once n2's exits (n1's status is then 143), and the job is not requeued
    assert "srun: error: n2: task 1: Exited with exit code 2" in log and "requeueing" not in log
    assert not (run_dir / "metrics.jsonl").exists()
