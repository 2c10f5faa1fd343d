"""Jobs on a real Slurm cluster: the generated sbatch script (1 node x 2 processes, gloo, FSDP) and a
Hydra multirun through the submitit launcher. (Preemption by USR1 with requeue and exact resume, and
node failures, are tested on two nodes: test_multinode.py.)

A running cluster is used when ``sinfo`` answers; otherwise ``../shared/tools/local-slurm/
start-local-slurm.sh`` (or ``$HARNESS_LOCAL_SLURM``) starts a single-node one. Without either the
tests are skipped with the reason.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, SMALL, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.slurm]

PY = sys.executable
LOCAL_SLURM = REPO.parent / "shared" / "tools" / "local-slurm" / "start-local-slurm.sh"
# 20 steps of the small model with the batch ramp, FSDP over 2 gloo processes.
ARGS = [
    *SMALL,
    "parallel=fsdp",
    "train.max_steps=20",
    "eval.every=10",
    "checkpoint.every=0",
    "checkpoint.export_hf=false",
]
KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_total", "global_batch_size", "val_loss")


def _sinfo_ok() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and " up" in proc.stdout


@pytest.fixture(scope="session")
def partition() -> str:
    """The default partition of a running cluster, starting the local one if needed."""
    if not _sinfo_ok():
        script = os.environ.get("HARNESS_LOCAL_SLURM") or str(LOCAL_SLURM)
        if not os.path.isfile(script):
            pytest.skip(f"no Slurm cluster answers sinfo and there is no local-slurm script at {script}")
        if os.geteuid() != 0:
            pytest.skip(f"no Slurm cluster answers sinfo, and {script} needs root to start one")
        proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and _sinfo_ok(), (
            f"{script} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    return next((p.rstrip("*") for p in out if p.endswith("*")), out[0])


def _state(job: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


def _wait_gone(job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while _state(job):
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            raise AssertionError(f"job {job} still {_state(job) or 'queued'} after {timeout} s")
        time.sleep(0.5)


def _submit(run_dir, corpus: str, partition: str, *extra: str) -> str:
    proc = subprocess.run(
        [
            PY,
            "-m",
            "harness.cluster.slurm",
            *ARGS,
            f"data.path={corpus}",
            f"hydra.run.dir={run_dir}",
            "slurm.gpus_per_node=0",
            "slurm.nproc_per_node=2",
            f"slurm.partition={partition}",
            "slurm.time=10",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[-1]


def _rows(run_dir):
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_corpus):
    """The same config under a local torchrun (no Slurm): the rows every Slurm run must reproduce."""
    run_dir = tmp_path_factory.mktemp("slurm") / "torchrun"
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "harness.train",
        *ARGS,
        f"data.path={small_corpus}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    return rows


def test_sbatch_job_matches_local_torchrun(tmp_path, small_corpus, partition, reference):
    t0 = time.time()
    run_dir = tmp_path / "run"
    job = _submit(run_dir, small_corpus, partition)
    _wait_gone(job)
    log = (run_dir / "slurm" / f"{job}.out").read_text()
    assert "[harness] finished with exit status 0" in log, log[-3000:]
    assert "(micro 2 x accumulation 2 x world 2)" in log
    assert _rows(run_dir) == reference
    print(f"sbatch job {job}: {time.time() - t0:.1f} s")


def test_hydra_submitit_multirun_completes_both_jobs(tmp_path, small_corpus, partition):
    t0 = time.time()
    sweep = tmp_path / "sweep"
    cmd = [
        PY,
        "-m",
        "harness.train",
        "-m",
        *ARGS,
        "train.max_steps=10",
        f"data.path={small_corpus}",
        "optim.lr=1e-3,3e-3",
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.partition={partition}",
        "hydra.launcher.nodes=1",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finals = []
    for job in ("0", "1"):
        rows = read_metrics(sweep / job)
        assert [r["step"] for r in rows] == list(range(1, 11))
        assert "all_gather" in rows[-1]["comm_bytes_by_op"]  # FSDP over 2 Slurm tasks
        assert "(micro 2 x accumulation 2 x world 2)" in (sweep / job / "train.log").read_text()
        finals.append(rows[-1]["loss"])
    assert finals[0] != finals[1]  # two learning rates, two runs
    print(f"submitit sweep: 2 jobs, {time.time() - t0:.1f} s")
