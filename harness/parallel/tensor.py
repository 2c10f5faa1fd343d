"""Tensor and sequence parallelism over the mesh's ``tp`` dimension (DTensor,
``torch.distributed.tensor.parallel``), for the Llama-style ``transformers`` models.

The plan is Megatron-LM's (Shoeybi et al. 2019, Sec. 3) as torchtitan writes it: in every block the
attention q/k/v and MLP gate/up projections are column-wise (each rank holds ``heads / tp`` heads and
``intermediate / tp`` MLP columns), the attention output and MLP down projections row-wise (their
partial outputs are all-reduced); the token embedding is row-wise (vocabulary rows; its output
all-reduced) and the LM head column-wise (vocabulary columns; logits all-gathered, or kept sharded
for loss-parallel cross-entropy). Both split the vocabulary dimension of their weight (``Shard(0)``),
so tied embeddings stay one Parameter, sharded once, as in Megatron-LM. With ``sequence_parallel``
(Korthikanti et al. 2022, Sec. 4.2.2) the residual stream between the projections is sharded along
the sequence: the norms run on ``seq / tp`` positions and each all-reduce becomes a reduce-scatter
plus an all-gather (same bytes, activations divided by ``tp``). The model's preamble (rotary tables,
masks) sees the whole sequence: the embedding output is replicated and the first block's input is
split.

Gradients: a replicated parameter used on sequence-sharded activations (the norm gains under
sequence parallelism) gets a ``Partial`` gradient, and the row-wise embedding a ``Replicate`` one;
:func:`harness.parallel.norm.align_grad_placements` brings every gradient to its parameter's
placement before the norm and the optimizer (the bug class of torchtitan PR #3412), and
:func:`harness.parallel.norm.clip_grad_norm_` computes the global L2 norm over DTensors on any mesh
(each shard counted once, replicas not double counted) and adds the epsilon once.

Which ``tp`` a model and a backend can run is a check of the config alone
(:func:`harness.config.validate.check_tensor_parallel`), refused before anything is built.
"""

from __future__ import annotations

import contextlib
import logging

import torch


def apply_tensor_parallel(
    model: torch.nn.Module, tp_mesh, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Shard ``model`` (a ``LlamaForCausalLM``, on its device) over the 1-D ``tp_mesh`` in place.

    With ``loss_parallel`` the logits stay sharded over the vocabulary (a DTensor ``Shard(-1)``; the
    loss is computed under :func:`loss_context`); otherwise they are all-gathered to full
    ``(batch, seq, vocab)`` tensors.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    # gathering a 2-D (dp_shard, tp) parameter for export is two all-gathers; DTensor warns each time
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    seq = Shard(1) if sequence_parallel else Replicate()
    head = ColwiseParallel(
        input_layouts=seq,
        output_layouts=Shard(-1) if loss_parallel else Replicate(),
        use_local_output=not loss_parallel,
    )
    from harness.parallel.base import transformer_blocks

    # a pipeline stage's part may lack the embedding (not the first stage) or the head (not the last)
    embed, lm_head = model.model.embed_tokens, model.lm_head
    top = {}
    if embed is not None:
        top["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if lm_head is not None:
        top["lm_head"] = head
    if sequence_parallel:
        top["model.norm"] = SequenceParallel(use_local_output=True)
        top["model.layers.0"] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
        )
    tied = embed is not None and lm_head is not None and lm_head.weight is embed.weight
    parallelize_module(model, tp_mesh, top)
    if tied:  # each plan made its own DTensor of the shared weight, both Shard(0): share one again
        model.lm_head.weight = model.model.embed_tokens.weight
    for block in transformer_blocks(model):
        plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=seq),
        }
        # The projections' shared input enters as one DTensor, so that their input gradients add up
        # as Partial and are reduced once per module (an all-reduce, or a reduce-scatter under
        # sequence parallelism) instead of once per projection.
        plan["self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": seq},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        )
        plan["mlp"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel(use_local_output=True)
            plan["post_attention_layernorm"] = SequenceParallel(use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def loss_context(loss_parallel: bool) -> contextlib.AbstractContextManager:
    """Around the loss and its backward: ``torch.distributed.tensor.parallel.loss_parallel`` (the
    cross-entropy of vocabulary-sharded logits without gathering them) or nothing."""
    if not loss_parallel:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel as ctx

    return ctx()
