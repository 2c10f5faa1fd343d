"""Context parallelism over the mesh's ``cp`` dimension: every sequence split across ``cp`` ranks.

Each rank keeps ``seq_len / cp`` tokens of every sequence of its data-parallel rank's micro-batches,
two chunks of ``seq_len / (2 cp)``: chunk ``r`` and its mirror ``2 cp - 1 - r`` (:func:`chunk_positions`),
so that under the causal mask every rank attends to the same number of keys (the load balance of
Megatron-LM's and torchtitan's context parallelism). Its inputs keep their true position ids, so RoPE
rotates them as in the whole sequence.

Attention is a ``transformers`` attention implementation (:data:`ATTENTION`, registered in its
``AttentionInterface``), so the model code stays ``transformers``': each layer all-gathers the keys and
values of the ``cp`` ranks (:class:`_GatherSeq`, whose backward reduce-scatters their gradients back)
and runs each local query chunk through SDPA against the keys up to its own end, with the causal mask
aligned to the bottom right (``causal_lower_right``: query ``i`` of a chunk ending at key ``e`` sees keys
``<= e - C + i``), which is the whole sequence's causal mask restricted to the chunk.

The loss of a micro-batch is each rank's summed cross-entropy over its own targets divided by the step's
target tokens counted on the whole sequences (:meth:`harness.parallel.base.Backend.forward_backward`):
tokens are counted once, and the cp ranks' partial losses sum, over the ``cp`` group, to the one
process's. FSDP2 shards over ``dp_shard x cp`` (:meth:`~harness.parallel.dims.ParallelDims.fsdp_mesh`), so
its gradient reduction sums the cp ranks' partial gradients with the data-parallel ones.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.attention.bias import causal_lower_right

if TYPE_CHECKING:
    from harness.data import MicroBatch

ATTENTION = "harness_context_parallel"  # model.config._attn_implementation under parallel.cp > 1
_ACTIVE: ContextParallel | None = None  # this process's (one model per process)


def chunk_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The positions (``[seq_len / cp]`` int64) of the two chunks ``rank`` and ``2 cp - 1 - rank`` of
    ``2 cp`` equal chunks of a sequence of ``seq_len`` tokens, in that order."""
    size = seq_len // (2 * cp)
    head = torch.arange(rank * size, (rank + 1) * size)
    return torch.cat([head, head + (2 * cp - 1 - 2 * rank) * size])


class _GatherSeq(torch.autograd.Function):
    """All-gather ``[b, heads, S/cp, d]`` of every cp rank into ``[cp, b, heads, S/cp, d]`` (rank order);
    backward: the gradient's reduce-scatter (sum) back to each rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out.view(n, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(out, grad.reshape(-1, *grad.shape[2:]).contiguous(), group=ctx.group)
        return out, None


def _whole(parts: torch.Tensor) -> torch.Tensor:
    """``[cp, b, h, 2C, d]`` gathered in rank order -> ``[b, h, 2 cp C, d]`` in sequence order: rank r's
    first chunk is chunk r, its second chunk ``2 cp - 1 - r``."""
    cp, b, h, local, d = parts.shape
    halves = parts.view(cp, b, h, 2, local // 2, d)
    head = halves[:, :, :, 0].permute(1, 2, 0, 3, 4).reshape(b, h, cp * local // 2, d)
    tail = halves[:, :, :, 1].flip(0).permute(1, 2, 0, 3, 4).reshape(b, h, cp * local // 2, d)
    return torch.cat([head, tail], dim=2)


def attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """The attention of :data:`ATTENTION`: ``query`` ``[b, heads, S/cp, d]`` (this rank's two chunks),
    ``key``/``value`` ``[b, kv_heads, S/cp, d]``; returns ``([b, S/cp, heads, d], None)`` as
    ``transformers``' SDPA attention does. ``attention_mask`` is unused: the mask is causal (the document
    mask is refused under cp).

    The dry run (``plan.dry_run=true``, :mod:`harness.dryrun`) sets :attr:`ContextParallel.fake_trace`:
    under its ``FakeTensorMode`` the lower-right mask, a tensor subclass, cannot be made, so each chunk
    runs SDPA with ``is_causal=True`` instead: the same shapes, the same flash kernel and so the same
    bytes (its output and a ``[b, heads, S/(2 cp)]`` log-sum-exp; no values are computed under that mode,
    so the mask's alignment does not matter). A flag, not a check for fake tensors: ``torch.compile``
    traces with fake tensors too, and must keep the real mask.
    """
    cp = _ACTIVE
    keys, values = (_whole(_GatherSeq.apply(t, cp.group)) for t in (key, value))
    gqa = query.shape[1] != keys.shape[1]  # grouped-query attention: SDPA maps each kv head to its group
    size = query.shape[2] // 2
    traced = cp.fake_trace  # the dry run's stand-in for the mask (see above)
    out = []
    for i, chunk in enumerate((cp.rank, 2 * cp.cp - 1 - cp.rank)):
        end = (chunk + 1) * size
        q = query[:, :, i * size : (i + 1) * size]
        mask = None if traced else causal_lower_right(size, end)
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                q,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=mask,
                is_causal=traced,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def local_positions(length: int, device: torch.device) -> torch.Tensor:
    """Positions ``[length]`` of this rank's tokens of a sequence: ``0..length-1`` without context
    parallelism, the rank's two chunks of a ``length x cp``-token sequence under it (a pipeline stage's
    rotary tables, :class:`harness.parallel.pipeline.StageView`)."""
    if _ACTIVE is None:
        return torch.arange(length, device=device)
    return chunk_positions(length * _ACTIVE.cp, _ACTIVE.cp, _ACTIVE.rank).to(device)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, attention)


class ContextParallel:
    """This rank's place on the ``cp`` dimension: which chunks of every sequence it keeps
    (:meth:`shard`), the attention that joins them (:meth:`apply`), and the sum of the ranks' partial
    losses (:meth:`sum`). Built by :meth:`harness.parallel.base.Backend.parallelize` when
    ``parallel.cp > 1``."""

    def __init__(self, dims, env):
        self.cp = dims.cp
        self.rank = dims.cp_rank(env.rank)
        self.group = dims.cp_group(env.device.type)
        self.fake_trace = False  # set by the dry run: its FakeTensorMode cannot make the mask (attention)
        self._positions: dict[int, torch.Tensor] = {}

    def apply(self, model: torch.nn.Module) -> None:
        """Make ``model`` (a ``transformers`` Llama) attend through :data:`ATTENTION`."""
        global _ACTIVE
        _register()
        _ACTIVE = self
        model.config._attn_implementation = ATTENTION

    def shard(self, mb: MicroBatch) -> MicroBatch:
        """This rank's part of ``mb`` (``[b, S]`` -> ``[b, S/cp]``): its two chunks of the inputs and
        labels, with their positions in the whole sequence."""
        seq_len = mb.input_ids.shape[1]
        if seq_len not in self._positions:
            self._positions[seq_len] = chunk_positions(seq_len, self.cp, self.rank).to(mb.input_ids.device)
        idx = self._positions[seq_len]
        return replace(
            mb,
            input_ids=mb.input_ids[:, idx],
            labels=mb.labels[:, idx],
            position_ids=idx.expand(mb.input_ids.shape[0], -1),
        )

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ``cp`` ranks (the partial losses of one set of sequences)."""
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t
