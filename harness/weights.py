"""Initial weights that do not depend on the layout, drawn where they live.

The model is built with its parameters on the meta device (:func:`harness.model.build_model` with
``device="meta"``; buffers such as the rotary ``inv_freq`` are computed for real, they are small),
parallelized there, and only then given storage: :func:`materialize` allocates each rank's own shards
on its device and fills them with :func:`init_weights`.

The scheme (written for this harness; the distributions are those of ``transformers``'
``_init_weights`` for LLaMA and GPT-2):

- every parameter is drawn whole, on the device type it lives on, from its own generator seeded by
  ``sha256(f"{seed}:{name}")`` where ``name`` is its name in the unwrapped ``transformers`` model
  (``model.layers.3.mlp.up_proj.weight``); the rank keeps its slice (``distribute_tensor`` with
  ``src_data_rank=None``: no communication);
- matrices and embeddings ``N(0, model.init_std)``, GPT-2's residual output projections (``c_proj``)
  ``N(0, init_std / sqrt(2 * num_layers))`` (Radford et al. 2019, section 2.3), biases 0, norm
  weights 1.

So one process, DDP, FSDP2, tensor parallelism and any mix start from the same weights, bitwise, on a
given device type (CPU and CUDA generators differ). Peak memory per rank while initializing: its
shards plus the largest single parameter (drawn whole, then dropped), e.g. 4.2 GB for LLaMA-3 70B's
embedding in fp32; the draws cost one pass over the whole model per rank, on the device.

DeepSpeed ZeRO-3 (``DeepSpeedBackend.partition``) cannot shard a meta model before storage exists, so
:func:`materialize_each` gives the parameters storage one at a time: each is drawn whole into a
one-parameter view (:func:`parameter_view`) and partitioned by DeepSpeed before the next, for the same
weights (bitwise, or their bf16 rounding when the engine trains in bf16) and the same peak per rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch

from harness.config import ModelConfig

# wrapper modules' names inside parameter names (activation checkpointing, torch.compile, FSDP1)
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def canonical_name(name: str) -> str:
    """A parameter's name in the bare ``transformers`` model (wrappers' components removed)."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def param_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` (its canonical name) under run seed ``seed``: the first
    8 bytes of ``sha256(f"{seed}:{name}")`` as a non-negative int63 (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{canonical_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _std(model: ModelConfig, name: str) -> float:
    if model.arch == "gpt2" and name.endswith("c_proj.weight"):
        return model.init_std / math.sqrt(2 * model.num_layers)
    return model.init_std


def draw(model: ModelConfig, seed: int, name: str, shape, device) -> torch.Tensor:
    """The whole initial value of parameter ``name`` (fp32, ``shape``, on ``device``): see the module
    docstring for the scheme."""
    name = canonical_name(name)
    if len(shape) == 1:
        fill = 0.0 if name.endswith("bias") else 1.0
        return torch.full(shape, fill, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, name))
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.normal_(0.0, _std(model, name), generator=gen)


def unique_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` pairs, a tied parameter once under its first name."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


@torch.no_grad()
def fill(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` (the whole parameter) into ``p`` (a tensor or DTensor, any
    placements), without communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)
    else:
        p.copy_(full)


@torch.no_grad()
def init_weights(net: torch.nn.Module, model: ModelConfig, seed: int) -> None:
    """Fill every parameter of ``net`` (materialized, possibly sharded) with its initial value."""
    for name, p in unique_parameters(net):
        fill(p, draw(model, seed, name, tuple(p.shape), _local(p).device))


def _local(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def _owners(net: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """``id(parameter) -> [(module, attribute), ...]``: every place a parameter is registered (a tied
    one in several)."""
    by_param: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in net.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                by_param.setdefault(id(p), []).append((module, attr))
    return by_param


def _tie_groups(net: torch.nn.Module) -> list[list[tuple[torch.nn.Module, str]]]:
    return [group for group in _owners(net).values() if len(group) > 1]


def to_empty_tied(net: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``net.to_empty(device=device)`` keeping shared parameters shared (``to_empty`` gives each owner
    of a tied parameter its own new tensor: the embedding and the LM head would part). Returns ``net``."""
    ties = _tie_groups(net)
    net.to_empty(device=device)
    for group in ties:
        first_module, first_attr = group[0]
        for module, attr in group[1:]:
            module._parameters[attr] = first_module._parameters[first_attr]
    return net


def materialize(
    net: torch.nn.Module, device: torch.device, init: Callable[[torch.nn.Module], None]
) -> torch.nn.Module:
    """Give ``net``'s meta parameters (whole or already sharded) storage on ``device``, keep its buffers'
    values, re-tie shared parameters and call ``init(net)`` to fill them. Returns ``net``."""
    buffers = {name: b.clone() for name, b in net.named_buffers() if not b.is_meta}
    to_empty_tied(net, device)
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    init(net)
    return net


def parameter_view(name: str, param: torch.nn.Parameter) -> torch.nn.Module:
    """A module whose only parameter is ``param``, under ``name`` (dotted, as in the whole model), so
    that an ``init`` callable (:func:`init_weights`, a loader) can fill it as it would the whole model."""
    view = torch.nn.Module()
    *path, leaf = name.split(".")
    owner = view
    for part in path:
        child = torch.nn.Module()
        owner.add_module(part, child)
        owner = child
    owner.register_parameter(leaf, param)
    return view


def materialize_each(
    net: torch.nn.Module,
    device: torch.device,
    init: Callable[[torch.nn.Module], None],
    convert: Callable[[torch.nn.Parameter], None],
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Give ``net``'s meta parameters storage one at a time: each (a tied one once) becomes a whole
    ``dtype`` tensor on ``device``, is filled by ``init(parameter_view(canonical_name(name), p))`` (the
    name in the bare ``transformers`` model, a tied parameter under its first) and handed to
    ``convert(p)`` (e.g. DeepSpeed ZeRO-3's partitioning, which keeps this rank's slice) before the
    next one is allocated; buffers move to ``device``. Returns ``net``.

    Peak memory: what ``convert`` keeps, plus one whole parameter and ``init``'s temporaries (for
    :func:`init_weights`, one fp32 copy of it).
    """
    owners = _owners(net)
    for module in net.modules():
        for attr, b in module._buffers.items():
            if b is not None:
                module._buffers[attr] = b.to(device)
    for name, p in unique_parameters(net):
        new = torch.nn.Parameter(
            torch.empty(p.shape, dtype=dtype, device=device), requires_grad=p.requires_grad
        )
        for module, attr in owners[id(p)]:
            module._parameters[attr] = new
        with torch.no_grad():
            init(parameter_view(canonical_name(name), new))
        convert(new)
    return net
