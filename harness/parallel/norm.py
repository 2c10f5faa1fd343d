"""The global gradient L2 norm and its clipping, computed the same way by every torch backend
(one process, DDP, FSDP2, tensor parallelism on any mesh, DeepSpeed without ZeRO).

Each rank takes the L2 norm of each of its local gradient tensors (whole tensors, FSDP2 shards,
tensor-parallel shards) in float64 (``torch._foreach_norm(..., dtype=float64)``; float32 on a device
without float64), sums their squares, all-reduces that sum once over every mesh dimension its
tensors are split on (``Shard`` and FSDP2's ``_StridedShard`` alike; replicated dimensions hold
copies and are not summed) and takes the root.

Why float64: torch's float32 ``vector_norm`` / ``_foreach_norm`` on CPU accumulates a tensor's squares
with an error that grows with its size (measured: -1.1e-5 relative on a 4096 x 256 tensor of random
values, -4e-6 over its two halves), so one norm over whole tensors (one process, DDP) and another
over shards (FSDP2, ZeRO partitions, tensor parallel) differed by 1e-5 to 1e-4 on the default
model. ZeRO's own norm (DeepSpeed's ``get_grad_norm_direct``) also accumulates in float64.

Clipping is ``torch.nn.utils.clip_grad_norm_``'s: coefficient ``max_norm / (norm + 1e-6)`` capped at
1, the epsilon added once to the global norm (cf. pytorch #149768), every local gradient scaled.
"""

from __future__ import annotations

import torch


def align_grad_placements(params) -> None:
    """Redistribute every DTensor gradient to its parameter's placements (``Partial`` -> all-reduce,
    ``Replicate`` -> local slice); plain tensors are left alone."""
    from torch.distributed.tensor import DTensor

    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(p.device_mesh, p.placements)


def _sharded_groups(t) -> tuple:
    """The process groups over which ``t``'s local squares must be summed (its sharded mesh dims)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return ()
    mesh = t.device_mesh
    # every placement but Replicate is a split (Shard, _StridedShard); Partial was refused before
    return tuple(mesh.get_group(i) for i, p in enumerate(t.placements) if not p.is_replicate())


def _sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of every element of ``tensors`` (plain, on one device): a 0-d float64
    tensor (float32 on a device without float64, e.g. MPS)."""
    dtype = torch.float32 if tensors[0].device.type == "mps" else torch.float64
    norms = torch._foreach_norm([t.detach() for t in tensors], 2.0, dtype=dtype)
    return torch.stack(norms).square().sum()


def total_grad_norm(grads: list[torch.Tensor], pp_group=None) -> torch.Tensor:
    """Global L2 norm of ``grads`` (tensors or DTensors on any meshes), as a 0-d float64 tensor (see
    the module docstring) equal on every rank. One all-reduce per distinct set of sharded groups.

    Raises:
        ValueError: a gradient still ``Partial`` (call :func:`align_grad_placements` first).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    local: dict[tuple, list[torch.Tensor]] = {}
    groups: dict[tuple, tuple] = {}
    for g in grads:
        if isinstance(g, DTensor) and any(p.is_partial() for p in g.placements):
            raise ValueError(f"gradient with placements {g.placements} is still Partial")
        gs = _sharded_groups(g)
        key = tuple(x.group_name for x in gs)
        local.setdefault(key, []).append(g.to_local() if isinstance(g, DTensor) else g)
        groups[key] = gs
    total = None
    for key, tensors in local.items():
        s = _sum_of_squares(tensors)
        for group in groups[key]:
            dist.all_reduce(s, group=group)
        total = s if total is None else total + s
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    if pp_group is not None:  # every stage's sum of squares (one all-reduce over the pipeline)
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm_(params, max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip the gradients of ``params`` in place to global L2 norm ``max_norm`` (``<= 0``: measure
    only), as ``torch.nn.utils.clip_grad_norm_`` (see the module docstring). ``pp_group``: the
    pipeline's ranks, whose stages hold the rest of the model (their squares are summed too).

    Returns:
        The global norm before clipping: a plain 0-d float32 tensor, equal on every rank.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    align_grad_placements(params)
    grads = [p.grad for p in params]
    norm = total_grad_norm(grads, pp_group)
    if max_norm > 0 and grads:
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(local[0].device, torch.float32)
        torch._foreach_mul_(local, coef)
    return norm.float()
