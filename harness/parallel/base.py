"""The one interface every parallelism backend implements; the loop only talks to this."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from harness.config import OptimConfig
from harness.dist import DistEnv


@dataclass
class CommStats:
    """Collectives issued during one step, on this rank.

    Attributes:
        comm_s: seconds spent in collectives.
        comm_exposed_s: seconds of ``comm_s`` not overlapped with compute (None: not measured).
        comm_bytes: bytes moved by this rank's collectives.
        busbw_gbps: bus bandwidth in GB/s (None when there were no collectives).
    """

    comm_s: float = 0.0
    comm_exposed_s: float | None = 0.0
    comm_bytes: int = 0
    busbw_gbps: float | None = None


def build_adamw(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only (dim >= 2: linear
    and embedding weights), none on biases and norm gains (the GPT-2 / nanoGPT grouping).

    ``optim.fused`` null picks the fused kernel on CUDA and the foreach one elsewhere.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


class Backend(ABC):
    """How a model is placed, synchronized and stepped across processes.

    Lifecycle: ``setup(model)`` -> ``build_optimizer`` (after sharding) -> per step:
    ``accumulate(is_last)`` around each micro-batch's forward/backward, ``clip_grad_norm``,
    ``optimizer_step``, ``zero_grad``, ``comm_stats``.
    """

    def __init__(self, env: DistEnv):
        self.env = env
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place (and wrap or shard) the model; returns the module to call forward on."""

    def build_optimizer(self, cfg: OptimConfig) -> torch.optim.Optimizer:
        self.optimizer = build_adamw(self.model, cfg, self.env.device)
        return self.optimizer

    def accumulate(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch; gradients are synchronized only when ``is_last``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over data-parallel ranks (identity on one process)."""
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Max of ``t`` over ranks (identity on one process)."""
        return t

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of all gradients before clipping (0-d tensor); clips when ``max_norm > 0``."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def comm_stats(self) -> CommStats:
        """Communication of the step that just ended (and reset the counters)."""
        return CommStats()

    def unwrapped(self) -> torch.nn.Module:
        """The plain ``transformers`` model (for export and evaluation)."""
        return self.model

    def model_state_dict(self) -> dict:
        return self.unwrapped().state_dict()

    def load_model_state_dict(self, state: dict) -> None:
        self.unwrapped().load_state_dict(state)

    def close(self) -> None:
        """Release process groups etc."""
