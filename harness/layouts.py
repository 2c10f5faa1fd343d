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

Pipeline parallelism over ``pp`` (:mod:`harness.parallel.pipeline`): per micro-batch, each stage boundary
a rank's stage has sends one ``b s h`` activation forward and receives its gradient back (and the
other side of the boundary the reverse), ``a`` bytes per element in the stages' parameter dtype
(the residual stream's); FSDP2 gathers the rank's parameters once per step and reduce-scatters their
gradients once (the schedule keeps them gathered, and the gradients unsharded, from the first
micro-batch to the last backward: ``PipelineStage`` sets ``set_reshard_after_backward(False)`` before
the last; held against a pp 2 x dp_shard 2 run in ``tests/test_pipeline.py``). Tensor parallelism
within a pipeline rank counts its own layers, the embedding only on the first stage's and the logits
only on the last's. :func:`pp_bubble` and :func:`pp_in_flight` give the schedule's idle fraction and
the activations the busiest rank holds, in theory.

Context parallelism over ``cp`` (:func:`cp_bytes`): each layer all-gathers the keys and values of
every micro-batch's ``cp`` ranks and reduce-scatters their gradients; the other dimensions see
``seq_len / cp`` tokens per rank, and FSDP2's traffic runs over ``dp_shard x cp`` (``dp_shard_cp``).
"""

from __future__ import annotations

_BYTES = {None: 4, "float32": 4, "bfloat16": 2}
ZERO_BUBBLE = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
GPIPE_LIKE = ("GPipe", "LoopedBFS")  # every forward of the step before the first backward
INTERLEAVED = ("Interleaved1F1B", "InterleavedZeroBubble")


def pp_bubble(schedule: str, pp: int, m: int, v: int) -> float:
    """The schedule's idle fraction of a step in theory, for ``pp`` ranks of ``v`` stages each and ``m``
    micro-batches: ``(pp - 1) / (v m + pp - 1)`` (GPipe, 1F1B: ``v = 1``, Narayanan et al. 2021,
    Sec. 2.2; Interleaved1F1B, LoopedBFS, ibid. Sec. 2.2.2); 0 for the zero-bubble schedules, whose
    split backward fills it when the input- and weight-gradient halves take as long as the forward
    (Qi et al. 2024, ZB-V; DeepSeek-V3 report Table 2 for DualPipe). On GPUs they do not: unmeasured."""
    if pp == 1 or schedule in ZERO_BUBBLE:
        return 0.0
    return (pp - 1) / (v * m + pp - 1)


def pp_in_flight(schedule: str, pp: int, m: int, v: int, rank: int = 0) -> float:
    """Micro-batches of activations pipeline rank ``rank`` holds at its peak, in units of one
    micro-batch through all of that rank's layers: ``m`` (GPipe, LoopedBFS: every forward first);
    ``min(m, pp - rank)`` (1F1B: the warm-up's forwards, Narayanan et al. 2021, Sec. 2.2.1), times
    ``1 + (pp - 1) / (pp v)`` interleaved (Korthikanti et al. 2022, Sec. 4.2.3); ``min(m, pp)`` on
    every rank for ZBVZeroBubble (the V balances it: Qi et al. 2024) and ``min(m, pp + 1)`` for
    DualPipeV (DeepSeek-V3 report, Table 2)."""
    if pp == 1:
        return 1.0
    if schedule in GPIPE_LIKE:
        return float(m)
    if schedule == "DualPipeV":
        return float(min(m, pp + 1))
    if schedule == "ZBVZeroBubble":
        return float(min(m, pp))
    held = float(min(m, pp - rank))
    return held * (1 + (pp - 1) / (pp * v)) if schedule in INTERLEAVED else held


def pp_bytes(rank_of_stage: list[int], rank: int, micro: int, seq_len: int, hidden: int, k: int, act: int):
    """``{"send": bytes, "recv": bytes}`` over ``pp`` for one step of ``k`` micro-batches of pipeline rank
    ``rank``, stage ``s`` being on ``rank_of_stage[s]``: each boundary between its stage and a neighbour
    on another rank, forward (the activation) and backward (its gradient); a boundary within a rank (the
    V's turn) moves nothing."""
    bsh = k * micro * seq_len * hidden * act
    crossings = 0
    for s, owner in enumerate(rank_of_stage):
        if owner != rank:
            continue
        for n in (s - 1, s + 1):
            crossings += 0 <= n < len(rank_of_stage) and rank_of_stage[n] != rank
    return {"send": crossings * bsh, "recv": crossings * bsh}


def cp_bytes(model, seq_len: int, micro: int, k: int, tp: int, act: int, layers: int | None = None):
    """``{collective: bytes}`` over ``cp`` for one step of ``k`` micro-batches: every layer all-gathers
    its keys and values (``[micro, kv_heads / tp, seq_len, head_dim]`` each, ``act`` bytes, gathered
    size) in forward and reduce-scatters their gradients (the same size) in backward
    (:mod:`harness.parallel.context`); ``layers``: a pipeline rank's (default: all)."""
    kv = (model.num_kv_heads or model.num_heads) * (model.hidden_size // model.num_heads) // tp
    per = k * (layers or model.num_layers) * 2 * micro * seq_len * kv * act
    return {"all_gather": per, "reduce_scatter": per}


def norm_params(num_layers: int, hidden_size: int) -> int:
    """Norm gains of a Llama-style model: two per block and the final one (replicated under TP)."""
    return (2 * num_layers + 1) * hidden_size


def tp_local_params(params: int, num_layers: int, hidden_size: int, tp: int) -> int:
    """Parameters one tp rank holds: the matrices split ``tp`` ways, the norm gains whole."""
    norms = norm_params(num_layers, hidden_size)
    return (params - norms) // tp + norms


def tp_bytes(
    model, seq_len: int, micro: int, k: int, vocab: int, tp: int, sp: bool, lp: bool, act: int, stage=None
):
    """``{collective: bytes}`` over ``tp`` for one step (see the module docstring); ``stage``: ``(layers,
    first, last)`` of a pipeline rank (its decoder layers, whether it holds the embedding, the LM head;
    no sequence or loss parallelism under ``pp``): ``(4 L_r + first + last) b s h a`` all-reduced."""
    if tp == 1:
        return {}
    L, bsh = model.num_layers, micro * seq_len * model.hidden_size * act
    if stage is not None:
        layers, first, last = stage
        out = {"all_reduce": k * (4 * layers + first + last) * bsh}
        if last:
            out["all_gather"] = k * micro * seq_len * vocab * act
        return out
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


def comm_per_step(
    cfg, params: int, vocab: int, dims, micro: int, k: int, stage_params: float | None = None
) -> dict[str, dict[str, int]] | None:
    """``{mesh dim: {collective: bytes}}`` per rank for one full step of ``cfg`` on the mesh ``dims``
    (a :class:`~harness.parallel.dims.ParallelDims`); None for DeepSpeed (not estimated). Under
    ``dims.pp > 1``: global rank 0's (the first stage), ``stage_params`` its parameters (tp-local)."""
    par, m = cfg.parallel, cfg.model
    if par.name == "deepspeed":
        return None
    act = 2 if cfg.train.dtype in ("bfloat16", "auto") else 4
    out = {}
    sp, lp = getattr(par, "sequence_parallel", False), getattr(par, "loss_parallel", False)
    pp, cp, stage, pipe = getattr(dims, "pp", 1), getattr(dims, "cp", 1), None, {}
    if pp > 1:
        from harness.config.validate import PP_SCHEDULES
        from harness.parallel.pipeline import split_layers, stage_ids, stage_owners

        v = PP_SCHEDULES[par.pp_schedule]
        placement = stage_owners(pp, par.pp_schedule)
        pipe = pp_bytes(
            placement, 0, micro, cfg.data.seq_len // cp, m.hidden_size, k, _BYTES[par.param_dtype]
        )
        layers, mine = split_layers(m.num_layers, pp * v, par.pp_layers), stage_ids(0, pp, par.pp_schedule)
        stage = (sum(len(layers[s]) for s in mine), True, pp * v - 1 in mine)
    tp = tp_bytes(m, cfg.data.seq_len // cp, micro, k, vocab, dims.tp, sp, lp, act, stage)
    if tp:
        out["tp"] = tp
    if pipe:
        out["pp"] = pipe
    if cp > 1:
        out["cp"] = cp_bytes(m, cfg.data.seq_len, micro, k, dims.tp, act, stage and stage[0])
    if par.name == "ddp" and dims.dp > 1:
        out["dp_replicate"] = {"all_reduce": params * 4}
    if par.name == "fsdp" and dims.dp * cp > 1:
        if pp > 1:
            local = int(stage_params)
        else:
            local = tp_local_params(params, m.num_layers, m.hidden_size, dims.tp)
        pb = _BYTES[par.param_dtype]
        rb = _BYTES[par.reduce_dtype or par.param_dtype]
        reductions = k if par.reduce_grads_every_micro_batch else 1
        shard = dims.dp_shard * cp  # FSDP2 shards over dp_shard x cp
        if shard > 1:
            gathers = 1 if pp > 1 else 2 * k if par.reshard_after_forward else k
            out["dp_shard_cp" if cp > 1 else "dp_shard"] = {
                "all_gather": gathers * local * pb,
                "reduce_scatter": reductions * local * rb,
            }
        if dims.dp_replicate > 1:
            out["dp_replicate"] = {"all_reduce": reductions * (local // shard) * rb}
    return out
