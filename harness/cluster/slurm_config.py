"""The ``slurm`` section of ``python -m harness.cluster.slurm``: its schema and its checks.

The section exists only for this command line: its schema, :class:`SlurmJobConfig`, is the training
schema plus ``slurm`` (registered as ``schema/slurm``); ``harness.train`` does not accept ``slurm.*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.config import JobConfig, register_schema
from harness.errors import ConfigError


@dataclass
class SlurmConfig:
    """``python -m harness.cluster.slurm`` only: the allocation and the generated sbatch script."""

    nodes: int = 1
    # 0 on CPU-only partitions
    gpus_per_node: int = 8
    # training processes per node; None: gpus_per_node (1 without GPUs)
    nproc_per_node: int | None = None
    # CPUs of each node's task (the launcher and its training processes)
    cpus_per_task: int | None = None
    # --mem, e.g. "0" for all of a node's memory
    mem: str | None = None
    # wall-clock limit, Slurm syntax
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # whole nodes
    exclusive: bool = False
    # None: run_name
    job_name: str | None = None
    # auto (deepspeed for parallel=deepspeed, else torchrun) | torchrun | deepspeed
    launcher: str = "auto"
    # rendezvous / master port on the first node; None: 20000 + job id % 20000
    rdzv_port: int | None = None
    # seconds the other nodes try to reach the first node's rendezvous port before one error line
    rdzv_timeout_s: int = 600
    # interpreter on the nodes; None: this one (``python`` inside a container)
    python: str | None = None
    # pyxis/enroot image (srun --container-image)
    container_image: str | None = None
    # srun --container-mounts, e.g. /data:/data,/scratch:/scratch
    container_mounts: str | None = None
    # command prefix on each node, e.g. "apptainer exec --nv harness.sif"
    container_exec: str | None = None
    # exported before srun: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...
    env: dict[str, str] = field(default_factory=dict)
    # shell lines run before srun (module load, source venv/bin/activate)
    setup: list[str] = field(default_factory=list)
    # extra #SBATCH options, e.g. --mail-type=END
    sbatch_args: list[str] = field(default_factory=list)
    # USR1 this many seconds before the time limit: finish the step and checkpoint
    signal_grace_s: int = 120
    # requeues (preemptions, and failures with requeue_on_failure) before giving up
    max_requeues: int = 10
    # also requeue after a crash (bounded by max_requeues)
    requeue_on_failure: bool = False
    # write the script, do not submit
    dry_run: bool = False


@dataclass
class SlurmJobConfig(JobConfig):
    """A training run plus the allocation it is submitted with."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)


register_schema("slurm", SlurmJobConfig)


def slurm_time_seconds(text: str) -> int:
    """Seconds of a Slurm time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S`` (sbatch
    manual).

    Raises:
        ConfigError: another form, a field out of range, or 0 (which Slurm reads as no limit).
    """
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text or ""))
    bad = ConfigError(f"slurm.time={text!r} is not a Slurm time limit (MM, HH:MM:SS or D-HH:MM:SS, not 0)")
    if not m:
        raise bad
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = a, b or 0, c or 0
    elif c is not None:  # H:M:S
        h, mi, s = a, b, c
    elif b is not None:  # M:S
        h, mi, s = 0, a, b
    else:  # M
        h, mi, s = 0, a, 0
    hours_given = days is not None or c is not None
    if s > 59 or (hours_given and mi > 59) or (days is not None and h > 23):
        raise bad
    total = (days or 0) * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise bad
    return total


def validate_slurm(s: SlurmConfig, parallel: str) -> tuple[str, int]:
    """Check the ``slurm`` section for ``python -m harness.cluster.slurm``.

    Returns:
        ``(launcher, nproc_per_node)``: ``torchrun`` or ``deepspeed``, and training processes per node.
    Raises:
        ConfigError: naming the offending ``slurm.*`` key and the fix.
    """
    if s.nodes is None or s.nodes < 1:
        raise ConfigError(f"slurm.nodes={s.nodes} must be >= 1 (the number of nodes to allocate)")
    if s.gpus_per_node < 0:
        raise ConfigError(f"slurm.gpus_per_node={s.gpus_per_node} must be >= 0 (0 on CPU partitions)")
    nproc = s.nproc_per_node if s.nproc_per_node is not None else max(s.gpus_per_node, 1)
    if nproc < 1:
        raise ConfigError(f"slurm.nproc_per_node={s.nproc_per_node} must be >= 1")
    if s.gpus_per_node and nproc > s.gpus_per_node:
        raise ConfigError(
            f"slurm.nproc_per_node={nproc} > slurm.gpus_per_node={s.gpus_per_node}: "
            "one training process per GPU at most"
        )
    for key in ("cpus_per_task", "signal_grace_s", "max_requeues", "rdzv_port", "rdzv_timeout_s"):
        value = getattr(s, key)
        positive = key in ("cpus_per_task", "rdzv_port", "rdzv_timeout_s")
        if value is not None and value < (1 if positive else 0):
            raise ConfigError(f"slurm.{key}={value} must be {'> 0' if key != 'max_requeues' else '>= 0'}")
    if s.rdzv_port is not None and not 1024 <= s.rdzv_port <= 65535:
        raise ConfigError(
            f"slurm.rdzv_port={s.rdzv_port} must be a port in 1024..65535 (or null: from the job id)"
        )
    limit = slurm_time_seconds(s.time)
    if limit <= s.signal_grace_s:
        raise ConfigError(
            f"slurm.time={s.time!r} ({limit} s) must be longer than slurm.signal_grace_s="
            f"{s.signal_grace_s}: the checkpoint signal comes that long before the limit"
        )
    if s.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(s.mem)):
        raise ConfigError(f"slurm.mem={s.mem!r} is not a Slurm memory size (e.g. 0 for all, 500G, 64000M)")
    launcher = s.launcher
    if launcher == "auto":
        launcher = "deepspeed" if parallel == "deepspeed" else "torchrun"
    if launcher not in ("torchrun", "deepspeed"):
        raise ConfigError(f"slurm.launcher={s.launcher!r} is not one of auto, torchrun, deepspeed")
    for name in s.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ConfigError(f"slurm.env key {name!r} is not a valid environment variable name")
        if re.search(r"KEY|TOKEN|SECRET|PASSWORD", str(name).upper()):
            raise ConfigError(
                f"slurm.env.{name} looks like a secret: it would be written into the sbatch script; "
                "export it in the submitting shell instead (sbatch passes the environment on)"
            )
    for arg in s.sbatch_args:
        if not str(arg).startswith("-"):
            raise ConfigError(
                f"slurm.sbatch_args entry {arg!r} must be an sbatch option such as --mail-type=END"
            )
    return launcher, nproc
