"""Communication of a parallel layout per optimizer step, before running (used by ``harness.plan``).

Bytes per rank per full-size step, by mesh dimension and collective, in the convention of the
records' ``comm_by_dim`` (nccl-tests "size": the tensor for all-reduce, the gathered output for
all-gather, the input for reduce-scatter), so a plan can be held against a run. Scalar collectives
(loss sums, the gradient norm: tens of bytes) are left out.

Tensor parallelism, with ``L`` layers, micro-batch ``b``, sequence ``s``, hidden ``h``, vocabulary
``V``, ``k`` micro-batches per step and ``a`` bytes per activation (2 under bf16 autocast), per
micro-batch (the plan of :mod:`harness.parallel.tensor`; Korthikanti et al. 2022, Sec. 4.2.2):

* without sequence parallelism: all-reduce ``(4L + 2) b s h a`` (forward: the embedding and every
  row-wise output, ``2L + 1``; backward: the inputs of attention, MLP and LM head, ``2L + 1``) and
  all-gather of the logits ``b s V a`` (none with loss parallelism: three all-reduces of ``b s`` fp32);
* with it: all-reduce ``b s h a`` (the embedding) plus, once per step, the norm gains' gradients
  ``(2L + 1) h`` fp32; all-gather ``(4L + 2) b s h a`` plus the logits; reduce-scatter
  ``(4L + 1) b s h a``.

FSDP2 over ``dp_shard``: every micro-batch all-gathers the rank's ``P_tp`` parameters (``P_tp`` =
matrices ``/ tp`` + the replicated norm gains) in forward and again in backward (once with
``reshard_after_forward=false``); the step reduce-scatters ``P_tp`` gradients once (``k`` times with
``reduce_grads_every_micro_batch``). HSDP all-reduces the ``P_tp / dp_shard`` gradient shard over
``dp_replicate`` (as often); DDP all-reduces ``P`` fp32 gradients.
"""

from __future__ import annotations

_BYTES = {None: 4, "float32": 4, "bfloat16": 2}


def norm_params(num_layers: int, hidden_size: int) -> int:
    """Norm gains of a Llama-style model: two per block and the final one (replicated under TP)."""
    return (2 * num_layers + 1) * hidden_size


def tp_local_params(params: int, num_layers: int, hidden_size: int, tp: int) -> int:
    """Parameters one tp rank holds: the matrices split ``tp`` ways, the norm gains whole."""
    norms = norm_params(num_layers, hidden_size)
    return (params - norms) // tp + norms


def tp_bytes(model, seq_len: int, micro: int, k: int, vocab: int, tp: int, sp: bool, lp: bool, act: int):
    """``{collective: bytes}`` over ``tp`` for one step (see the module docstring)."""
    if tp == 1:
        return {}
    L, bsh = model.num_layers, micro * seq_len * model.hidden_size * act
    logits = 0 if lp else k * micro * seq_len * vocab * act
    out = {}
    if sp:
        out["all_reduce"] = k * bsh + norm_params(L, model.hidden_size) * 4
        out["all_gather"] = k * (4 * L + 2) * bsh + logits
        out["reduce_scatter"] = k * (4 * L + 1) * bsh
    else:
        out["all_reduce"] = k * (4 * L + 2) * bsh
        if logits:
            out["all_gather"] = logits
    if lp:
        out["all_reduce"] += k * 3 * micro * seq_len * 4
    return out


def comm_per_step(cfg, params: int, vocab: int, dims, micro: int, k: int) -> dict[str, dict[str, int]] | None:
    """``{mesh dim: {collective: bytes}}`` per rank for one full step of ``cfg`` on the mesh ``dims``
    (a :class:`~harness.parallel.dims.ParallelDims`); None for DeepSpeed (not estimated)."""
    par, m = cfg.parallel, cfg.model
    if par.name == "deepspeed":
        return None
    act = 2 if cfg.train.dtype in ("bfloat16", "auto") else 4
    out = {}
    sp, lp = getattr(par, "sequence_parallel", False), getattr(par, "loss_parallel", False)
    tp = tp_bytes(m, cfg.data.seq_len, micro, k, vocab, dims.tp, sp, lp, act)
    if tp:
        out["tp"] = tp
    if par.name == "ddp" and dims.dp > 1:
        out["dp_replicate"] = {"all_reduce": params * 4}
    if par.name == "fsdp" and dims.dp > 1:
        local = tp_local_params(params, m.num_layers, m.hidden_size, dims.tp)
        pb = _BYTES[par.param_dtype]
        rb = _BYTES[par.reduce_dtype or par.param_dtype]
        reductions = k if par.reduce_grads_every_micro_batch else 1
        if dims.dp_shard > 1:
            gathers = 2 * k if par.reshard_after_forward else k
            out["dp_shard"] = {"all_gather": gathers * local * pb, "reduce_scatter": reductions * local * rb}
        if dims.dp_replicate > 1:
            out["dp_replicate"] = {"all_reduce": reductions * (local // dims.dp_shard) * rb}
    return out
