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
from harness.layouts import comm_per_step
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
    # parallel=fsdp with a Llama model: one row per tp degree (memory and communication per layout)
    layouts: list[dict] | None = None
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
) -> MemoryEstimate:
    """Bytes per device for ``cfg.parallel`` at ``world_size`` ranks and ``accumulation`` micro-batches
    per step (see :class:`MemoryEstimate`); ``tp`` / ``sequence_parallel`` override the config's (the
    layouts table).

    Tensor parallelism divides the matrices by ``tp`` (norm gains stay whole) and, after Korthikanti et
    al. 2022 (Sec. 4.2), the activations per layer to ``s b h (10 + 24 / tp)`` without sequence
    parallelism and ``34 s b h / tp`` with it; the fp32 logits are divided only under loss parallelism.
    """
    from harness.layouts import tp_local_params

    m, par = cfg.model, cfg.parallel
    tp = par.tp if tp is None else tp
    sp = par.sequence_parallel if sequence_parallel is None else sequence_parallel
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
    s, b, h, L = cfg.data.seq_len, cfg.train.micro_batch_size or 1, m.hidden_size, m.num_layers
    logits = 8.0 * s * b * vocab / (tp if par.loss_parallel else 1)
    per_layer = 34.0 / tp if sp else 10.0 + 24.0 / tp
    act = per_layer * s * b * h * L + logits
    act_ckpt = 2.0 * s * b * h * L / (tp if sp else 1) + per_layer * s * b * h + logits
    return MemoryEstimate(
        name, shards, params_b, grads_b, opt_b, gathered, act, act_ckpt, device_memory, tp, unsharded, other
    )


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
    comm = comm_per_step(
        cfg, stats.params, vocab, dims, batch.micro_batch_size, batch.gradient_accumulation_steps
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


def layout_rows(cfg: PlanJobConfig, params: int, vocab: int, gpus: int, device_memory) -> list[dict] | None:
    """One row per ``tp`` in :data:`TP_DEGREES` dividing ``gpus`` (parallel=fsdp, Llama models only):
    the mesh, the batch split, memory per device (activation checkpointing off and on) and bytes per rank
    per step by mesh dimension; ``note`` says why a degree cannot run this config."""
    if cfg.parallel.name != "fsdp" or cfg.model.arch != "llama":
        return None
    rows = []
    for tp in (t for t in TP_DEGREES if t <= gpus and gpus % t == 0):
        par = replace(cfg.parallel, tp=tp, sequence_parallel=cfg.parallel.sequence_parallel and tp > 1)
        row = {"tp": tp, "note": None}
        try:
            check_tensor_parallel(cfg.model, tp, "fsdp")
            dims = ParallelDims.from_config(par, gpus)
            batch = resolve_batch_sizes(cfg.train, dims.dp, f"dp={dims.dp}")
        except ConfigError as e:
            rows.append({**row, "note": str(e)})
            continue
        c = replace(cfg, parallel=par)
        mem = memory_estimate(
            c,
            params,
            vocab,
            device_memory,
            gpus,
            tp,
            par.sequence_parallel,
            batch.gradient_accumulation_steps,
        )
        comm = comm_per_step(
            c, params, vocab, dims, batch.micro_batch_size, batch.gradient_accumulation_steps
        )
        rows.append(
            {
                **row,
                "dp_replicate": dims.dp_replicate,
                "dp_shard": dims.dp_shard,
                "micro_batch_size": batch.micro_batch_size,
                "gradient_accumulation_steps": batch.gradient_accumulation_steps,
                "memory": mem.total,
                "memory_checkpointed": mem.total_checkpointed,
                "comm_bytes": {dim: sum(ops.values()) for dim, ops in comm.items()},
            }
        )
    return rows


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
        f"(micro {pl.micro_batch_size} x accumulation {pl.gradient_accumulation_steps} x "
        + (
            f"world {pl.world_size})"
            if pl.memory.tp == 1
            else f"dp {pl.world_size // pl.memory.tp}; tp {pl.memory.tp}, world {pl.world_size})"
        ),
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
    lines += _comm_lines(pl) + _layout_lines(pl)
    lines += [f"WARNING: {w}" for w in pl.warnings] or ["no warnings"]
    return "\n".join(lines)


def _unsharded_lines(pl: PlanReport) -> list[str]:
    """The gathered parameters and, under FSDP, the unsharded gradients (with the figure of the other
    ``parallel.reduce_grads_every_micro_batch``)."""
    m, gib = pl.memory, 2**30
    if not (m.backend == "fsdp" and m.gathered):  # no FSDP units (another backend, or tp alone)
        return [f"gathered params    {m.gathered / gib:8.2f} GiB"]
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
    lines = ["== Communication per step (per rank, by mesh dimension; estimate, scalars left out) =="]
    for dim, ops in pl.communication.items():
        parts = ", ".join(f"{op} {_gb(b)}" for op, b in ops.items())
        lines.append(f"{dim:<18} {_gb(sum(ops.values()))}: {parts}")
    if not pl.communication:
        lines.append("none (one process)")
    return [*lines, ""]


def _layout_lines(pl: PlanReport) -> list[str]:
    if not pl.layouts:
        return []
    gib = 2**30
    lines = [
        f"== Layouts on {pl.gpus} x {pl.gpu} (parallel=fsdp; mesh dp_replicate x dp_shard x tp; estimate) ==",
        f"{'tp':>3} {'dp_rep x shard':>15} {'micro x acc':>12} {'GiB/device':>11} {'with AC':>8} "
        f"{'tp bytes/step':>14} {'dp bytes/step':>14}",
    ]
    for r in pl.layouts:
        if r["note"]:
            lines.append(f"{r['tp']:>3}  cannot run: {r['note']}")
            continue
        dp = sum(b for d, b in r["comm_bytes"].items() if d != "tp")
        lines.append(
            f"{r['tp']:>3} {r['dp_replicate']:>7} x {r['dp_shard']:<5} "
            f"{r['micro_batch_size']:>5} x {r['gradient_accumulation_steps']:<4} {r['memory'] / gib:>11.1f} "
            f"{r['memory_checkpointed'] / gib:>8.1f} {_gb(r['comm_bytes'].get('tp', 0)):>14} {_gb(dp):>14}"
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
