"""Parallelism backends behind one interface (:class:`Backend`), chosen by ``parallel.name``."""

from __future__ import annotations

from harness.config import ParallelConfig
from harness.dist import DistEnv
from harness.errors import ConfigError
from harness.parallel.base import Backend, CommStats, build_adamw
from harness.parallel.none import SingleProcess

__all__ = ["Backend", "CommStats", "build_adamw", "build_backend"]


def build_backend(cfg: ParallelConfig, env: DistEnv) -> Backend:
    """The backend named by ``parallel.name`` for this process.

    Raises:
        ConfigError: ``parallel=none`` started with more than one process.
    """
    if cfg.name == "none":
        if env.world_size != 1:
            raise ConfigError(
                f"parallel.name=none runs one process, but WORLD_SIZE={env.world_size}; "
                "launch one process (python -m harness.train)"
            )
        return SingleProcess(env)
    raise ConfigError(f"parallel.name={cfg.name!r} is not available (choices: none)")
