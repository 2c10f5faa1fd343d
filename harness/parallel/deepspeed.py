"""``parallel=deepspeed``: DeepSpeed ZeRO stage 0-3 with the DeepSpeed config generated from ours.

The engine owns gradient reduction, clipping (``gradient_clipping``), the optimizer step
and its checkpoint format. The step's micro-batch count varies with the batch-size ramp,
so the accumulation boundary is set explicitly on every micro-batch
(``set_gradient_accumulation_boundary``) instead of DeepSpeed's fixed counter, and the
LR scheduler stays ours (stepped once per optimizer step by the loop).
"""

from __future__ import annotations

import copy
import json
import os
import re

import torch

from harness.config import BatchSizes, DeepSpeedConfig, OptimConfig
from harness.dist import DistEnv
from harness.errors import CheckpointError, ConfigError
from harness.parallel.base import _on_meta, build_adamw
from harness.parallel.dims import ParallelDims
from harness.parallel.distributed import DistributedBackend

DS_TAG = "deepspeed"
# Keys we generate from train.* / optim.*; a ds_config that sets them differently is an error.
_OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "train_batch_size": "train.global_batch_size",
    "gradient_clipping": "optim.grad_clip",
}


# Top-level DeepSpeed config sections besides the names in deepspeed.runtime.constants.
_SECTIONS = {
    "zero_optimization",
    "activation_checkpointing",
    "flops_profiler",
    "comms_logger",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "aio",
    "compile",
    "data_efficiency",
    "data_types",
    "checkpoint",
    "elasticity",
    "autotuning",
    "amp",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "sparse_gradients",
    "memory_breakdown",
    "dump_state",
    "pipeline",
    "curriculum_learning",
    "progressive_layer_drop",
    "eigenvalue",
    "quantize_training",
    "compression_training",
    "sparse_attention",
    "nebula",
    "timers",
    "torch_autocast",
    "seq_parallel_communication_data_type",
    "zenflow",
    "managed_gradient_accumulation",
    "hybrid_engine",
    "weight_quantization",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "fp16",
    "bf16",
}


def _check_keys(user: dict) -> None:
    """A top-level key DeepSpeed does not know, that is one typo away from one it does, is an error
    (DeepSpeed itself ignores unknown keys, so the setting would silently have no effect)."""
    import difflib

    import deepspeed.runtime.constants as c

    known = _SECTIONS | {v for k, v in vars(c).items() if k.isupper() and isinstance(v, str)}
    for key in user:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"parallel.ds_config: unknown key {key!r} (did you mean {close[0]!r}?)")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(
    cfg: DeepSpeedConfig,
    micro_batch_size: int,
    accumulation: int,
    world_size: int,
    grad_clip: float,
    cuda: bool,
) -> dict:
    """The DeepSpeed JSON config for this run, with ``parallel.ds_config`` merged over it.

    Raises:
        ConfigError: ``parallel.ds_config`` is not a readable JSON file or dict, or it sets a key
            that the harness owns (batch sizes, clipping) to another value.
    """
    bf16 = cfg.bf16 if cfg.bf16 is not None else cuda
    zero: dict = {"stage": cfg.zero_stage}
    extra: dict = {}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        extra["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps the offloaded states
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    generated = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **extra,
    }
    user = cfg.ds_config
    if user is None:
        return generated
    if isinstance(user, str):
        try:
            with open(os.path.expanduser(user)) as f:
                user = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"parallel.ds_config={cfg.ds_config!r} is not a readable JSON file: {e}") from e
    if not isinstance(user, dict):
        user = dict(user)
    _check_keys(user)
    for key, ours in _OWNED.items():
        if key in user and user[key] != generated[key]:
            raise ConfigError(
                f"parallel.ds_config sets {key}={user[key]}, but the harness derives it ({generated[key]}) "
                "from "
                f"{ours}; set {ours} instead"
            )
    return _merge(generated, user)


class DeepSpeedBackend(DistributedBackend):
    """A ``deepspeed.DeepSpeedEngine`` around the ``transformers`` model."""

    name = "deepspeed"
    checkpoint_format = "deepspeed"
    reshardable = False  # DeepSpeed checkpoints resume only at the world size that wrote them
    async_save = False  # DeepSpeed writes its own files, synchronously
    cfg: DeepSpeedConfig

    def __init__(
        self,
        env: DistEnv,
        cfg: DeepSpeedConfig,
        dims: ParallelDims,
        batch: BatchSizes,
        grad_clip: float,
        comm_timing: bool = True,
    ):
        super().__init__(env, cfg, dims, comm_timing)
        import deepspeed

        self.ds_config = deepspeed_config(
            cfg,
            batch.micro_batch_size,
            batch.gradient_accumulation_steps,
            env.world_size,
            grad_clip,
            env.device.type == "cuda",
        )
        deepspeed.init_distributed(dist_backend="nccl" if env.device.type == "cuda" else "gloo")
        try:
            from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

            parsed = DSConfig(copy.deepcopy(self.ds_config))
        except Exception as e:
            raise ConfigError(
                f"parallel.ds_config: DeepSpeed rejects the merged config: {' '.join(str(e).split())[:300]}"
            ) from e
        # the dtype the engine trains the parameters in (ZeRO-3 partitions must already be in it)
        self.param_dtype = (
            torch.bfloat16
            if parsed.bfloat16_config.enabled
            else torch.half
            if parsed.float16_config.enabled
            else torch.float32
        )
        self._is_last = True

    @classmethod
    def from_config(
        cls,
        cfg: DeepSpeedConfig,
        env: DistEnv,
        dims: ParallelDims,
        batch: BatchSizes,
        optim: OptimConfig,
        comm_timing: bool,
    ) -> DeepSpeedBackend:
        return cls(env, cfg, dims, batch, optim.grad_clip, comm_timing)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3 and a meta model: :meth:`partition` (this rank holds its partitions only). Otherwise
        the whole model on this rank's device (what ZeRO 0-2 hold anyway; ``deepspeed.initialize``
        partitions a ZeRO-3 model that already has storage)."""
        if self.cfg.zero_stage == 3 and _on_meta(model):
            self.module = self.partition(model)
        else:
            self.module = self.materialize(model)
        return self.module  # replaced by the engine in build_optimizer

    def partition(self, model: torch.nn.Module) -> torch.nn.Module:
        """Build the ZeRO-3 parameters of a meta ``model`` one at a time (:func:`harness.weights.
        materialize_each`): each becomes a whole tensor on this rank's device in the engine's dtype
        (fp32, or bf16/fp16 when enabled), is filled by the ``init`` given to :meth:`parallelize` on a
        one-parameter view of the model (every rank calls it, DeepSpeed keeps rank 0's values), then
        DeepSpeed broadcasts it from rank 0 and keeps this rank's ``1/world`` slice (``p.ds_tensor``;
        with ``offload_param`` on the CPU), as ``deepspeed.zero.Init`` does for a model constructed
        inside it. Peak memory per rank: its partitions plus one whole parameter and its fp32 draw. (On
        the CPU, glibc's heap can keep the freed whole parameters as holes between the partitions:
        ``MALLOC_MMAP_THRESHOLD_=1048576`` returns them. Not measured on a GPU.)

        A loader given as ``init`` is called once per parameter with a module holding only that
        parameter (whole, under its name in the bare ``transformers`` model; a tied one once): it must
        fill the parameters the module has and not require the others.

        Raises:
            ValueError: no ``init`` was given to :meth:`parallelize`.
        """
        import deepspeed

        from harness.weights import materialize_each

        init = self.init_callable()
        first: list[torch.nn.Parameter] = []

        def convert(p: torch.nn.Parameter) -> None:
            if first:  # the conversion DeepSpeed's engine applies to parameters added later
                first[0].convert_to_zero_parameters([p])
                return
            holder = torch.nn.Module()
            holder.register_parameter("weight", p)
            deepspeed.zero.Init(
                module=holder, config_dict_or_path=copy.deepcopy(self.ds_config), dtype=self.param_dtype
            )
            first.append(p)

        return materialize_each(model, self.env.device, init, convert, self.param_dtype)

    def build_optimizer(self, cfg: OptimConfig) -> torch.optim.Optimizer:
        import deepspeed

        self.optimizer = build_adamw(self.module, cfg, self.env.device)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.module, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False
        )
        self.model = self.engine
        return self.optimizer

    def accumulate(self, is_last: bool):
        import contextlib

        self._is_last = is_last
        self.engine.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over data-parallel ranks: scale to keep the sum convention.
        self.engine.backward(loss * self.dims.dp, scale_wrt_gas=False)
        if not self._is_last:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter

    def clip_and_step(self, max_norm: float, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """The engine clips and steps; with ``loss`` given, a non-finite loss returns before the step
        (for ``train.nonfinite=abort``; DeepSpeed cannot skip a step it has started)."""
        if loss is not None and not bool(torch.isfinite(loss)):
            return torch.tensor(float("nan")), False
        norm = None
        if self.cfg.zero_stage == 0:  # the engine clips but does not keep the norm without ZeRO
            from harness.parallel.norm import total_grad_norm

            norm = total_grad_norm([p.grad for p in self.module.parameters() if p.grad is not None]).float()
        self.engine.step()
        if norm is None:
            value = self.engine.get_global_grad_norm()
            norm = torch.as_tensor(float(value) if value is not None else float("nan"))
        return norm, loss is None or bool(torch.isfinite(norm))

    def unwrapped(self) -> torch.nn.Module:
        return self.module

    def save(self, directory: str) -> None:
        self.engine.save_checkpoint(directory, tag=DS_TAG, client_state={}, save_latest=False)

    def written_files(self, directory: str) -> list[str]:
        """DeepSpeed names each data-parallel rank's ZeRO files ``*zero_pp_rank_<r>_*``; the rest of
        ``deepspeed/`` (the model states of ZeRO 0-2, the recovery script) is rank 0's. Its
        ``save_checkpoint`` ends with a barrier, so every file is there when this is asked."""
        out = []
        root = os.path.join(directory, DS_TAG)
        for dirpath, _, names in os.walk(root):
            for name in names:
                m = re.search(r"zero_pp_rank_(\d+)_", name)
                if (int(m.group(1)) if m else 0) == self.env.rank:
                    out.append(os.path.relpath(os.path.join(dirpath, name), directory))
        return sorted(out)

    def load(self, directory: str) -> None:
        if not os.path.isdir(os.path.join(directory, DS_TAG)):
            raise CheckpointError(
                f"checkpoint {directory} has no {DS_TAG}/ (it was not written by parallel=deepspeed); resume "
                "it "
                "with the backend that wrote it, or export it with python -m harness.export"
            )
        path, _ = self.engine.load_checkpoint(
            directory, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory}/{DS_TAG}")

    def full_state_dict(self) -> dict | None:
        if self.cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # collective; full tensors on rank 0
        else:
            sd = self.module.state_dict()
        return {k: v.detach().cpu() for k, v in sd.items()} if self.env.is_main else None
