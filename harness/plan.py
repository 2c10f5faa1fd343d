"""Plan a run before spending GPU hours: ``python -m harness.plan [same Hydra overrides as train]``.

Prints the iteration accounting (from the trainer's own :class:`~harness.schedule.IterationPlan`,
so plan and run cannot disagree), the model's size and FLOPs, the cost at an assumed MFU, the
memory per device for the chosen backend, and warnings; writes a PNG of the schedule (LR, global
batch size and cumulative tokens against step). ``plan.format=json`` prints one JSON object.

Nothing is built on a device. The dataset's token count is exact when the corpus is already
tokenized (a prepared directory or the token cache) or small enough to tokenize now
(``plan.exact_max_mb``; this fills the same cache the trainer reads); otherwise it is estimated
from the first ``plan.sample_mb`` of files with ``tokenizer.path`` and said to be an estimate;
``plan.dataset_tokens`` plans for a corpus without reading it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace

from harness.config import (
    JobConfig,
    check_tensor_parallel,
    compose_checked,
    register_schema,
    resolve_batch_sizes,
    to_object,
    validate,
)
from harness.errors import ConfigError, DataError, HarnessError
from harness.layouts import comm_per_step, pp_bubble
from harness.metrics import GPU_SPECS
from harness.model import document_mask_path, lr_warning, model_stats, resolve_vocab_size
from harness.parallel.dims import ParallelDims
from harness.pretrained import check_pretrained, safetensors_files, tokenizer_config
from harness.schedule import IterationPlan, TrainingSchedule, build_schedule

MAX_USEFUL_EPOCHS = 4.0  # Muennighoff et al. 2023: beyond ~4 epochs repeated data is worth much less
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, "Training Compute-Optimal LLMs", Table 3


@dataclass
class PlanConfig:
    """``python -m harness.plan`` only: the hardware and assumptions of the cost estimate."""

    # devices the run will use (the world size of the plan)
    gpus: int = 1
    # H100 | H200 | A100 | B200 (peak bf16 FLOP/s and memory: harness.metrics.GPU_SPECS)
    gpu: str = "H100"
    # assumed model FLOPs utilization (Megatron-LM reports 41-48% on H100; no GPU run here yet)
    mfu: float = 0.40
    # text | json
    format: str = "text"
    # schedule plot; None: <run dir>/plan.png; "" for none
    png: str | None = None
    # plan for a corpus of this many tokens without reading data.path
    dataset_tokens: int | None = None
    # corpora up to this size (file bytes) are tokenized (and cached) for exact counts
    exact_max_mb: float = 512.0
    # larger ones: estimate tokens from the first files up to this size (needs tokenizer.path)
    sample_mb: float = 64.0
    # true: also build rank 0 through the real build path (meta device, parallelize) under a fake process
    # group and FakeTensorMode, trace one step's memory and print it beside this estimate (harness.dryrun)
    dry_run: bool = False


@dataclass
class PlanJobConfig(JobConfig):
    """A training run plus the assumptions of its plan (``schema/plan``)."""

    plan: PlanConfig = field(default_factory=PlanConfig)


register_schema("plan", PlanJobConfig)


CUDA_CONTEXT_BYTES = 2**30  # assumed, not measured here (no GPU): see MemoryEstimate
ALLOCATOR_RESERVE = 0.10  # assumed share of the tensors' bytes the caching allocator reserves beyond them


@dataclass
class MemoryEstimate:
    """Peak bytes per device for one backend (GiB = 2**30 bytes in the printout).

    Model state follows the ZeRO paper's accounting (Rajbhandari et al. 2020, Sec. 3.1): with
    mixed precision, 16 bytes per parameter (fp32 master weights 4, fp32 gradients 4 (or bf16 2
    + bf16 weights 2 under DeepSpeed), Adam moments 8), divided over ``shards`` ranks as the
    backend divides them. Activations follow Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", Sec. 4.1): ``34 * s * b * h`` bytes per layer
    with 16-bit activations and fused (flash/SDPA) attention, which removes the ``5 * a * s^2 * b``
    attention-score term; with full activation checkpointing each layer keeps only its input
    (``2 * s * b * h``) plus one layer's activations during recompute. Logits and their gradient
    in fp32 add ``8 * s * b * V``.

    FSDP2 (``torch.distributed.fsdp``, as ``harness.parallel.distributed`` calls it): the root unit
    (token embedding, LM head, final norm) is gathered whole and FSDP2 keeps the root gathered from
    forward to backward; two blocks are in flight (current + prefetched). With accumulation and the
    reduce-scatter deferred to the step's last micro-batch, every rank holds the unsharded gradients of
    its whole (tp-local) model from the first micro-batch's backward to that reduce-scatter, in the
    reduce dtype (``reduce_dtype`` or ``param_dtype``; FSDP2's ``unsharded_accumulated_grad``), which
    ``tests/test_plan.py`` measures on CPU; with ``reduce_grads_every_micro_batch`` only the gathered
    units' gradients are unsharded, until their reduce-scatter.

    ``context`` is the CUDA context, cuBLAS workspaces and NCCL buffers (:data:`CUDA_CONTEXT_BYTES`,
    1 GiB: the context is ~0.5 GiB with lazy module loading, NCCL allocates ``NCCL_BUFFSIZE`` (4 MiB)
    per channel and peer); the caching allocator's reserve beyond the tensors (fragmentation) is
    :data:`ALLOCATOR_RESERVE` of them. Both are assumptions until a GPU run's
    ``torch.cuda.max_memory_reserved`` is held against the plan.
    """

    backend: str
    shards: int
    params: float
    grads: float
    optimizer: float
    # transient unsharded parameters (FSDP: the root unit + two blocks; ZeRO-3: two blocks)
    gathered: float
    activations: float
    activations_checkpointed: float
    device_memory: float | None
    # tensor-parallel degree: the model state is split over shards x tp ranks
    tp: int = 1
    # FSDP: unsharded gradients at the peak (see above)
    unsharded_grads: float = 0.0
    # ... with the other parallel.reduce_grads_every_micro_batch (None: no difference)
    unsharded_grads_other: float | None = None
    context: float = CUDA_CONTEXT_BYTES

    def tensors(self, checkpointed: bool, unsharded_grads: float | None = None) -> float:
        """Bytes of the tensors at the peak (``unsharded_grads``: instead of this layout's)."""
        grads = self.unsharded_grads if unsharded_grads is None else unsharded_grads
        act = self.activations_checkpointed if checkpointed else self.activations
        return self.params + self.grads + self.optimizer + grads + self.gathered + act

    def peak(self, checkpointed: bool, unsharded_grads: float | None = None) -> float:
        """The device's peak: the tensors, the allocator's reserve and the CUDA context."""
        return self.tensors(checkpointed, unsharded_grads) * (1 + ALLOCATOR_RESERVE) + self.context

    @property
    def total(self) -> float:
        return self.peak(False)

    @property
    def total_checkpointed(self) -> float:
        return self.peak(True)


@dataclass
class PlanReport:
    """Everything ``harness.plan`` prints (units: tokens, steps, FLOPs, seconds, bytes)."""

    dataset: str
    dataset_tokens: int
    dataset_tokens_exact: bool
    dataset_note: str
    seq_len: int
    train_sequences: int
    global_batch_size: int
    global_batch_tokens: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    iterations_per_epoch: int
    drop_last: bool
    max_steps: int
    epochs: float
    total_tokens: int
    lr_warmup_end_step: int
    batch_warmup_end_step: int
    decay_end_step: int
    model: str
    params: int
    non_embedding_params: int
    flops_per_token: float
    total_flops: float
    tokens_per_param: float
    gpu: str
    gpus: int
    peak_flops: float
    peak_source: str
    mfu: float
    wall_seconds: float
    gpu_hours: float
    memory: MemoryEstimate
    activation_checkpointing: bool = False
    # the model's vocabulary (model.vocab_size, or the tokenizer's padded)
    vocab_size: int = 0
    # a mixture's sources: name, weight, tokens and training sequences of the source, tokens and
    # sequences the run draws from it, and the epochs that makes
    sources: list[dict] | None = None
    # per rank per full step: {mesh dim: {collective: bytes}} (harness.layouts; None: not estimated)
    communication: dict | None = None
    # parallel=fsdp with a Llama model: one row per tp degree (and pp degree when parallel.pp > 1):
    # memory and communication per layout
    layouts: list[dict] | None = None
    # parallel.pp > 1: one row per pipeline rank (its stages, layers, parameters, peak bytes)
    pipeline: list[dict] | None = None
    pipeline_schedule: str = ""
    # context-parallel degree (parallel.cp): each sequence split over this many ranks
    cp: int = 1
    warnings: list[str] = field(default_factory=list)
    flops_formula: str = (
        "6 * N_matmul + 12 * n_layers * hidden_size * seq_len per token (PaLM, Chowdhery et al. 2022, App. "
        "B; "
        "Kaplan et al. 2020, Table 1)"
    )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"]["total"] = self.memory.total
        d["memory"]["total_checkpointed"] = self.memory.total_checkpointed
        d["memory"]["allocator_reserve"] = ALLOCATOR_RESERVE
        return d


def count_dataset_tokens(cfg: PlanJobConfig) -> tuple[int, bool, str, int | None]:
    """``(tokens, exact, note, tokenizer vocabulary or None)`` of the whole corpus (training and
    validation parts).

    Raises:
        DataError: the corpus cannot be read, or is too large to count and cannot be estimated
            (no ``tokenizer.path``), or is a hub dataset (set ``plan.dataset_tokens``).
    """
    from harness.data import load_token_store
    from harness.data.sources import is_prepared_dir, load_corpus, resolve_corpus
    from harness.data.store import open_store
    from harness.data.tokenizer import encode_documents, load_tokenizer

    p = cfg.plan
    if p.dataset_tokens is not None:
        return int(p.dataset_tokens), False, "given by plan.dataset_tokens", _tokenizer_vocab(cfg)
    if is_prepared_dir(cfg.data.path):
        tok = load_tokenizer(cfg.tokenizer.path or os.path.join(cfg.data.path, "tokenizer"))
        return open_store(cfg.data.path).num_tokens, True, "prepared token store", len(tok)
    corpus = resolve_corpus(cfg.data.path, cfg.data.format, cfg.data.hub_name)
    if corpus.format == "hub":
        raise DataError(
            f"data.path={cfg.data.path!r} is a hub dataset: set plan.dataset_tokens to plan without "
            "downloading it"
        )
    total_bytes = sum(os.path.getsize(f) for f in corpus.files)
    if total_bytes <= p.exact_max_mb * 2**20:
        tok, store = load_token_store(cfg.data, cfg.tokenizer)  # the trainer's cache: exact
        note = f"tokenized ({total_bytes / 2**20:.1f} MB of files; cached for the run)"
        return store.num_tokens, True, note, len(tok)
    if not cfg.tokenizer.path:
        raise DataError(
            f"data.path holds {total_bytes / 2**30:.1f} GB, more than plan.exact_max_mb={p.exact_max_mb}, "
            "and tokenizer.path is null (a BPE trained on the whole corpus): set tokenizer.path to estimate "
            "from a sample, plan.dataset_tokens to give the count, or raise plan.exact_max_mb"
        )
    tokenizer = load_tokenizer(cfg.tokenizer.path, cfg.tokenizer.eos_token)
    sample, sample_bytes = [], 0
    for f in corpus.files:
        sample.append(f)
        sample_bytes += os.path.getsize(f)
        if sample_bytes >= p.sample_mb * 2**20:
            break
    sub = type(corpus)(tuple(sample), corpus.format, corpus.hub_name)
    ds, column = load_corpus(sub, cfg.data.text_field, cfg.data.sample_by, cfg.data.split, cfg.data.cache_dir)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    sample_tokens = sum(
        len(ids) + len(eos)
        for b in ds.iter(batch_size=1000)
        for ids in encode_documents(tokenizer, b[column], cfg.tokenizer.parse_special_tokens)
    )
    estimate = round(sample_tokens * total_bytes / sample_bytes)
    note = (
        f"estimated from {len(sample)} of {len(corpus.files)} files ({sample_bytes / 2**20:.0f} MB, "
        f"{sample_tokens / sample_bytes:.3f} tokens per file byte)"
    )
    return estimate, False, note, len(tokenizer)


def memory_estimate(
    cfg: PlanJobConfig,
    params: int,
    vocab: int,
    device_memory: float | None,
    world_size: int,
    tp: int | None = None,
    sequence_parallel: bool | None = None,
    accumulation: int = 1,
    pp: int | None = None,
    cp: int | None = None,
) -> MemoryEstimate:
    """Bytes per device for ``cfg.parallel`` at ``world_size`` ranks and ``accumulation`` micro-batches
    per step (see :class:`MemoryEstimate`); ``tp`` / ``sequence_parallel`` / ``pp`` override the config's
    (the layouts table). Under ``pp > 1``: the pipeline rank with the largest peak
    (:func:`pipeline_memory`). Under ``cp > 1`` each rank holds ``seq_len / cp`` tokens' activations
    and logits, and every layer keeps the keys and values it all-gathered (``2 s b kv_dim / tp`` in
    bf16) for its backward (:mod:`harness.parallel.context`); FSDP2 shards over ``dp_shard x cp``.

    Tensor parallelism divides the matrices by ``tp`` (norm gains stay whole) and, after Korthikanti et
    al. 2022 (Sec. 4.2), the activations per layer to ``s b h (10 + 24 / tp)`` without sequence
    parallelism and ``34 s b h / tp`` with it; the fp32 logits are divided only under loss parallelism.
    """
    from harness.layouts import tp_local_params

    m, par = cfg.model, cfg.parallel
    tp = par.tp if tp is None else tp
    sp = par.sequence_parallel if sequence_parallel is None else sequence_parallel
    pp = par.pp if pp is None else pp
    cp = par.cp if cp is None else cp
    if pp > 1:
        ranks = pipeline_memory(cfg, params, vocab, device_memory, world_size, tp, accumulation, pp)
        return max((r["memory"] for r in ranks), key=lambda e: e.total)
    p = float(tp_local_params(params, m.num_layers, m.hidden_size, tp) if tp > 1 else params)
    name = par.name
    shards = world_size // tp
    if name == "fsdp" and par.dp_replicate > 1:
        shards = shards // par.dp_replicate
    gathered, unsharded, other = 0.0, 0.0, None
    if name in ("none", "ddp") or (name == "fsdp" and world_size // tp == 1):  # fsdp: tp alone, no FSDP
        shards = 1
        params_b, grads_b, opt_b = 4 * p, 4 * p, 8 * p
    elif name == "fsdp":
        params_b, grads_b, opt_b = 4 * p / shards, 4 * p / shards, 8 * p / shards
        gathered, unsharded, other = _fsdp_unsharded(cfg, p, vocab, tp, accumulation)
    else:  # deepspeed: bf16 weights + bf16 grads + fp32 master/moments (12 B)
        stage = par.zero_stage
        params_b = 2 * p / (shards if stage >= 3 else 1)
        grads_b = 2 * p / (shards if stage >= 2 else 1)
        opt_b = 12 * p / (shards if stage >= 1 else 1)
        gathered = 2 * p / max(m.num_layers, 1) * 2 if stage >= 3 else 0.0
    if getattr(par, "cpu_offload", False) or getattr(par, "offload_optimizer", False):
        opt_b = 0.0
    seq, b, h, L = cfg.data.seq_len, cfg.train.micro_batch_size or 1, m.hidden_size, m.num_layers
    s = seq / cp  # this rank's tokens of each sequence
    logits = 8.0 * s * b * vocab / (tp if par.loss_parallel else 1)
    per_layer = 34.0 / tp if sp else 10.0 + 24.0 / tp
    kv = _gathered_kv(cfg, b, tp) if cp > 1 else 0.0
    act = (per_layer * s * b * h + kv) * L + logits
    act_ckpt = 2.0 * s * b * h * L / (tp if sp else 1) + per_layer * s * b * h + kv + logits
    return MemoryEstimate(
        name, shards, params_b, grads_b, opt_b, gathered, act, act_ckpt, device_memory, tp, unsharded, other
    )


def _gathered_kv(cfg: PlanJobConfig, micro: int, tp: int) -> float:
    """Bytes of one layer's keys and values all-gathered over ``cp`` (bf16, the whole sequence, the
    rank's ``kv_heads / tp`` heads), which it keeps for its backward."""
    m = cfg.model
    return (
        2.0
        * 2
        * cfg.data.seq_len
        * micro
        * (m.num_kv_heads or m.num_heads)
        * (m.hidden_size // m.num_heads)
        / tp
    )


def pipeline_memory(
    cfg: PlanJobConfig,
    params: int,
    vocab: int,
    device_memory: float | None,
    world_size: int,
    tp: int,
    accumulation: int,
    pp: int,
) -> list[dict]:
    """One row per pipeline rank of ``cfg`` (``parallel=fsdp``, a Llama model, untied) at ``pp``:
    ``{"rank", "stages", "layers", "params", "bubble", "memory"}``, ``memory`` its
    :class:`MemoryEstimate` (bytes; ``params``: its parameters, tp-local).

    The rank's stages and layers are the run's (:func:`harness.parallel.pipeline.stage_ids`,
    :func:`~harness.parallel.pipeline.split_layers`); the first stage holds the embedding, the last the
    final norm and LM head. FSDP2 shards its parameters over ``dp_shard`` and, not resharding after
    forward under ``pp``, holds them gathered through the step, and the gradients of all of them
    unsharded until the step's reduce-scatter. Activations: Korthikanti et al.'s bytes per layer
    (as :func:`memory_estimate`) x the rank's layers x the micro-batches it holds at its peak
    (:func:`harness.layouts.pp_in_flight`); the fp32 logits on the last stage's rank, once (all ``k``
    under GPipe and LoopedBFS); activation checkpointing keeps each held micro-batch's layer inputs.
    """
    from harness.config.validate import PP_SCHEDULES
    from harness.layouts import _BYTES, GPIPE_LIKE, pp_bubble, pp_in_flight
    from harness.parallel.pipeline import split_layers, stage_ids

    m, par = cfg.model, cfg.parallel
    h, L, v = m.hidden_size, m.num_layers, PP_SCHEDULES[par.pp_schedule]
    sp = par.sequence_parallel and tp > 1
    layers = split_layers(L, pp * v, par.pp_layers if pp == par.pp else None)
    norms = 2 * L * h + h
    per_layer = ((params - 2 * vocab * h - norms) / L) / tp + 2 * h  # tp-local; its 2 norm gains whole
    shards = world_size // (tp * pp * max(par.dp_replicate, 1))
    cp, b, k = max(par.cp, 1), cfg.train.micro_batch_size or 1, accumulation
    s = cfg.data.seq_len / cp  # the rank's tokens of each sequence
    kv = _gathered_kv(cfg, b, tp) if cp > 1 else 0.0  # under cp each layer keeps the gathered k, v
    act_layer = (34.0 / tp if sp else 10.0 + 24.0 / tp) * s * b * h + kv
    logits = 8.0 * s * b * vocab * (k if par.pp_schedule in GPIPE_LIKE else 1)
    pb, rb = _BYTES[par.param_dtype], _BYTES[par.reduce_dtype or par.param_dtype]
    rows = []
    for r in range(pp):
        stages = stage_ids(r, pp, par.pp_schedule)
        n = sum(len(layers[i]) for i in stages)
        first, last = 0 in stages, pp * v - 1 in stages
        p = n * per_layer + first * vocab * h / tp + last * (vocab * h / tp + h)
        held = pp_in_flight(par.pp_schedule, pp, k, v, r)
        act = act_layer * n * held + last * logits
        act_ckpt = 2.0 * s * b * h / (tp if sp else 1) * n * held + act_layer + last * logits
        if shards > 1:
            state = (4 * p / shards, 4 * p / shards, 8 * p / shards, p * pb, p * rb)
        else:  # tp (or nothing) within the stage: no FSDP units
            state = (4 * p, 4 * p, 8 * p, 0.0, 0.0)
        est = MemoryEstimate("fsdp", shards, *state[:4], act, act_ckpt, device_memory, tp, state[4], None)
        rows.append(
            {
                "rank": r,
                "stages": stages,
                "layers": n,
                "params": p,
                "bubble": pp_bubble(par.pp_schedule, pp, k, v),
                "memory": est,
            }
        )
    return rows


def pipeline_rows(cfg, params, vocab, device_memory, world_size, tp, accumulation, pp) -> list[dict] | None:
    """:func:`pipeline_memory` as the report holds it (peaks in bytes, activation checkpointing off and
    on, in place of the estimate); None when ``pp`` is 1."""
    if pp == 1:
        return None
    rows = pipeline_memory(cfg, params, vocab, device_memory, world_size, tp, accumulation, pp)
    return [
        {
            **{k: v for k, v in r.items() if k != "memory"},
            "memory": r["memory"].total,
            "memory_checkpointed": r["memory"].total_checkpointed,
        }
        for r in rows
    ]


def _fsdp_unsharded(cfg: PlanJobConfig, p: float, vocab: int, tp: int, accumulation: int):
    """FSDP2's ``(gathered parameters, unsharded gradients, the gradients with the other
    reduce_grads_every_micro_batch or None)`` in bytes, for ``p`` parameters per tp rank."""
    from harness.layouts import _BYTES

    m, par = cfg.model, cfg.parallel
    h = m.hidden_size
    root = vocab * h * (1 if m.tie_word_embeddings else 2) / tp + h  # embedding, LM head, final norm
    if m.arch == "gpt2":
        root += m.max_position_embeddings * h + h  # learned positions; the final LayerNorm's bias
    in_flight = root + 2 * (p - root) / max(m.num_layers, 1)  # the root unit and two blocks
    param_bytes, grad_bytes = _BYTES[par.param_dtype], _BYTES[par.reduce_dtype or par.param_dtype]
    gathered = (in_flight if par.reshard_after_forward else p) * param_bytes
    every = in_flight * grad_bytes  # reduce-scattered unit by unit in backward
    once = p * grad_bytes if accumulation > 1 else every  # the whole model's, held between micro-batches
    if par.reduce_grads_every_micro_batch:
        return gathered, every, (once if once != every else None)
    return gathered, once, (every if once != every else None)


def _dataset(cfg: PlanJobConfig, given, global_batch_size: int):
    """``(tokens, exact, note, tokenizer vocab, train sequences, per-source rows or None)`` of the
    corpus (``given``: the first four, from the caller), its sizes checked as the trainer checks them.

    Raises:
        DataError: what :func:`harness.data.check_splits` refuses (the trainer's own messages).
    """
    if cfg.data.sources and given is None:
        mixture, tok_vocab = mixture_sources(cfg, global_batch_size)
        tokens = sum(m["tokens"] for m in mixture)
        sequences = sum(m["train_sequences"] for m in mixture)
        return tokens, True, "tokenized per source (cached for the run)", tok_vocab, sequences, mixture
    tokens, exact, note, tok_vocab = given or count_dataset_tokens(cfg)
    return tokens, exact, note, tok_vocab, _train_sequences(cfg, tokens, global_batch_size), None


def make_plan(
    cfg: PlanJobConfig,
    world_size: int | None = None,
    dataset: tuple[int, bool, str, int | None] | None = None,
) -> PlanReport:
    """Compute the plan for ``cfg`` on ``world_size`` ranks (default ``plan.gpus``).

    Raises:
        ConfigError / DataError: the config cannot run at all (bad batch arithmetic, no data).
            What the trainer adjusts (a warmup longer than the run) is a warning, as in the run.
    """
    p = cfg.plan
    gpus = world_size or p.gpus
    _check_plan_section(p, gpus)
    if cfg.model.init_from:  # as the trainer: its weights there, its tokenizer when tokenizer.path is unset
        safetensors_files(cfg.model.init_from)
        cfg = replace(cfg, tokenizer=tokenizer_config(cfg.model, cfg.tokenizer))
    try:
        batch = validate(cfg, gpus)  # the config alone; then what needs a part, as the trainer checks it
        if cfg.data.document_mask:
            document_mask_path(cfg.model, "cpu")
    except ConfigError as e:
        if "world_size" not in str(e):
            raise
        raise ConfigError(f"{e} (the plan's world size is plan.gpus={gpus})") from None
    tokens, exact, note, tok_vocab, train_sequences, mixture = _dataset(cfg, dataset, batch.global_batch_size)
    sched = build_schedule(cfg, batch, train_sequences)
    plan, max_steps = sched.plan, sched.max_steps
    last = _step(plan, max_steps)
    vocab = resolve_vocab_size(cfg.model, tok_vocab or cfg.tokenizer.train_vocab_size)
    if cfg.model.init_from:
        check_pretrained(cfg.model, vocab)
    stats = model_stats(cfg.model, vocab, cfg.data.seq_len)
    peak, memory_bytes, source = GPU_SPECS[p.gpu]
    total_flops = stats.flops_per_token * last.tokens_total
    wall = total_flops / (gpus * peak * p.mfu)
    ramp = plan.ramp
    mem = memory_estimate(
        cfg, stats.params, vocab, memory_bytes, gpus, accumulation=batch.gradient_accumulation_steps
    )
    ac = cfg.parallel.activation_checkpointing
    drawn = _drawn(mixture, last.tokens_total, cfg.data.seq_len) if mixture else None
    dims = ParallelDims.from_config(cfg.parallel, gpus)
    k = batch.gradient_accumulation_steps
    stages = pipeline_rows(cfg, stats.params, vocab, memory_bytes, gpus, cfg.parallel.tp, k, dims.pp)
    comm = comm_per_step(
        cfg, stats.params, vocab, dims, batch.micro_batch_size, k, stages and stages[0]["params"]
    )
    return PlanReport(
        dataset=f"mixture of {len(cfg.data.sources)} sources" if cfg.data.sources else str(cfg.data.path),
        dataset_tokens=tokens,
        dataset_tokens_exact=exact,
        dataset_note=note,
        seq_len=cfg.data.seq_len,
        train_sequences=train_sequences,
        global_batch_size=batch.global_batch_size,
        global_batch_tokens=batch.global_batch_size * cfg.data.seq_len,
        micro_batch_size=batch.micro_batch_size,
        gradient_accumulation_steps=batch.gradient_accumulation_steps,
        world_size=gpus,
        iterations_per_epoch=plan.iterations_per_epoch(),
        drop_last=cfg.train.drop_last,
        max_steps=max_steps,
        epochs=last.epoch,
        total_tokens=last.tokens_total,
        lr_warmup_end_step=sched.config.warmup_steps,
        batch_warmup_end_step=ramp.end_step() if ramp.tokens is None else _first_full_step(plan, max_steps),
        decay_end_step=max_steps if cfg.schedule.name != "constant" else 0,
        model=cfg.model.name,
        params=stats.params,
        non_embedding_params=stats.non_embedding_params,
        flops_per_token=stats.flops_per_token,
        total_flops=total_flops,
        tokens_per_param=last.tokens_total / stats.params,
        gpu=p.gpu,
        gpus=gpus,
        peak_flops=peak,
        peak_source=source,
        mfu=p.mfu,
        wall_seconds=wall,
        gpu_hours=wall * gpus / 3600,
        memory=mem,
        activation_checkpointing=ac,
        vocab_size=vocab,
        sources=drawn,
        communication=comm,
        pipeline=stages,
        pipeline_schedule=cfg.parallel.pp_schedule if stages else "",
        cp=dims.cp,
        layouts=layout_rows(cfg, stats.params, vocab, gpus, memory_bytes),
        warnings=_warnings(
            cfg,
            sched,
            train_sequences,
            batch.global_batch_size,
            stats.params,
            last.tokens_total / stats.params,
            mem,
            ac,
            drawn,
        ),
    )


TP_DEGREES = (1, 2, 4, 8)  # within one 8-GPU node
PP_DEGREES = (1, 2, 4, 8, 16)  # the layouts table's, when the config has parallel.pp > 1
CP_DEGREES = (1, 2, 4, 8)  # ... and when it has parallel.cp > 1


def layout_rows(cfg: PlanJobConfig, params: int, vocab: int, gpus: int, device_memory) -> list[dict] | None:
    """One row per ``tp`` in :data:`TP_DEGREES` dividing ``gpus`` (parallel=fsdp, Llama models only),
    and per ``pp`` in :data:`PP_DEGREES` when ``parallel.pp > 1`` (the config's schedule; sequence and
    loss parallelism off under ``pp > 1``, as the run requires), or per ``cp`` in :data:`CP_DEGREES` and
    the config's own when ``parallel.cp > 1`` (sequence parallelism off): the mesh, the batch split, the
    pipeline's bubble in theory, memory per device (the busiest pipeline rank; activation checkpointing
    off and on) and bytes per rank per step by mesh dimension; ``note`` says why a layout cannot run
    this config."""
    if cfg.parallel.name != "fsdp" or cfg.model.arch != "llama":
        return None
    if cfg.parallel.pp > 1:  # the config's cp kept
        outer = [(d, max(cfg.parallel.cp, 1)) for d in PP_DEGREES]
    else:
        outer = [(1, d) for d in (sorted({*CP_DEGREES, cfg.parallel.cp}) if cfg.parallel.cp > 1 else (1,))]
    rows = []
    for pp, cp in outer:
        for tp in (t for t in TP_DEGREES if pp * cp * t <= gpus and gpus % (pp * cp * t) == 0):
            rows.append(_layout_row(cfg, params, vocab, gpus, device_memory, pp, tp, cp))
    return rows


def _layout_row(
    cfg: PlanJobConfig, params: int, vocab: int, gpus: int, device_memory, pp: int, tp: int, cp: int
):
    """One row of :func:`layout_rows`."""
    from harness.config.validate import PP_SCHEDULES, check_context, check_pipeline

    whole = pp == 1
    par = replace(
        cfg.parallel,
        tp=tp,
        pp=pp,
        cp=cp,
        pp_layers=cfg.parallel.pp_layers if pp == cfg.parallel.pp else None,
        sequence_parallel=cfg.parallel.sequence_parallel and tp > 1 and whole and cp == 1,
        loss_parallel=cfg.parallel.loss_parallel and whole,
    )
    row = {"pp": pp, "cp": cp, "tp": tp, "note": None}
    c = replace(cfg, parallel=par)
    try:
        check_tensor_parallel(cfg.model, tp, "fsdp")
        dims = ParallelDims.from_config(par, gpus)
        batch = resolve_batch_sizes(cfg.train, dims.dp, "dp")
        check_pipeline(c, batch)
        check_context(c)
    except ConfigError as e:
        return {**row, "note": str(e)}
    k = batch.gradient_accumulation_steps
    mem = memory_estimate(c, params, vocab, device_memory, gpus, tp, par.sequence_parallel, k, pp, cp)
    stages = None if whole else pipeline_memory(c, params, vocab, device_memory, gpus, tp, k, pp)
    comm = comm_per_step(c, params, vocab, dims, batch.micro_batch_size, k, stages and stages[0]["params"])
    return {
        **row,
        "dp_replicate": dims.dp_replicate,
        "dp_shard": dims.dp_shard,
        "micro_batch_size": batch.micro_batch_size,
        "gradient_accumulation_steps": k,
        "bubble": pp_bubble(par.pp_schedule, pp, k, PP_SCHEDULES[par.pp_schedule]),
        "memory": mem.total,
        "memory_checkpointed": mem.total_checkpointed,
        "comm_bytes": {dim: sum(ops.values()) for dim, ops in comm.items()},
    }


def mixture_sources(cfg: PlanJobConfig, global_batch_size: int) -> tuple[list[dict], int]:
    """Every source of ``data.sources`` tokenized (into the trainer's cache) with the shared tokenizer,
    sizes checked as the trainer checks them: ``([{name, weight, tokens, train_sequences}], tokenizer
    vocabulary)``."""
    from harness.data import check_splits, source_specs, token_stores
    from harness.data.mixture import normalized

    specs = source_specs(cfg.data)
    tokenizer, stores = token_stores(specs, cfg.tokenizer)
    tokens = {n: s.num_tokens for n, s in stores.items()}
    sequences = check_splits(cfg.data, specs, tokens, global_batch_size, cfg.eval.every > 0)
    weights = normalized([s.weight for s in specs])
    out = [
        {"name": s.name, "weight": w, "tokens": tokens[s.name], "train_sequences": sequences[s.name]}
        for s, w in zip(specs, weights)
    ]
    return out, len(tokenizer)


def _drawn(mixture: list[dict], total_tokens: int, seq_len: int) -> list[dict]:
    """What the run draws from each source: the blending order keeps every source within one sequence
    of ``weight x sequences`` (harness.data.mixture), so ``round(weight x sequences)`` is exact to one."""
    samples = total_tokens // seq_len
    out = []
    for m in mixture:
        drawn = round(m["weight"] * samples)
        out.append(
            {
                **m,
                "planned_sequences": drawn,
                "planned_tokens": drawn * seq_len,
                "epochs": drawn / m["train_sequences"],
            }
        )
    return out


def _check_plan_section(p: PlanConfig, gpus: int) -> None:
    if p.gpu not in GPU_SPECS:
        raise ConfigError(f"plan.gpu={p.gpu!r} is not one of {', '.join(GPU_SPECS)}")
    if not 0 < p.mfu <= 1:
        raise ConfigError(f"plan.mfu={p.mfu} must be in (0, 1]")
    if gpus < 1:
        raise ConfigError(f"plan.gpus={gpus} must be >= 1")
    if p.dataset_tokens is not None and p.dataset_tokens < 1:
        raise ConfigError(f"plan.dataset_tokens={p.dataset_tokens} must be >= 1 (or null to count data.path)")
    if p.exact_max_mb < 0 or p.sample_mb <= 0:
        raise ConfigError(
            f"plan.exact_max_mb={p.exact_max_mb} must be >= 0 and plan.sample_mb={p.sample_mb} > 0"
        )


def _train_sequences(cfg: PlanJobConfig, tokens: int, global_batch_size: int) -> int:
    """Training sequences of a corpus of ``tokens`` tokens (read as one source), checked as the trainer
    checks them (:func:`harness.data.check_splits`)."""
    from harness.data import SourceSpec, check_splits

    spec = SourceSpec("data", cfg.data, 1.0, "data.path")
    return check_splits(cfg.data, [spec], {"data": tokens}, global_batch_size, cfg.eval.every > 0)["data"]


def _step(plan: IterationPlan, step: int):
    for info in plan.steps():
        if info.step == step:
            return info
    raise AssertionError("unreachable")


def _warnings(
    cfg: PlanJobConfig,
    sched: TrainingSchedule,
    train_sequences: int,
    global_batch: int,
    params: int,
    tokens_per_param: float,
    memory: MemoryEstimate,
    checkpointed: bool,
    sources: list[dict] | None = None,
) -> list[str]:
    """The schedule's shortened warmups (as the trainer logs them) and the plan's own checks.

    A batch ramp whose sizes are not multiples of micro_batch_size x world_size is an error of
    :func:`validate` (the trainer's own check), not a warning.
    """
    out = list(sched.warnings)
    if tokens_per_param < 1:
        out.append(f"{tokens_per_param:.2f} training tokens per parameter (< 1): the model will barely train")
    if warning := lr_warning(params, cfg.optim.lr):
        out.append(warning)
    if cfg.schedule.name != "constant" and sched.lr(sched.max_steps) != cfg.schedule.min_lr:
        out.append(f"the LR schedule does not reach min_lr at max_steps={sched.max_steps}")
    for src in sources or []:
        if src["epochs"] > MAX_USEFUL_EPOCHS:
            out.append(
                f"data.sources.{src['name']} repeats {src['epochs']:.1f} epochs over the run: beyond ~4 "
                "epochs repeated tokens are worth much less (Muennighoff et al. 2023, Scaling "
                "Data-Constrained Language Models)"
            )
    return out + _memory_warnings(cfg, memory, checkpointed)


def _memory_warnings(cfg: PlanJobConfig, mem: MemoryEstimate, checkpointed: bool) -> list[str]:
    """One line when the peak exceeds the device, naming each switch that alone makes the estimate
    fit (activation checkpointing, parallel.reduce_grads_every_micro_batch), cheapest in
    communication first; otherwise the general remedies."""
    peak, device, gib = mem.peak(checkpointed), mem.device_memory, 2**30
    if not device or peak <= device:
        return []
    line = f"estimated {peak / gib:.1f} GiB per device exceeds the {cfg.plan.gpu}'s {device / gib:.0f} GiB: "
    can_reduce = mem.unsharded_grads_other is not None and not cfg.parallel.reduce_grads_every_micro_batch
    fits = []
    if not checkpointed and mem.peak(True) <= device:
        fits.append(
            f"set parallel.activation_checkpointing=true ({mem.peak(True) / gib:.1f} GiB: recomputes each "
            "block's activations in backward, about a third more compute)"
        )
    if can_reduce and mem.peak(checkpointed, mem.unsharded_grads_other) <= device:
        fits.append(
            f"set parallel.reduce_grads_every_micro_batch=true "
            f"({mem.peak(checkpointed, mem.unsharded_grads_other) / gib:.1f} GiB: the "
            f"{mem.unsharded_grads / gib:.1f} GiB of unsharded gradients held between micro-batches are "
            "reduce-scattered after each one instead, accumulation x the reduce-scatter bytes)"
        )
    if fits:
        return [line + "; or ".join(fits)]
    fixes = "lower train.micro_batch_size, shard more (parallel=fsdp / zero_stage=3)"
    if can_reduce:
        fixes += ", set parallel.reduce_grads_every_micro_batch=true"
    return [line + fixes + ("" if checkpointed else " or enable activation checkpointing")]


def _tokenizer_vocab(cfg: PlanJobConfig) -> int | None:
    if cfg.tokenizer.path:
        from harness.data.tokenizer import load_tokenizer

        return len(load_tokenizer(cfg.tokenizer.path, cfg.tokenizer.eos_token))
    return None


def _first_full_step(plan: IterationPlan, max_steps: int) -> int:
    for info in plan.steps():
        if info.global_batch_size == plan.ramp.full or info.step >= max_steps:
            return info.step
    raise AssertionError("unreachable")


def schedule_series(cfg: PlanJobConfig, plan_: PlanReport, max_points: int = 4000) -> dict[str, list]:
    """Per-step LR, global batch size and cumulative tokens (subsampled to ``max_points``) for the PNG."""
    sched = build_schedule(cfg, validate(cfg, plan_.world_size), plan_.train_sequences)
    max_steps = sched.max_steps
    every = max(1, max_steps // max_points)
    out: dict[str, list] = {"step": [], "lr": [], "global_batch_size": [], "tokens_total": []}
    for info in sched.plan.steps():
        if info.step % every == 0 or info.step in (1, max_steps) or info.step <= plan_.batch_warmup_end_step:
            out["step"].append(info.step)
            out["lr"].append(sched.lr(info.step))
            out["global_batch_size"].append(info.global_batch_size)
            out["tokens_total"].append(info.tokens_total)
        if info.step >= max_steps:
            break
    return out


def plot_schedule(series: dict[str, list], path: str, title: str) -> None:
    """Write a 3-panel PNG: LR, global batch size (sequences) and cumulative tokens against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for ax, key, label in zip(
        axes,
        ("lr", "global_batch_size", "tokens_total"),
        ("learning rate", "global batch (sequences)", "cumulative tokens"),
    ):
        ax.plot(series["step"], series[key], lw=1.5)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds:,.1f} s"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.2f} h"
    return f"{seconds / 86400:,.2f} days"


def _mixture_lines(pl: PlanReport) -> list[str]:
    if not pl.sources:
        return []
    lines = [
        "== Mixture (data.sources; the blending order keeps every source within one sequence of its "
        "weight) ==",
        f"{'source':<14} {'weight':>7} {'tokens':>15} {'sequences':>11} {'drawn seqs':>11} "
        f"{'drawn tokens':>15} {'epochs':>7}",
    ]
    for m in pl.sources:
        lines.append(
            f"{m['name']:<14} {m['weight']:>7.1%} {m['tokens']:>15,} {m['train_sequences']:>11,} "
            f"{m['planned_sequences']:>11,} {m['planned_tokens']:>15,} {m['epochs']:>7.2f}"
        )
    return [*lines, ""]


def render_text(pl: PlanReport) -> str:
    """The human-readable plan."""
    gib = 2**30
    m, ac = pl.memory, pl.activation_checkpointing
    exact = (
        "exact: " if pl.dataset_tokens_exact else "" if pl.dataset_note.startswith("given") else "ESTIMATE: "
    )
    lines = [
        "== Iterations (the trainer's own arithmetic) ==",
        f"dataset            {pl.dataset if not pl.dataset_note.startswith('given') else '(not read)'}",
        f"dataset tokens     {pl.dataset_tokens:,} ({exact}{pl.dataset_note})",
        f"seq_len            {pl.seq_len} -> {pl.train_sequences:,} training sequences",
        f"global batch       {pl.global_batch_size} sequences = {pl.global_batch_tokens:,} tokens "
        f"(micro {pl.micro_batch_size} x accumulation {pl.gradient_accumulation_steps} x " + _world_split(pl),
        f"iterations/epoch   {pl.iterations_per_epoch:,} ({'floor, drop_last' if pl.drop_last else 'ceil'})",
        f"max_steps          {pl.max_steps:,} optimizer steps = {pl.epochs:.3f} epochs",
        f"training tokens    {pl.total_tokens:,} ({_si(pl.total_tokens)}; batch ramp counted step by step)",
        f"schedule           LR warmup ends at step {pl.lr_warmup_end_step:,}; full batch from step "
        f"{pl.batch_warmup_end_step:,}; LR decay ends at step {pl.decay_end_step:,}",
        "",
        *_mixture_lines(pl),
        "== Model ==",
        f"model              {pl.model}: {pl.params:,} parameters ({pl.non_embedding_params:,} "
        "non-embedding)",
        f"FLOPs per token    {pl.flops_per_token:.4g} = {pl.flops_formula}",
        f"training FLOPs     {pl.total_flops:.4g}",
        f"tokens/parameter   {pl.tokens_per_param:.2f} (compute-optimal ~{CHINCHILLA_TOKENS_PER_PARAM:.0f}, "
        "Hoffmann et al. 2022)",
        "",
        "== Cost ==",
        f"hardware           {pl.gpus} x {pl.gpu}, peak {pl.peak_flops / 1e12:.1f} TFLOP/s bf16 dense each "
        f"({pl.peak_source})",
        f"at MFU {pl.mfu:.0%}        {_duration(pl.wall_seconds)} wall, {pl.gpu_hours:,.1f} GPU-hours",
        "",
        f"== Memory per device ({m.backend}, model state over {m.shards} shard(s)"
        + (f" x tp {m.tp}" if m.tp > 1 else "")
        + (f" x pp {len(pl.pipeline)}; the busiest pipeline rank" if pl.pipeline else "")
        + "; estimate) ==",
        f"parameters         {m.params / gib:8.2f} GiB",
        f"gradients          {m.grads / gib:8.2f} GiB",
        f"optimizer states   {m.optimizer / gib:8.2f} GiB",
        *_unsharded_lines(pl),
        f"activations        {m.activations / gib:8.2f} GiB (micro-batch {pl.micro_batch_size} x "
        f"{pl.seq_len}); "
        f"{m.activations_checkpointed / gib:.2f} GiB with activation checkpointing",
        f"CUDA + allocator   {(m.peak(ac) - m.tensors(ac)) / gib:8.2f} GiB ({m.context / gib:.2f} GiB CUDA "
        f"context and NCCL buffers + {ALLOCATOR_RESERVE:.0%} allocator reserve; assumed)",
        f"total              {m.peak(ac) / gib:8.2f} GiB (activation checkpointing {'on' if ac else 'off'}; "
        f"{m.peak(not ac) / gib:.2f} GiB with it {'off' if ac else 'on'})"
        + (f"; device: {m.device_memory / gib:.0f} GiB" if m.device_memory else ""),
        "",
    ]
    lines += _pipeline_lines(pl) + _comm_lines(pl) + _layout_lines(pl)
    lines += [f"WARNING: {w}" for w in pl.warnings] or ["no warnings"]
    return "\n".join(lines)


def _world_split(pl: PlanReport) -> str:
    """``world N)``, or the data-parallel, tp and pp degrees it is made of."""
    tp, pp, cp = pl.memory.tp, len(pl.pipeline or [0]), pl.cp
    if tp * pp * cp == 1:
        return f"world {pl.world_size})"
    inner = "".join(f"; {k} {v}" for k, v in (("cp", cp), ("tp", tp), ("pp", pp)) if v > 1)
    return f"dp {pl.world_size // (tp * pp * cp)}{inner}, world {pl.world_size})"


def _pipeline_lines(pl: PlanReport) -> list[str]:
    """Each pipeline rank's stages, layers, parameters and peak (``parallel.pp > 1``)."""
    if not pl.pipeline:
        return []
    gib, first = 2**30, pl.pipeline[0]
    lines = [
        f"== Pipeline stages (pp {len(pl.pipeline)}, {pl.pipeline_schedule}, "
        f"{pl.gradient_accumulation_steps} micro-batches per step: bubble {first['bubble']:.1%} in theory; "
        "estimate) ==",
        f"{'pp rank':>7} {'stages':>8} {'layers':>6} {'params':>9} {'GiB/device':>11} {'with AC':>8}",
    ]
    for r in pl.pipeline:
        extra = ("+emb" if 0 in r["stages"] else "") + (
            "+head" if len(pl.pipeline) * len(r["stages"]) - 1 in r["stages"] else ""
        )
        lines.append(
            f"{r['rank']:>7} {','.join(map(str, r['stages'])):>8} {str(r['layers']) + extra:>6} "
            f"{_si(r['params']):>9} {r['memory'] / gib:>11.1f} {r['memory_checkpointed'] / gib:>8.1f}"
        )
    return [*lines, ""]


def _unsharded_lines(pl: PlanReport) -> list[str]:
    """The gathered parameters and, under FSDP, the unsharded gradients (with the figure of the other
    ``parallel.reduce_grads_every_micro_batch``)."""
    m, gib = pl.memory, 2**30
    if not (m.backend == "fsdp" and m.gathered):  # no FSDP units (another backend, or tp alone)
        return [f"gathered params    {m.gathered / gib:8.2f} GiB"]
    if pl.pipeline:
        return [
            f"unsharded grads    {m.unsharded_grads / gib:8.2f} GiB (the rank's stages', until the step's "
            "reduce-scatter)",
            f"gathered params    {m.gathered / gib:8.2f} GiB (the rank's stages, gathered through the step: "
            "no reshard after forward under pp)",
        ]
    other = m.unsharded_grads_other
    held = other is not None and m.unsharded_grads > other
    note = (
        "the whole model's, held between micro-batches until the step's reduce-scatter"
        if held
        else "the gathered units', until their reduce-scatter"
    )
    if other is not None:
        note += f"; {other / gib:.2f} GiB with parallel.reduce_grads_every_micro_batch={str(held).lower()}"
    return [
        f"unsharded grads    {m.unsharded_grads / gib:8.2f} GiB ({note})",
        f"gathered params    {m.gathered / gib:8.2f} GiB (the root unit, embedding + LM head, and 2 blocks)",
    ]


def _gb(n: float) -> str:
    """Bytes in decimal units (as bandwidths are quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _comm_lines(pl: PlanReport) -> list[str]:
    if pl.communication is None:
        return []
    who = "rank 0's: the first pipeline stage; a middle stage sends both ways" if pl.pipeline else "per rank"
    lines = [f"== Communication per step ({who}, by mesh dimension; estimate, scalars left out) =="]
    for dim, ops in pl.communication.items():
        parts = ", ".join(f"{op} {_gb(b)}" for op, b in ops.items())
        lines.append(f"{dim:<18} {_gb(sum(ops.values()))}: {parts}")
    if not pl.communication:
        lines.append("none (one process)")
    if "dp_shard_cp" in pl.communication and pl.cp == pl.world_size:  # both are the default group
        lines.append(
            "(cp spans the world: a run's comm_by_dim counts dp_shard_cp's bytes under cp, one group)"
        )
    return [*lines, ""]


def _layout_lines(pl: PlanReport) -> list[str]:
    if not pl.layouts:
        return []
    gib = 2**30
    leads = [d for d in ("pp", "cp") if any(r[d] > 1 for r in pl.layouts)]
    mesh = " x ".join(
        d for d in ("pp", "dp_replicate", "dp_shard", "cp", "tp") if d in leads or "_" in d or d == "tp"
    )
    head = "".join(f"{d:>3} " + (f"{'bubble':>6} " if d == "pp" else "") for d in leads)
    lines = [
        f"== Layouts on {pl.gpus} x {pl.gpu} (parallel=fsdp; mesh {mesh}; estimate) ==",
        f"{head}{'tp':>3} {'dp_rep x shard':>15} {'micro x acc':>12} {'GiB/device':>11} {'with AC':>8} "
        + "".join(f"{d + ' bytes/step':>14} " for d in leads)
        + f"{'tp bytes/step':>14} {'dp bytes/step':>14}",
    ]
    for r in pl.layouts:
        first = "".join(
            f"{r[d]:>3} " + (f"{r['bubble']:>6.1%} " if d == "pp" and not r["note"] else "") for d in leads
        )
        if r["note"]:
            pad = f"{'':>6} " if "pp" in leads else ""
            lines.append(f"{first}{pad}{r['tp']:>3}  cannot run: {r['note']}")
            continue
        b = r["comm_bytes"]
        dp = sum(v for d, v in b.items() if d not in ("tp", "pp", "cp"))
        lines.append(
            first + f"{r['tp']:>3} {r['dp_replicate']:>7} x {r['dp_shard']:<5} "
            f"{r['micro_batch_size']:>5} x {r['gradient_accumulation_steps']:<4} {r['memory'] / gib:>11.1f} "
            f"{r['memory_checkpointed'] / gib:>8.1f} "
            + "".join(f"{_gb(b.get(d, 0)):>14} " for d in leads)
            + f"{_gb(b.get('tp', 0)):>14} {_gb(dp):>14}"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.plan [overrides]``: exit 0 with the plan, 2 with one ``error:`` line on bad
    input."""
    from omegaconf import open_dict

    argv = sys.argv[1:] if argv is None else argv
    try:
        composed = compose_checked(argv, schema="plan")
        run_dir = composed.hydra.run.dir
        with open_dict(composed):
            del composed["hydra"]
        cfg = to_object(composed)
        if cfg.plan.format not in ("text", "json"):
            raise ConfigError(f"plan.format={cfg.plan.format!r} is not one of text, json")
        pl = make_plan(cfg)
        if cfg.plan.dry_run:  # what the dry run cannot trace is refused before anything is written
            from harness.dryrun import check_dry_run

            check_dry_run(cfg)
        png = cfg.plan.png if cfg.plan.png is not None else os.path.join(run_dir, "plan.png")
        if png:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
                plot_schedule(
                    schedule_series(cfg, pl),
                    png,
                    f"{cfg.run_name}: {pl.model}, {pl.max_steps:,} steps, {_si(pl.total_tokens)} tokens",
                )
            except OSError as e:
                raise ConfigError(
                    f"plan.png={png!r}: cannot write it ({e.strerror or e}); choose another path "
                    "or plan.png= for none"
                ) from e
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.plan.dry_run:
        return _dry_run(cfg, pl)
    if cfg.plan.format == "json":
        print(json.dumps({**pl.to_dict(), "png": png or None}, indent=1))
    else:
        print(render_text(pl))
        if png:
            print(f"\nschedule plot: {png}")
    return 0


def _dry_run(cfg: PlanJobConfig, pl: PlanReport) -> int:
    """Print the dry run of rank 0's step beside the plan's memory (``plan.format=json``: one object,
    ``{"plan": ..., "dry_run": ...}``); exit 2 with one ``error:`` line
    when the dry run refuses the config (see :mod:`harness.dryrun`)."""
    import time

    from harness.dryrun import dry_run, dry_run_dict, render

    t0 = time.perf_counter()
    try:
        out = dry_run(cfg, pl)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    if cfg.plan.format == "json":
        print(json.dumps({"plan": pl.to_dict(), "dry_run": dry_run_dict(out, seconds)}, indent=1))
    else:
        print(render(out, pl, seconds))
    if out.refusal:
        print(f"error: {out.refusal}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
