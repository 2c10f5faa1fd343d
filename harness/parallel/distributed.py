"""Data-parallel backends over ``torch.distributed``: DDP and FSDP2 (DeepSpeed in ``deepspeed.py``).

All of them create the process group from the launcher's environment (``harness.dist``),
install the communication tracker (``harness.parallel.comm``) before any collective runs,
and checkpoint DDP/FSDP2 state with ``torch.distributed.checkpoint`` (sharded: every rank
writes its part; loading reshards, so a run can resume at another world size).
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future

import torch
import torch.distributed as dist

from harness.config import BatchSizes, FSDPConfig, OptimConfig, ParallelConfig
from harness.dist import DistEnv, broadcast_object, gather_object, init_distributed, shutdown_distributed
from harness.errors import CheckpointError, ConfigError
from harness.parallel import comm
from harness.parallel.base import Backend, CommStats, _on_meta, transformer_blocks
from harness.parallel.dcp import DCP_DIR, load_dcp, save_dcp, save_dcp_async, written_dcp_files
from harness.parallel.dims import ParallelDims


class DistributedBackend(Backend):
    """Shared by the multi-process backends: process group, comm tracking, collectives, and
    ``torch.distributed.checkpoint`` (every rank writes its part; loading reshards)."""

    checkpoint_format = "dcp"
    async_save = True
    _checkpoint_group = None  # gloo, for DCP's collectives in the background write (made at the first)

    def __init__(self, env: DistEnv, cfg: ParallelConfig, dims: ParallelDims, comm_timing: bool = True):
        super().__init__(env, cfg, dims)
        self.tracker = comm.install(cuda_timing=env.device.type == "cuda") if comm_timing else None
        init_distributed(env, cfg.timeout_s)
        self.dp_group = dims.dp_group(env.device.type)
        if self.tracker is not None:
            self.tracker.group_dims = dims.group_dims(env.device.type)
            self.tracker.rank_dims = dims.rank_dims(env.device.type)

    @classmethod
    def from_config(
        cls,
        cfg: ParallelConfig,
        env: DistEnv,
        dims: ParallelDims,
        batch: BatchSizes,
        optim: OptimConfig,
        comm_timing: bool,
    ) -> DistributedBackend:
        return cls(env, cfg, dims, comm_timing)

    def begin_step(self) -> None:
        if self.tracker is not None:
            self.tracker.reset()

    def comm_stats(self) -> CommStats:
        if self.tracker is None:
            return CommStats(0.0, None, 0, None, None, None)
        return self.tracker.stats()

    def all_reduce_sum(self, t: torch.Tensor, world: bool = False) -> torch.Tensor:
        t = t.clone()
        if world or self.dims.tp * self.dims.pp * self.dims.cp == 1:
            dist.all_reduce(t)
        elif self.dp_group is not None:
            dist.all_reduce(t, group=self.dp_group)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def gather_object(self, obj) -> list:
        """Over the default (world) group (:func:`harness.dist.gather_object`)."""
        return gather_object(obj)

    def broadcast_object(self, obj):
        return broadcast_object(obj)

    def close(self) -> None:
        shutdown_distributed()

    # -- torch.distributed.checkpoint ----------------------------------------------------------

    def _state_module(self) -> torch.nn.Module:
        return self.model

    def save(self, directory: str) -> None:
        save_dcp(self._state_module(), self.optimizer, directory)

    def save_async(self, directory: str) -> Future:
        """DCP's ``async_save`` (:func:`~harness.parallel.dcp.save_dcp_async`); its collectives run in
        the background thread on a gloo process group of the checkpoint's own, created once, at the
        first call (every rank makes its first save at the same step)."""
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return save_dcp_async(self._state_module(), self.optimizer, directory, self._checkpoint_group)

    def written_files(self, directory: str) -> list[str]:
        return written_dcp_files(directory, self.env.rank)

    def load(self, directory: str) -> None:
        if not os.path.isdir(os.path.join(directory, DCP_DIR)):
            raise CheckpointError(
                f"checkpoint {directory} has no {DCP_DIR}/ (it was not written by parallel=none|ddp|fsdp); "
                "resume it with the backend that wrote it, or export it with python -m harness.export"
            )
        load_dcp(self._state_module(), self.optimizer, directory)

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.pipeline is not None:
            return self.pipeline.gather_on_rank0(self._stage_state_dict())
        sd = get_model_state_dict(
            self._state_module(), options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return sd if self.env.is_main else None

    def _stage_state_dict(self) -> dict:
        """This rank's pipeline part, whole, on the CPU of the ranks that send it to rank 0 (empty
        elsewhere): gathered one tensor at a time (``full_tensor``, collective over the stage's
        dp_shard x tp ranks), so a rank's device holds one whole tensor beyond its shards."""
        from torch.distributed.tensor import DTensor

        keeps = self.pipeline.sends_stage()
        out = {}
        for name, value in self._state_module().state_dict().items():
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            if keeps:
                out[name] = whole.detach().cpu()
        return out


def _sum_allreduce_hook(_state, bucket):
    """DDP comm hook: sum (not average) the bucket, through the tracked ``dist.all_reduce``."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DDPBackend(DistributedBackend):
    """``torch.nn.parallel.DistributedDataParallel``; ``no_sync`` on all but the step's last micro-batch."""

    name = "ddp"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = self.materialize(model)
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.ddp = DDP(model, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)
        self.ddp.register_comm_hook(None, _sum_allreduce_hook)
        return self.ddp

    def accumulate(self, is_last: bool):
        return contextlib.nullcontext() if is_last else self.ddp.no_sync()

    def unwrapped(self) -> torch.nn.Module:
        return self.ddp.module


_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}


class FSDPBackend(DistributedBackend):
    """FSDP2: ``fully_shard`` on every transformer block and on the root, over ``dp_shard`` (2-D
    with tensor parallelism over ``tp``; with one data-parallel rank, tensor parallelism alone).

    Gradients are reduce-scattered only on the step's last micro-batch
    (``set_requires_gradient_sync``; each rank holds its model's unsharded gradients in between), or
    after every micro-batch with ``reduce_grads_every_micro_batch`` (they stay sharded); FSDP2
    averages over ranks, so the loss is scaled by the data-parallel size to keep the sum convention
    (see :class:`Backend`).
    """

    name = "fsdp"
    cfg: FSDPConfig

    def __init__(self, env: DistEnv, cfg: FSDPConfig, dims: ParallelDims, comm_timing: bool = True):
        if cfg.cpu_offload and env.device.type != "cuda":
            raise ConfigError(
                "parallel.cpu_offload=true offloads GPU state to the CPU and needs a GPU; drop it on CPU runs"
            )
        super().__init__(env, cfg, dims, comm_timing)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        c = self.cfg
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[c.param_dtype], reduce_dtype=_DTYPES[c.reduce_dtype])
        offload = CPUOffloadPolicy() if c.cpu_offload else OffloadPolicy()
        meta = _on_meta(model)  # sharded first, then only this rank's shards get storage
        if not meta and not c.cpu_offload:
            model = model.to(self.env.device)
        if self.dims.dp * self.dims.cp == 1:  # tensor parallel only: nothing to shard over
            return self.materialize(model)
        kw = {"mesh": self.dims.fsdp_mesh(self.env.device.type), "mp_policy": mp, "offload_policy": offload}
        # under pp a stage runs several micro-batches' forwards before their backwards: keep the
        # parameters gathered between them (torchtitan's choice for pipelined stages)
        reshard = c.reshard_after_forward and self.dims.pp == 1
        for block in transformer_blocks(model):
            fully_shard(block, reshard_after_forward=reshard, **kw)
        # the root: the model, or each pipeline stage (the part is never called itself)
        for root in self.pipeline.views if self.pipeline is not None else [model]:
            fully_shard(root, reshard_after_forward=reshard, **kw)
        if meta:  # offloaded shards live on the CPU
            self.materialize(model, torch.device("cpu") if c.cpu_offload else None)
        return model

    def accumulate(self, is_last: bool):
        if self.dims.dp * self.dims.cp > 1:
            self.model.set_requires_gradient_sync(is_last or self.cfg.reduce_grads_every_micro_batch)
        return contextlib.nullcontext()

    @property
    def grad_scale(self) -> int:
        return self.dims.dp * self.dims.cp  # FSDP2 averages over the data-parallel (x cp) ranks

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.grad_scale).backward()
