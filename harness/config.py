"""Typed configuration schema, registered in Hydra's ConfigStore, and its validation.

Every key a run accepts is declared here as a dataclass field. Hydra composes
``configs/train.yaml`` on top of :class:`TrainConfig`, so an unknown key or a value of
the wrong type is rejected while the config is composed, before anything is built.
The checks that involve more than one field (batch arithmetic, schedule lengths) are in
:func:`validate` and :func:`resolve_batch_sizes`; they raise :class:`ConfigError`, whose
message names the offending key and the fix.
"""

from __future__ import annotations

import os
import re
import sysconfig
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from harness.errors import ConfigError

# ---------------------------------------------------------------------------------------
# Resolvers used by the YAML files.
# ---------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """Directory for tokenizers and tokenized corpora: ``$HARNESS_CACHE_DIR`` or ``~/.cache/harness``."""
    return os.environ.get("HARNESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "harness")


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory (the default corpus lives there)."""
    return sysconfig.get_paths()["stdlib"]


OmegaConf.register_new_resolver("stdlib", stdlib_dir, replace=True)
OmegaConf.register_new_resolver("harness_cache", default_cache_dir, replace=True)


# ---------------------------------------------------------------------------------------
# Schema. Field names follow torchtitan / Megatron / HF usage; keep them stable.
# ---------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of a ``transformers`` causal LM built with random init (no weight download)."""

    name: str = "tiny"
    arch: str = "llama"  # llama | gpt2
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    intermediate_size: int | None = None  # None: 4*hidden (gpt2) or 8/3*hidden rounded to 64 (llama)
    max_position_embeddings: int = 1024
    vocab_size: int | None = None  # None: the tokenizer's vocabulary padded to vocab_multiple
    vocab_multiple: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2


@dataclass
class BatchWarmupConfig:
    """Batch-size ramp: from ``start_global_batch_size`` to ``train.global_batch_size``."""

    start_global_batch_size: int | None = None  # None: no ramp
    steps: int = 0  # ramp length in optimizer steps
    tokens: int | None = None  # or ramp length in tokens (overrides steps when set)


@dataclass
class TrainSection:
    max_steps: int | None = 200
    max_tokens: int | None = None  # token budget converted to steps; set max_steps=null with it
    global_batch_size: int | None = 16  # sequences per optimizer step
    micro_batch_size: int | None = 4  # sequences per forward/backward per rank
    gradient_accumulation_steps: int | None = None  # derived when null
    drop_last: bool = False  # drop an epoch's last partial batch (floor) instead of a short step (ceil)
    stop_at_step: int | None = None  # end this invocation after this step with a checkpoint; the schedule
    # still spans max_steps, and a rerun resumes (time-sliced jobs)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16
    compile: bool = False  # torch.compile each transformer block (torchtitan style), before sharding
    nonfinite: str | None = (
        None  # skip | abort on a non-finite loss or grad norm; None: skip (abort with deepspeed)
    )
    max_consecutive_skips: int = 5  # with skip: abort after this many non-finite steps in a row
    spike_factor: float = 3.0  # log a loss-spike event when loss > spike_factor x running median; 0 disables
    spike_window: int = 50  # steps in that running median
    peak_flops_per_device: float | None = None  # FLOP/s for MFU; None: table (GPU) or measured (CPU)


@dataclass
class DataConfig:
    name: str = "stdlib"
    path: Any = "${stdlib:}/*.py"  # path, glob, list of them, a prepared directory, or a hub name
    format: str | None = None  # text | json | parquet; inferred from the extension when null
    text_field: str = "text"
    sample_by: str = "document"  # text format only: document | line | paragraph
    seq_len: int = 256
    val_fraction: float = 0.05  # tail of the token stream held out for validation
    hub_name: str | None = None  # dataset config name for hub datasets
    split: str = "train"  # split for hub datasets
    num_proc: int = 1  # tokenization worker processes
    loader_workers: int | None = (
        None  # processes preparing the next steps' batches; None: 2 on cuda, 0 on cpu
    )
    cache_dir: str = "${harness_cache:}"


@dataclass
class TokenizerConfig:
    path: str | None = None  # local dir loadable by AutoTokenizer; null: train a byte-level BPE on the corpus
    train_vocab_size: int = 4096  # vocabulary of the BPE trained when path is null


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping (the norm is still logged)
    fused: bool | None = None  # None: fused on cuda, foreach elsewhere


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | constant | wsd
    warmup_steps: int = 20
    min_lr: float = 1e-4
    decay_fraction: float = 0.2  # wsd only: share of max_steps spent decaying
    batch_warmup: BatchWarmupConfig = field(default_factory=BatchWarmupConfig)


@dataclass
class EvalConfig:
    every: int = 50  # steps between validation passes; 0 disables
    batches: int = 4  # micro-batches per validation pass
    patience: int | None = None  # stop after this many evaluations without improvement; null disables


@dataclass
class ParallelConfig:
    """Parallelism backend and its knobs (``configs/parallel/*.yaml``)."""

    name: str = "none"  # none | ddp | fsdp | deepspeed
    timeout_s: float = 600.0  # collective timeout: a dead rank makes the others exit after this long
    # fsdp (FSDP2, torch.distributed.fsdp.fully_shard per block and on the root)
    reshard_after_forward: bool = True  # ZeRO-3 style; false keeps gathered params until backward (ZeRO-2)
    param_dtype: str | None = None  # float32 | bfloat16; None: the model's dtype
    reduce_dtype: str | None = None  # dtype of the gradient reduce-scatter; None: param_dtype
    cpu_offload: bool = False  # keep sharded params, grads and optimizer state on the CPU
    hsdp_replicate: int = (
        1  # HSDP: replicate groups x shard groups (e.g. nodes x gpus_per_node); 1 = plain FSDP
    )
    activation_checkpointing: bool = False  # recompute blocks' activations in backward (none, ddp, fsdp)
    activation_checkpointing_every: int = (
        1  # 1: every block (full); k: every k-th block (torchtitan's selective)
    )
    # deepspeed
    zero_stage: int = 2  # 0 | 1 | 2 | 3
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU
    offload_param: bool = False  # ZeRO-3 parameter offload to CPU
    bf16: bool | None = None  # DeepSpeed bf16 mode; None: on with CUDA, off on CPU
    ds_config: Any = None  # a JSON file path or a dict merged over the generated DeepSpeed config


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "harness"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    every: int = 10  # console line every N steps (metrics.jsonl gets every step)
    progress: str = "auto"  # auto (bar on a terminal) | on | off
    comm_timing: bool = (
        True  # time and count collectives (harness.parallel.comm); false: comm fields are 0/null
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto | never | <path to a checkpoint directory>
    export_hf: bool = True  # save_pretrained model + tokenizer into <run>/hf at the end


@dataclass
class PrepareConfig:
    output_dir: str | None = None  # python -m harness.prepare_data writes the token store here
    overwrite: bool = False  # replace an existing token store at output_dir


@dataclass
class PlanConfig:
    """``python -m harness.plan`` only: the hardware and assumptions of the cost estimate."""

    gpus: int = 1  # devices the run will use (the world size of the plan)
    gpu: str = "H100"  # H100 | H200 | A100 | B200 (peak bf16 FLOP/s and memory: harness.metrics.GPU_SPECS)
    mfu: float = (
        0.40  # assumed model FLOPs utilization (Megatron-LM reports 41-48% on H100; no GPU run here yet)
    )
    format: str = "text"  # text | json
    png: str | None = None  # schedule plot; None: <run dir>/plan.png; "" for none
    dataset_tokens: int | None = None  # plan for a corpus of this many tokens without reading data.path
    exact_max_mb: float = (
        512.0  # corpora up to this size (file bytes) are tokenized (and cached) for exact counts
    )
    sample_mb: float = (
        64.0  # larger ones: estimate tokens from the first files up to this size (needs tokenizer.path)
    )


@dataclass
class SlurmConfig:
    """``python -m harness.launch.slurm`` only: the allocation and the generated sbatch script."""

    nodes: int = 1
    gpus_per_node: int = 8  # 0 on CPU-only partitions
    nproc_per_node: int | None = None  # training processes per node; None: gpus_per_node (1 without GPUs)
    cpus_per_task: int | None = None  # CPUs of each node's task (the launcher and its training processes)
    mem: str | None = None  # --mem, e.g. "0" for all of a node's memory
    time: str = "04:00:00"  # wall-clock limit, Slurm syntax
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False  # whole nodes
    job_name: str | None = None  # None: run_name
    launcher: str = "auto"  # auto (deepspeed for parallel=deepspeed, else torchrun) | torchrun | deepspeed
    rdzv_port: int | None = None  # rendezvous / master port on the first node; None: 20000 + job id % 20000
    python: str | None = None  # interpreter on the nodes; None: this one (``python`` inside a container)
    container_image: str | None = None  # pyxis/enroot image (srun --container-image)
    container_mounts: str | None = None  # srun --container-mounts, e.g. /data:/data,/scratch:/scratch
    container_exec: str | None = None  # command prefix on each node, e.g. "apptainer exec --nv harness.sif"
    env: dict[str, str] = field(
        default_factory=dict
    )  # exported before srun: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...
    setup: list[str] = field(
        default_factory=list
    )  # shell lines run before srun (module load, source venv/bin/activate)
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. --mail-type=END
    signal_grace_s: int = 120  # USR1 this many seconds before the time limit: finish the step and checkpoint
    max_requeues: int = 10  # requeues (preemptions, and failures with requeue_on_failure) before giving up
    requeue_on_failure: bool = False  # also requeue after a crash (bounded by max_requeues)
    dry_run: bool = False  # write the script, do not submit


@dataclass
class TrainConfig:
    """The whole run configuration (``configs/train.yaml`` composes onto this)."""

    seed: int = 1234
    run_name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def register_configs() -> None:
    """Register :class:`TrainConfig` as ``train_schema`` in Hydra's ConfigStore."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()


# ---------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSizes:
    """Full-size batch arithmetic: ``global = micro * accumulation * world_size`` (sequences)."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int


def resolve_batch_sizes(train: TrainSection, world_size: int) -> BatchSizes:
    """Derive the missing one of global/micro/accumulation from the two given.

    Raises:
        ConfigError: fewer than two given, a non-positive value, or values whose product
            does not match (the message shows the arithmetic).
    """
    g, m, k = train.global_batch_size, train.micro_batch_size, train.gradient_accumulation_steps
    for key, v in (("global_batch_size", g), ("micro_batch_size", m), ("gradient_accumulation_steps", k)):
        if v is not None and v <= 0:
            raise ConfigError(f"train.{key}={v} must be a positive integer")
    given = sum(v is not None for v in (g, m, k))
    if given < 2:
        raise ConfigError(
            "set two of train.global_batch_size, train.micro_batch_size, train.gradient_accumulation_steps "
            f"(got global={g}, micro={m}, accumulation={k})"
        )
    if g is None:
        g = m * k * world_size
    elif m is None:
        if g % (k * world_size):
            raise ConfigError(
                f"train.global_batch_size={g} is not divisible by gradient_accumulation_steps={k} x "
                f"world_size={world_size} = {k * world_size}; change one of them"
            )
        m = g // (k * world_size)
    elif k is None:
        if g % (m * world_size):
            raise ConfigError(
                f"train.global_batch_size={g} is not divisible by micro_batch_size={m} x "
                f"world_size={world_size} = {m * world_size}; change one of them or set "
                "train.gradient_accumulation_steps"
            )
        k = g // (m * world_size)
    elif g != m * k * world_size:
        raise ConfigError(
            f"train.global_batch_size={g} != micro_batch_size={m} x gradient_accumulation_steps={k} x "
            f"world_size={world_size} = {m * k * world_size}; set one of them to null to derive it"
        )
    return BatchSizes(g, m, k, world_size)


_CHOICES = {
    "model.arch": ("llama", "gpt2"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "data.sample_by": ("document", "line", "paragraph"),
    "optim.name": ("adamw",),
    "schedule.name": ("cosine", "constant", "wsd"),
    "parallel.name": ("none", "ddp", "fsdp", "deepspeed"),
    "logging.progress": ("auto", "on", "off"),
    "logging.wandb.mode": ("auto", "online", "offline", "disabled"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "float32", "bfloat16"),
}


def _nonfinite_float(node: Any, prefix: str = "") -> tuple[str, float] | None:
    """The first float field (dotted key, value) that is NaN or infinite."""
    import dataclasses
    import math

    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{prefix}{f.name}", v
        if dataclasses.is_dataclass(v):
            found = _nonfinite_float(v, f"{prefix}{f.name}.")
            if found:
                return found
    return None


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig, world_size: int = 1, schedule_fits: bool = True) -> BatchSizes:
    """Check everything that can be checked from the config alone (no data, no model).

    Args:
        cfg: the composed config.
        world_size: training processes (the batch arithmetic depends on it).
        schedule_fits: also refuse warmups longer than ``train.max_steps`` (``harness.plan``
            turns these into warnings and passes False).
    Returns:
        The full-size :class:`BatchSizes`.
    Raises:
        ConfigError: naming the first offending key and the fix.
    """
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    if cfg.data.format is not None and cfg.data.format not in ("text", "json", "parquet"):
        raise ConfigError(
            f"data.format={cfg.data.format!r} is not one of text, json, parquet (or null to infer)"
        )
    positive = (
        "model.hidden_size", "model.num_layers", "model.num_heads", "model.max_position_embeddings",
        "model.vocab_multiple", "data.seq_len", "data.num_proc", "tokenizer.train_vocab_size", "optim.lr",
        "logging.every", "eval.batches", "checkpoint.keep_last", "model.rope_theta", "model.norm_eps",
        "model.init_std",
    )  # fmt: skip
    bad_float = _nonfinite_float(cfg)
    if bad_float:
        raise ConfigError(f"{bad_float[0]}={bad_float[1]} must be a finite number")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32)")
    for key, limit in (("max_steps", 10**9), ("max_tokens", 10**16)):
        v = getattr(cfg.train, key)
        if v is not None and v > limit:
            raise ConfigError(f"train.{key}={v} is beyond {limit:.0e}; is a digit too many?")
    if cfg.train.nonfinite not in (None, "skip", "abort"):
        raise ConfigError(f"train.nonfinite={cfg.train.nonfinite!r} is not one of skip, abort (or null)")
    if cfg.train.nonfinite == "skip" and cfg.parallel.name == "deepspeed":
        raise ConfigError("train.nonfinite=skip is not supported with parallel=deepspeed (the engine steps inside "
                          "engine.step()); use train.nonfinite=abort or leave it null")  # fmt: skip
    for key in ("max_consecutive_skips", "spike_window"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)} must be >= 1")
    if cfg.train.spike_factor < 0:
        raise ConfigError(
            f"train.spike_factor={cfg.train.spike_factor} must be >= 0 (0 disables loss-spike events)"
        )
    if cfg.data.loader_workers is not None and cfg.data.loader_workers < 0:
        raise ConfigError(
            f"data.loader_workers={cfg.data.loader_workers} must be >= 0 (0: load in the training process)"
        )
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be > 0")
    non_negative = (
        "optim.weight_decay",
        "optim.grad_clip",
        "optim.eps",
        "schedule.warmup_steps",
        "schedule.min_lr",
        "eval.every",
        "checkpoint.every",
        "schedule.batch_warmup.steps",
    )
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 0")
    for key in (
        "model.num_kv_heads",
        "model.intermediate_size",
        "model.vocab_size",
        "eval.patience",
        "schedule.batch_warmup.tokens",
    ):
        v = _get(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(f"{key}={v} must be > 0 (or null)")
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(
            f"run_name={cfg.run_name!r} must be a non-empty name without '/' (it names runs/<run_name>)"
        )
    if cfg.tokenizer.train_vocab_size < 257:
        raise ConfigError(
            f"tokenizer.train_vocab_size={cfg.tokenizer.train_vocab_size} must be >= 257 "
            "(256 byte symbols + <|endoftext|>)"
        )
    m = cfg.model
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}"
        )
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}"
        )
    if cfg.data.seq_len > m.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}; lower data.seq_len or raise model.max_position_embeddings"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two numbers in [0, 1)")
    if cfg.schedule.min_lr > cfg.optim.lr:
        raise ConfigError(f"schedule.min_lr={cfg.schedule.min_lr} is larger than optim.lr={cfg.optim.lr}")
    if not 0.0 <= cfg.schedule.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction={cfg.schedule.decay_fraction} must be in [0, 1]")

    _validate_parallel(cfg.parallel, world_size)
    t = cfg.train
    if (t.max_steps is None) == (t.max_tokens is None):
        raise ConfigError(
            "set exactly one budget: train.max_steps or train.max_tokens "
            f"(got max_steps={t.max_steps}, max_tokens={t.max_tokens}; with max_tokens add train.max_steps=null)"
        )
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be > 0")
    if t.max_tokens is not None and t.max_tokens <= 0:
        raise ConfigError(f"train.max_tokens={t.max_tokens} must be > 0")
    if t.stop_at_step is not None and t.stop_at_step <= 0:
        raise ConfigError(f"train.stop_at_step={t.stop_at_step} must be > 0 (or null)")
    if t.peak_flops_per_device is not None and t.peak_flops_per_device <= 0:
        raise ConfigError(f"train.peak_flops_per_device={t.peak_flops_per_device} must be > 0 (or null)")
    batch = resolve_batch_sizes(t, world_size)

    bw = cfg.schedule.batch_warmup
    if bw.start_global_batch_size is not None:
        inc = batch.micro_batch_size * world_size
        start = bw.start_global_batch_size
        if not 0 < start <= batch.global_batch_size:
            raise ConfigError(
                f"schedule.batch_warmup.start_global_batch_size={start} must be in "
                f"[1, train.global_batch_size={batch.global_batch_size}]"
            )
        if start % inc or (batch.global_batch_size - start) % inc:
            raise ConfigError(
                f"schedule.batch_warmup.start_global_batch_size={start} and train.global_batch_size="
                f"{batch.global_batch_size} must both be multiples of micro_batch_size x world_size = {inc}"
            )
        if bw.tokens is not None and bw.steps:
            raise ConfigError(
                f"schedule.batch_warmup.tokens={bw.tokens} and schedule.batch_warmup.steps={bw.steps} are both set; "
                "give one ramp length (add schedule.batch_warmup.steps=0 to ramp over tokens)"
            )
        if bw.tokens is None and bw.steps == 0 and start != batch.global_batch_size:
            raise ConfigError(
                "schedule.batch_warmup.start_global_batch_size is set but the ramp has no length: "
                "set schedule.batch_warmup.steps (or .tokens)"
            )
    if t.max_steps is not None and schedule_fits:  # harness.plan reports these as warnings instead
        check_schedule_fits(cfg, t.max_steps)
    return batch


def _validate_parallel(p: ParallelConfig, world_size: int) -> None:
    """Knobs that only one backend understands, set with another, are errors (not silently ignored)."""
    defaults = ParallelConfig()
    own = {
        "fsdp": ("reshard_after_forward", "param_dtype", "reduce_dtype", "cpu_offload", "hsdp_replicate"),
        "deepspeed": ("zero_stage", "offload_optimizer", "offload_param", "bf16", "ds_config"),
    }
    for backend, keys in own.items():
        if p.name == backend:
            continue
        for key in keys:
            if getattr(p, key) != getattr(defaults, key):
                raise ConfigError(f"parallel.{key} is a {backend} setting, but parallel.name={p.name}; "
                                  f"use parallel={backend} or drop parallel.{key}")  # fmt: skip
    if p.activation_checkpointing and p.name == "deepspeed":
        raise ConfigError("parallel.activation_checkpointing is for ddp/fsdp/none; with deepspeed use its own "
                          "activation_checkpointing section in parallel.ds_config")  # fmt: skip
    if p.activation_checkpointing_every < 1:
        raise ConfigError(f"parallel.activation_checkpointing_every={p.activation_checkpointing_every} must be >= 1 "
                          "(1: every block; k: every k-th block)")  # fmt: skip
    if p.timeout_s <= 0:
        raise ConfigError(f"parallel.timeout_s={p.timeout_s} must be > 0")
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(p, key) not in (None, "float32", "bfloat16"):
            raise ConfigError(f"parallel.{key}={getattr(p, key)!r} is not one of float32, bfloat16 (or null)")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not one of 0, 1, 2, 3")
    if p.offload_param and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_param needs parallel.zero_stage=3 (got {p.zero_stage})")
    if p.hsdp_replicate < 1 or world_size % p.hsdp_replicate:
        raise ConfigError(
            f"parallel.hsdp_replicate={p.hsdp_replicate} must divide world_size={world_size} (replicas x shards)"
        )


def slurm_time_seconds(text: str) -> int:
    """Seconds of a Slurm time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S`` (sbatch manual).

    Raises:
        ConfigError: another form, a field out of range, or 0 (which Slurm reads as no limit).
    """
    import re

    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text or ""))
    bad = ConfigError(f"slurm.time={text!r} is not a Slurm time limit (MM, HH:MM:SS or D-HH:MM:SS, not 0)")
    if not m:
        raise bad
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = a, b or 0, c or 0
    elif c is not None:  # H:M:S
        h, mi, s = a, b, c
    elif b is not None:  # M:S
        h, mi, s = 0, a, b
    else:  # M
        h, mi, s = 0, a, 0
    hours_given = days is not None or c is not None
    if s > 59 or (hours_given and mi > 59) or (days is not None and h > 23):
        raise bad
    total = (days or 0) * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise bad
    return total


def validate_slurm(s: SlurmConfig, parallel: str) -> tuple[str, int]:
    """Check the ``slurm`` section for ``python -m harness.launch.slurm``.

    Returns:
        ``(launcher, nproc_per_node)``: ``torchrun`` or ``deepspeed``, and training processes per node.
    Raises:
        ConfigError: naming the offending ``slurm.*`` key and the fix.
    """
    import re

    if s.nodes is None or s.nodes < 1:
        raise ConfigError(f"slurm.nodes={s.nodes} must be >= 1 (the number of nodes to allocate)")
    if s.gpus_per_node < 0:
        raise ConfigError(f"slurm.gpus_per_node={s.gpus_per_node} must be >= 0 (0 on CPU partitions)")
    nproc = s.nproc_per_node if s.nproc_per_node is not None else max(s.gpus_per_node, 1)
    if nproc < 1:
        raise ConfigError(f"slurm.nproc_per_node={s.nproc_per_node} must be >= 1")
    if s.gpus_per_node and nproc > s.gpus_per_node:
        raise ConfigError(f"slurm.nproc_per_node={nproc} > slurm.gpus_per_node={s.gpus_per_node}: "
                          "one training process per GPU at most")  # fmt: skip
    for key in ("cpus_per_task", "signal_grace_s", "max_requeues", "rdzv_port"):
        value = getattr(s, key)
        if value is not None and value < (1 if key in ("cpus_per_task", "rdzv_port") else 0):
            raise ConfigError(f"slurm.{key}={value} must be {'> 0' if key != 'max_requeues' else '>= 0'}")
    if s.rdzv_port is not None and not 1024 <= s.rdzv_port <= 65535:
        raise ConfigError(
            f"slurm.rdzv_port={s.rdzv_port} must be a port in 1024..65535 (or null: from the job id)"
        )
    limit = slurm_time_seconds(s.time)
    if limit <= s.signal_grace_s:
        raise ConfigError(f"slurm.time={s.time!r} ({limit} s) must be longer than slurm.signal_grace_s="
                          f"{s.signal_grace_s}: the checkpoint signal comes that long before the limit")  # fmt: skip
    if s.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(s.mem)):
        raise ConfigError(f"slurm.mem={s.mem!r} is not a Slurm memory size (e.g. 0 for all, 500G, 64000M)")
    launcher = s.launcher
    if launcher == "auto":
        launcher = "deepspeed" if parallel == "deepspeed" else "torchrun"
    if launcher not in ("torchrun", "deepspeed"):
        raise ConfigError(f"slurm.launcher={s.launcher!r} is not one of auto, torchrun, deepspeed")
    for name in s.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)):
            raise ConfigError(f"slurm.env key {name!r} is not a valid environment variable name")
        if re.search(r"KEY|TOKEN|SECRET|PASSWORD", str(name).upper()):
            raise ConfigError(f"slurm.env.{name} looks like a secret: it would be written into the sbatch script; "
                              "export it in the submitting shell instead (sbatch passes the environment on)")  # fmt: skip
    for arg in s.sbatch_args:
        if not str(arg).startswith("-"):
            raise ConfigError(
                f"slurm.sbatch_args entry {arg!r} must be an sbatch option such as --mail-type=END"
            )
    return launcher, nproc


def check_schedule_fits(cfg: TrainConfig, max_steps: int) -> None:
    """Raise :class:`ConfigError` when a warmup (LR or batch) is longer than the run.

    ``max_steps`` is ``train.max_steps`` or the step count a ``train.max_tokens`` budget converts to.
    """
    s = cfg.schedule
    budget = (
        f"train.max_steps={max_steps}"
        if cfg.train.max_tokens is None
        else f"the {max_steps} steps of train.max_tokens={cfg.train.max_tokens}"
    )
    if s.warmup_steps > max_steps:
        raise ConfigError(
            f"schedule.warmup_steps={s.warmup_steps} > {budget}: the run would end "
            "inside the LR warmup; lower schedule.warmup_steps"
        )
    if s.name == "wsd":
        decay_steps = round(s.decay_fraction * max_steps)
        if s.warmup_steps > max_steps - decay_steps:
            raise ConfigError(
                f"schedule.warmup_steps={s.warmup_steps} overlaps the wsd decay (last {decay_steps} of "
                f"{budget}); lower schedule.warmup_steps or schedule.decay_fraction"
            )
    bw = s.batch_warmup
    if bw.start_global_batch_size is not None and bw.tokens is None and bw.steps > max_steps:
        raise ConfigError(
            f"schedule.batch_warmup.steps={bw.steps} > {budget}: the run would end "
            "inside the batch-size warmup; lower schedule.batch_warmup.steps"
        )


def composition_error(e: Exception) -> str:
    """Hydra's multi-line composition error (unknown key, wrong type, bad override) as one line."""
    lines = [" ".join(str(x).split()) for x in (e, e.__cause__) if x is not None and str(x).strip()]
    text = " -- ".join(dict.fromkeys(lines))
    text = text.split(" Config search path:")[0].split(" See https://hydra.cc")[0]
    text = re.sub(r" To append to your config use \+\S+", "", text)
    return text.replace(" full_key:", "; full_key:").split(" object_type=")[0].split(" reference_type=")[0]


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def compose_checked(overrides: list[str]):
    """Compose ``configs/train.yaml`` with ``overrides`` as the command lines do (Hydra config included),
    so every entry point (train, launch.slurm, plan) reports bad input as one :class:`ConfigError` line
    instead of Hydra's multi-line report.

    Raises:
        ConfigError: a composition error (unknown key, wrong type, missing option), a key the
            schema lacks (added with ``+``), or a ``hydra.run.dir`` that is a file.
    """
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
    except Exception as e:  # ConfigCompositionException, OverrideParseException, ValidationError, ...
        raise ConfigError(composition_error(e)) from e
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(
            f"hydra.run.dir={run_dir!r} is a file, not a directory; choose another run directory"
        )
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(
            f"{unknown[0]} is not a config key (added with '+'?); see harness/config.py for the keys"
        )
    return cfg


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its dataclass schema does not declare (a ``+key=value`` override
    adds them; Hydra accepts that, the trainer would silently ignore them)."""
    import dataclasses

    out = []
    schema = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg:
        if key == "hydra":
            continue
        if fields is not None and key not in fields:
            out.append(f"{prefix}{key}")
            continue
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            out += unknown_keys(node, f"{prefix}{key}.")
    return out


def to_object(cfg: Any) -> TrainConfig:
    """Turn a composed DictConfig into a :class:`TrainConfig` instance (interpolations resolved)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    return OmegaConf.to_object(cfg)
