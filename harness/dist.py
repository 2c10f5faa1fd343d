"""Where this process stands in a job: rank, world size and device, read from the environment
that torchrun, the deepspeed launcher or Slurm sets."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import torch

from harness.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 .. world_size-1).
        local_rank: rank on this node (selects the GPU).
        world_size: number of training processes.
        device: the device this process trains on.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that logs, shows progress and exports."""
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as e:
                raise ConfigError(f"environment variable {name}={value!r} is not an integer") from e
    return default


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-004,9],cpu1`` -> ``gpu003``, ``vm`` -> ``vm``.

    Raises:
        ConfigError: an empty or malformed list.
    """
    head = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # split on commas outside brackets
    if "[" in head:
        prefix, ranges = head.split("[", 1)
        head = prefix + re.split(r"[,\-\]]", ranges)[0]
    if not head or any(c in head for c in "[],"):
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return head


def _slurm_rendezvous() -> None:
    """Under ``srun`` without torchrun (e.g. Hydra's submitit launcher): ``MASTER_ADDR`` is the step's
    first node and ``MASTER_PORT`` is derived from the job id (distinct for concurrent jobs), unless set."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if "MASTER_ADDR" not in os.environ and nodelist:
        os.environ["MASTER_ADDR"] = first_host(nodelist)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + _env_int("SLURM_JOB_ID", default=0) % 20000)


def read_ranks() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (torchrun, deepspeed)
    or, inside an ``srun`` step without them, ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS``.
    A batch script's own shell (no ``SLURM_STEP_ID``) is one process, whatever ``SLURM_NTASKS`` says.

    Raises:
        ConfigError: a malformed variable.
    """
    if "RANK" not in os.environ and os.environ.get("SLURM_STEP_ID") not in (None, ""):
        return (
            _env_int("SLURM_PROCID", default=0),
            _env_int("SLURM_LOCALID", default=0),
            _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1),
        )
    return _env_int("RANK", default=0), _env_int("LOCAL_RANK", default=0), _env_int("WORLD_SIZE", default=1)


def read_env(device: str = "auto") -> DistEnv:
    """This process's :class:`DistEnv`: ranks from :func:`read_ranks` (inside an ``srun`` step without
    torchrun, ``MASTER_ADDR`` and ``MASTER_PORT`` default to the step's first node and a port derived
    from ``SLURM_JOB_ID``), and the device.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    Raises:
        ConfigError: ``cuda`` requested without a GPU, or a malformed variable.
    """
    rank, local_rank, world_size = read_ranks()
    if "RANK" not in os.environ and world_size > 1:
        _slurm_rendezvous()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, dev)


_ERROR_KEY = "harness/error_reported"


def job_store(timeout_s: float):
    """A key-value store every rank of this job reaches, or None: torchrun's agent store (a client
    connection, the attempt's prefix), else the default process group's store when it exists."""
    import datetime

    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
            )
            return dist.PrefixStore(f"harness/attempt_{attempt}", agent)
        if dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001  (no store: fall back to waiting)
        return None
    return None


def announce_error(message: str, wait_s: float = 20.0) -> None:
    """Print ``error: <message>`` on stderr once per job: from rank 0, before any rank exits.

    Every rank runs the same checks, so a refused config usually fails on every rank at about the
    same time; a launcher (torchrun, deepspeed) kills the others as soon as the first one exits,
    which could be before rank 0 has printed. So rank 0 prints, then marks the job's store; the
    other ranks wait (up to ``wait_s`` seconds) for that mark before they return. A rank whose error
    rank 0 does not share (the mark never comes) prints its own line, naming the rank. Without a
    store (deepspeed launcher before the process group) the other ranks wait 3 s, then print.
    """
    import datetime

    rank, _, world_size = read_ranks()
    if world_size == 1:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    store = job_store(wait_s)
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
        if store is not None:
            try:
                store.set(_ERROR_KEY, "1")
            except Exception:  # noqa: BLE001
                pass
        return
    try:
        if store is None:
            raise TimeoutError
        store.wait([_ERROR_KEY], datetime.timedelta(seconds=wait_s))
        return
    except Exception:  # noqa: BLE001  (timed out: rank 0 does not share this error)
        if store is None:
            import time

            time.sleep(3.0)
    print(f"error: (rank {rank}) {message}", file=sys.stderr, flush=True)


def die_with_launcher() -> None:
    """Under torchrun, ask Linux to SIGKILL this process when its launcher dies.

    torchrun starts workers in their own sessions, so a launcher killed with SIGKILL (OOM killer,
    a lost node's agent, ``kill -9``) would leave them running, still writing checkpoints and metrics
    into the run directory while a restarted job resumes from it. ``prctl(PR_SET_PDEATHSIG)``
    (Linux ``prctl(2)``); a no-op elsewhere.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() == 1:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(env: DistEnv, timeout_s: float) -> None:
    """Create the default process group: NCCL on GPU, gloo on CPU.

    Uses ``MASTER_ADDR``/``MASTER_PORT`` from the launcher; a one-process run without them gets an
    in-memory store (the environment is left as it was). Under torchrun each elastic attempt gets
    its own key prefix in the agent's store. On GPU, ``TORCH_NCCL_ENABLE_TIMING=1`` is set first
    so that collectives carry CUDA timing events (see ``harness.parallel.comm``).

    Raises:
        ConfigError: several processes but no ``MASTER_ADDR``/``MASTER_PORT``.
    """
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    die_with_launcher()
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "gloo"
    if env.device.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
        torch.cuda.set_device(env.device)
        backend = "nccl"
    store = None
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        store = dist.HashStore()
    else:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ConfigError(
                    f"WORLD_SIZE={env.world_size} but {name} is not set: launch with torchrun, deepspeed or "
                    "srun"
                )
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps its store across elastic restarts (--max-restarts); with the previous
            # attempt's keys still there gloo would connect to dead ranks, so each attempt gets a prefix.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                env.world_size,
                is_master=False,
                timeout=timeout,
            )
            store = dist.PrefixStore(f"harness/attempt_{attempt}", agent)
    dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)


def gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank, over the default (world) group:
    gloo on CPU, NCCL on GPU (through the current CUDA device, set by :func:`init_distributed`). Pads
    to the largest object: keep them small."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's picklable ``obj`` on every rank, over the default (world) group."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group (ending without the barrier aborts ~1 in 8 gloo runs)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
