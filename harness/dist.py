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
