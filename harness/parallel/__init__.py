"""Parallelism backends behind one interface (:class:`Backend`), applied over one named mesh
(:class:`ParallelDims`) and chosen by ``parallel=<name>`` through :data:`BACKENDS`:
``none`` (one process), ``ddp``, ``fsdp`` (FSDP2, HSDP on ``dp_replicate x dp_shard``) and
``deepspeed`` (ZeRO 0-3, imported only when chosen).

Adding a backend: a ``Backend`` subclass with ``wrap`` (and whatever it overrides), a schema class
extending ``ParallelConfig`` in ``harness/config/schema.py`` (``PARALLEL_SCHEMAS``), a
``configs/parallel/<name>.yaml`` whose defaults name ``<name>_schema``, and one line here.
"""

from __future__ import annotations

import importlib

from harness.config import BatchSizes, OptimConfig, ParallelConfig
from harness.dist import DistEnv
from harness.parallel.base import Backend, CommStats, build_adamw
from harness.parallel.dims import ParallelDims

__all__ = [
    "BACKENDS",
    "Backend",
    "CommStats",
    "ParallelDims",
    "backend_class",
    "build_adamw",
    "build_backend",
]

# parallel.name -> "module:Class", imported when chosen (so a one-process run never imports DeepSpeed).
BACKENDS = {
    "none": "harness.parallel.none:SingleProcess",
    "ddp": "harness.parallel.distributed:DDPBackend",
    "fsdp": "harness.parallel.distributed:FSDPBackend",
    "deepspeed": "harness.parallel.deepspeed:DeepSpeedBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The :class:`Backend` subclass registered as ``name``."""
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(
    cfg: ParallelConfig,
    env: DistEnv,
    dims: ParallelDims,
    batch: BatchSizes,
    optim: OptimConfig,
    comm_timing: bool = True,
) -> Backend:
    """The backend ``cfg.name`` for this process on the mesh ``dims`` (creates the process group).

    Raises:
        ConfigError: ``parallel=none`` with more than one process, or a backend's own check fails.
    """
    return backend_class(cfg.name).from_config(cfg, env, dims, batch, optim, comm_timing)
