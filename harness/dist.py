"""Where this process stands in a job: rank, world size and device, read from the environment
that torchrun, the deepspeed launcher or Slurm sets."""

from __future__ import annotations

import os
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


def read_env(device: str = "auto") -> DistEnv:
    """Read ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (torchrun, deepspeed) or ``SLURM_PROCID``/
    ``SLURM_LOCALID``/``SLURM_NTASKS`` (srun), and choose the device.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    Raises:
        ConfigError: ``cuda`` requested without a GPU, or a malformed variable.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, dev)


def init_distributed(env: DistEnv, timeout_s: float) -> None:
    """Create the default process group: NCCL on GPU, gloo on CPU.

    Uses ``MASTER_ADDR``/``MASTER_PORT`` from the launcher (a one-process run without them gets
    127.0.0.1 and a free port). On GPU, ``TORCH_NCCL_ENABLE_TIMING=1`` is set first so that
    collectives carry CUDA timing events (see ``harness.parallel.comm``).
    """
    import datetime
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={env.world_size} but {name} is not set: launch with torchrun, deepspeed or srun"
            )
    backend = "gloo"
    if env.device.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
        torch.cuda.set_device(env.device)
        backend = "nccl"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group (ending without the barrier aborts ~1 in 8 gloo runs)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
