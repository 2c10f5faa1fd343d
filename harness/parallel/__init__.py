"""Parallelism backends behind one interface (:class:`Backend`), chosen by ``parallel.name``:
``none`` (one process), ``ddp``, ``fsdp`` (FSDP2) and ``deepspeed`` (ZeRO 0-3)."""

from __future__ import annotations

from harness.config import BatchSizes, TrainConfig
from harness.dist import DistEnv
from harness.errors import ConfigError
from harness.parallel.base import Backend, CommStats, build_adamw
from harness.parallel.none import SingleProcess

__all__ = ["Backend", "CommStats", "SingleProcess", "build_adamw", "build_backend"]


def build_backend(cfg: TrainConfig, env: DistEnv, batch: BatchSizes) -> Backend:
    """The backend named by ``parallel.name`` for this process (creates the process group).

    Raises:
        ConfigError: ``parallel=none`` started with more than one process, or a backend's
            own config check fails.
    """
    name = cfg.parallel.name
    if name == "none":
        if env.world_size != 1:
            raise ConfigError(
                f"parallel.name=none runs one process, but WORLD_SIZE={env.world_size}; "
                "use parallel=ddp|fsdp|deepspeed, or launch one process"
            )
        return SingleProcess(env)
    if name == "ddp":
        from harness.parallel.distributed import DDPBackend

        return DDPBackend(env, cfg.parallel, cfg.logging.comm_timing)
    if name == "fsdp":
        from harness.parallel.distributed import FSDPBackend

        return FSDPBackend(env, cfg.parallel, cfg.logging.comm_timing)
    if name == "deepspeed":
        from harness.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(env, cfg.parallel, batch.micro_batch_size, batch.gradient_accumulation_steps,
                                cfg.optim.grad_clip, cfg.logging.comm_timing)  # fmt: skip
    raise ConfigError(f"parallel.name={name!r} is not one of none, ddp, fsdp, deepspeed")
