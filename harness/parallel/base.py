"""The one interface every parallelism backend implements; the trainer only talks to this.

A backend is built from its own config section (``Backend.from_config``) and the mesh
(:class:`~harness.parallel.dims.ParallelDims`), then ``parallelize`` applies, in torchtitan's
order: tensor parallelism (``parallel.tp > 1``, :mod:`harness.parallel.tensor`) -> activation
checkpointing -> ``torch.compile`` per block ->
the backend's data-parallel wrapping (FSDP2 sharding, DDP, device placement; DeepSpeed's engine
wraps at ``build_optimizer``).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness.config import BatchSizes, OptimConfig, ParallelConfig
from harness.dist import DistEnv
from harness.parallel.dims import ParallelDims

if TYPE_CHECKING:
    from harness.data import MicroBatch


@dataclass
class CommStats:
    """Collectives issued during one step, on this rank.

    Attributes:
        comm_s: seconds spent in collectives.
        comm_exposed_s: seconds of ``comm_s`` not overlapped with compute (None: not measured).
        comm_bytes: bytes moved by this rank's collectives (nccl-tests "size").
        busbw_gbps: bus bandwidth in GB/s (None when there were no collectives).
        bytes_by_op: ``comm_bytes`` split by collective (all_reduce, all_gather, reduce_scatter, ...).
        by_dim: split by mesh dimension: ``{dim: {comm_s, comm_bytes, calls, bytes_by_op}}``
            (``tp``, ``dp_shard``, ``dp_replicate``, ``dp``, ``world``; see ``harness.parallel.comm``).
    """

    comm_s: float = 0.0
    comm_exposed_s: float | None = 0.0
    comm_bytes: int = 0
    busbw_gbps: float | None = None
    bytes_by_op: dict | None = None
    by_dim: dict | None = None


def build_adamw(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only (dim >= 2: linear
    and embedding weights), none on biases and norm gains (the GPT-2 / nanoGPT grouping). A DeepSpeed
    ZeRO-3 parameter is grouped by its whole shape (``ds_shape``; its data is an empty placeholder).

    ``optim.fused`` null picks the fused kernel on CUDA and the foreach one elsewhere.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def _on_meta(model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a ``transformers`` causal LM (LLaMA ``model.layers``, GPT-2
    ``transformer.h``)."""
    for path in ("model.layers", "transformer.h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj.values()) if isinstance(obj, torch.nn.ModuleDict) else list(obj)  # a stage's
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def apply_activation_checkpointing(model: torch.nn.Module, every: int = 1) -> None:
    """Recompute the activations of blocks ``0, every, 2*every, ...`` in backward (non-reentrant
    ``torch.utils.checkpoint`` through ``transformers``; 1 = all blocks). The rule of torchtitan's
    layer-selective activation checkpointing and of ``transformers``' ``every_n_layers``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: selective built in
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, block in enumerate(transformer_blocks(model)):
        block.gradient_checkpointing = i % every == 0


def apply_compile(model: torch.nn.Module) -> None:
    """``nn.Module.compile()`` on each transformer block (torchtitan: per block, after activation
    checkpointing, before FSDP)."""
    for block in transformer_blocks(model):
        block.compile()


class Backend(ABC):
    """How a model is placed, synchronized, stepped and checkpointed across processes.

    Lifecycle: ``from_config`` -> ``parallelize(model)`` -> ``build_optimizer`` (after sharding) -> per step:
    ``forward_backward`` over the step's micro-batches (``accumulate(is_last)`` around each one's
    forward and ``backward``), then ``clip_and_step`` once, ``comm_stats``; ``evaluate_sums`` for
    validation. ``save``/``load`` write and read the model and
    optimizer state into a checkpoint directory (every rank its own part).

    Loss convention: the loss passed to ``backward`` is already normalized by the step's
    target tokens summed over all ranks, so gradients must be summed (not averaged) over
    data-parallel ranks; backends whose reduction averages multiply by ``world_size`` first.
    """

    name = "base"
    # what fills a meta model's parameters once they have storage (set by parallelize)
    _init: Callable[[torch.nn.Module], None] | None = None
    # What save() writes and load() reads; a checkpoint of another format is refused before the model.
    checkpoint_format = "torch"
    # Whether save_async() stages the state and writes it in the background (DCP's async_save).
    async_save = False
    # Whether load() reshards a checkpoint written at another world size.
    reshardable = True

    def __init__(self, env: DistEnv, cfg: ParallelConfig, dims: ParallelDims):
        self.env = env
        self.cfg = cfg
        self.dims = dims
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.pipeline = None  # harness.parallel.pipeline.Pipeline when parallel.pp > 1
        self.context = None  # harness.parallel.context.ContextParallel when parallel.cp > 1

    @property
    def grad_scale(self) -> int:
        """What :meth:`backward` multiplies the loss by (the data-parallel size where the gradient
        reduction averages, see the class docstring); a pipeline's loss function applies it."""
        return 1

    @classmethod
    def from_config(
        cls,
        cfg: ParallelConfig,
        env: DistEnv,
        dims: ParallelDims,
        batch: BatchSizes,
        optim: OptimConfig,
        comm_timing: bool,
    ) -> Backend:
        """This backend for ``cfg`` (its ``parallel`` section) on the mesh ``dims``; distributed
        backends create the process group here.

        Raises:
            ConfigError: a setting this backend cannot honour here.
        """
        return cls(env, cfg, dims)

    def parallelize(
        self,
        model: torch.nn.Module,
        compile_blocks: bool = False,
        init: Callable[[torch.nn.Module], None] | None = None,
    ) -> torch.nn.Module:
        """Apply, in order: tensor parallelism over ``tp`` -> activation checkpointing -> compile ->
        :meth:`wrap`. Returns the module to call forward on.

        ``model`` may be on the meta device (:func:`harness.model.build_model`): everything up to the
        sharding happens there, and :meth:`wrap` gives storage to this rank's shards only and fills them
        with ``init(model)`` (:func:`harness.weights.init_weights`, or released weights).
        """
        self._init = init
        if self.dims.cp > 1:  # the sequence split: this rank's chunks, attention over all of them
            from harness.parallel.context import ContextParallel

            self.context = ContextParallel(self.dims, self.env)
            self.context.apply(model)
        if self.dims.pp > 1:  # split first: each stage gets the rest (harness.parallel.pipeline)
            from harness.parallel.pipeline import Pipeline

            self.pipeline = Pipeline(self.cfg, self.dims, self.env)
            model = self.pipeline.split(model)  # this rank's stages, as one module; then as usual
        if self.dims.tp > 1:
            from harness.parallel.tensor import apply_tensor_parallel

            if not _on_meta(model):
                model.to(self.env.device)
            tp_mesh = self.dims.mesh(self.env.device.type)["tp"]
            apply_tensor_parallel(model, tp_mesh, self.cfg.sequence_parallel, self.cfg.loss_parallel)
        if self.cfg.activation_checkpointing:
            apply_activation_checkpointing(model, self.cfg.activation_checkpointing_every)
        if compile_blocks:
            apply_compile(model)
        self.model = self.wrap(model)
        return self.model

    def materialize(self, model: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
        """``model`` (whole or sharded) with storage on ``device`` (this rank's device by default): a meta
        model is materialized and initialized by :func:`harness.weights.materialize` with the ``init``
        given to :meth:`parallelize`; a model with storage is moved there.

        Raises:
            ValueError: a meta model and no ``init``.
        """
        device = device or self.env.device
        if not _on_meta(model):
            return model.to(device)
        from harness.weights import materialize

        return materialize(model, device, self.init_callable())

    def init_callable(self) -> Callable[[torch.nn.Module], None]:
        """The ``init`` given to :meth:`parallelize`.

        Raises:
            ValueError: none was given (a meta model cannot be filled).
        """
        if self._init is None:
            raise ValueError("a model on the meta device needs parallelize(..., init=...) to fill it")
        return self._init

    @abstractmethod
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard or wrap the model and give it storage on this rank's device (:meth:`materialize`, before
        or after sharding); returns the module to call."""

    def build_optimizer(self, cfg: OptimConfig) -> torch.optim.Optimizer:
        """The torch optimizer (its ``param_groups`` carry the LR the scheduler sets)."""
        self.optimizer = build_adamw(self.model, cfg, self.env.device)
        return self.optimizer

    # -- the step's compute (the train module; with pp > 1 the Pipeline part runs both) ----------

    def forward_backward(
        self,
        micro_batches: list[MicroBatch],
        autocast_dtype: torch.dtype | None = None,
        nan_loss: bool = False,
    ) -> torch.Tensor:
        """Accumulate the gradient of the step's token-mean loss over this rank's ``micro_batches``
        (each ``[micro_batch_size, seq_len]``, on the device; under ``cp`` the rank runs its chunks of
        each, :mod:`harness.parallel.context`); returns that loss (0-d, detached, the same on every
        rank).

        Every micro-batch's summed loss (:func:`~harness.parallel.loss.token_loss_sum`) is divided by
        the number of target tokens in the whole step (all micro-batches, all data-parallel ranks), so
        K micro-batches of B give exactly the gradient of one batch of K*B -- not a mean of
        per-micro-batch means. ``nan_loss`` (fault injection) makes the first micro-batch's loss NaN.
        """
        from harness.parallel.loss import token_loss_sum

        if self.pipeline is not None:
            return self.pipeline.forward_backward(self, micro_batches, autocast_dtype, nan_loss)
        num_targets = self.all_reduce_sum(torch.stack([mb.num_targets() for mb in micro_batches]).sum())
        total = torch.zeros((), device=micro_batches[0].input_ids.device)
        for i, mb in enumerate(micro_batches):
            with self.accumulate(is_last=i == len(micro_batches) - 1), self.loss_context():
                loss = token_loss_sum(self.model, self.local_part(mb), autocast_dtype) / num_targets
                if i == 0 and nan_loss:
                    loss = loss * float("nan")
                self.backward(loss)
            total += loss.detach()
        return self.sum_over_cp(self.all_reduce_sum(total))

    def local_part(self, mb: MicroBatch) -> MicroBatch:
        """This rank's part of ``mb``: all of it, or its chunks of every sequence under ``cp``."""
        return mb if self.context is None else self.context.shard(mb)

    def sum_over_cp(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ``cp`` ranks (their partial losses); ``t`` itself without cp."""
        return t if self.context is None else self.context.sum(t)

    @torch.no_grad()
    def evaluate_sums(
        self, batches: list[MicroBatch], autocast_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed validation loss (nats) and target count over this rank's ``batches`` (moved to the
        device one at a time) and every other data-parallel rank's (0-d tensors); the model is back
        in training mode after."""
        from harness.parallel.loss import token_loss_sum

        if self.pipeline is not None:
            return self.pipeline.evaluate_sums(self, batches, autocast_dtype)
        self.model.eval()
        device = self.env.device
        loss_sum = torch.zeros((), device=device)
        targets = torch.zeros((), device=device, dtype=torch.long)
        for mb in batches:
            mb = mb.to(device)
            with self.loss_context():
                loss_sum += token_loss_sum(self.model, self.local_part(mb), autocast_dtype)
            targets += mb.num_targets()  # of the whole sequences: counted once
        self.model.train()
        return self.sum_over_cp(self.all_reduce_sum(loss_sum)), self.all_reduce_sum(targets)

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch; gradients are synchronized only when ``is_last``."""
        return contextlib.nullcontext()

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Around each micro-batch's loss and backward (loss-parallel cross-entropy under TP)."""
        if self.dims.tp == 1 or not self.cfg.loss_parallel:
            return contextlib.nullcontext()
        from harness.parallel.tensor import loss_context

        return loss_context(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce_sum(self, t: torch.Tensor, world: bool = False) -> torch.Tensor:
        """Sum of ``t`` over the data-parallel ranks (``world``: over every rank); identity on one
        process. The ``tp`` ranks of one data-parallel rank hold the same tokens and losses, so
        step sums run over the data-parallel ranks only."""
        return t

    def clip_and_step(self, max_norm: float, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Clip by the global L2 norm (when ``max_norm > 0``; :mod:`harness.parallel.norm`), step the
        optimizer, zero the gradients.

        With ``loss`` given (the step's loss, equal on every rank), the step is skipped -- no parameter
        or optimizer-state change -- when it or the global norm is not finite; both are the same on
        every rank, so all ranks agree (one host sync).

        Returns:
            ``(norm before clipping (0-d tensor), stepped)``.
        """
        from harness.parallel.norm import clip_grad_norm_

        # plain tensors, FSDP2's and tensor parallelism's DTensors: one norm, computed the same way
        pp_group = self.pipeline.group if self.pipeline is not None else None
        norm = clip_grad_norm_(self.model.parameters(), max_norm, pp_group)
        if loss is not None and not bool(torch.isfinite(norm) & torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, True

    def begin_step(self) -> None:
        """Called as an optimizer step starts (communication counters restart)."""

    def comm_stats(self) -> CommStats:
        """Communication since :meth:`begin_step`."""
        return CommStats()

    def unwrapped(self) -> torch.nn.Module:
        """The ``transformers`` model inside any wrapper."""
        return self.model

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, directory: str) -> None:
        """Write model and optimizer state into ``directory`` (plain ``torch.save`` files)."""
        if self.env.is_main:
            torch.save(self.unwrapped().state_dict(), os.path.join(directory, "model.pt"))
            torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def written_files(self, directory: str) -> list[str]:
        """The files (paths relative to ``directory``) that this rank's :meth:`save` wrote there."""
        return ["model.pt", "optimizer.pt"] if self.env.is_main else []

    def save_async(self, directory: str) -> Future:
        """Stage this rank's model and optimizer state (a copy in CPU memory) and write it into
        ``directory`` in a background thread; returns as soon as the copy is made. Only where
        :attr:`async_save`.

        Returns:
            The write's future: ``result()`` raises what the write raised.
        """
        raise NotImplementedError(f"parallel={self.name} saves synchronously")

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote (``weights_only`` loading, see ``harness.checkpoint``)."""
        from harness.checkpoint import load_checkpoint

        objs, _ = load_checkpoint(directory, names=("model", "optimizer"))
        self.unwrapped().load_state_dict(objs["model"])
        self.optimizer.load_state_dict(objs["optimizer"])

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict on rank 0's CPU (None on other ranks); collective."""
        return {k: v.detach().cpu() for k, v in self.unwrapped().state_dict().items()}

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order, on every rank (over all ranks, tp included;
        ``[obj]`` on one process). Pads to the largest object: keep them small."""
        return [obj]

    def broadcast_object(self, obj):
        """Rank 0's picklable ``obj`` on every rank (``obj`` itself on one process)."""
        return obj

    def close(self) -> None:
        """Release process groups etc."""
