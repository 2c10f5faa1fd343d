"""The run's configuration schema: one dataclass per section of ``configs/train.yaml``.

Every key a run accepts is declared here; Hydra composes the YAML files onto these classes, so an
unknown key or a wrong type is refused while the config is composed. Field names follow
torchtitan / Megatron / HF usage. The parallelism section has one class per backend
(:class:`FSDPConfig` has only FSDP keys, and so on), chosen by the ``parallel=`` config group.
The ``plan``, ``slurm`` and ``prepare`` sections belong to their own command lines and are
declared beside them (``harness/plan.py``, ``harness/cluster/slurm.py``, ``harness/prepare_data.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Shape of a ``transformers`` causal LM built with random init (no weight download), or started
    from a local Hugging Face checkpoint (``init_from``)."""

    name: str = "tiny"
    # llama | gpt2
    arch: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    # None: the same as num_heads (no grouped-query attention)
    num_kv_heads: int | None = None
    # None: 4 x hidden (gpt2) or 8/3 x hidden rounded up to 64 (llama)
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    # None: the tokenizer's vocabulary padded up to vocab_multiple
    vocab_size: int | None = None
    vocab_multiple: int = 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # sdpa | eager | flash_attention_2
    attn_implementation: str = "sdpa"
    # a Hugging Face checkpoint directory (model.safetensors or model.safetensors.index.json, as
    # save_pretrained and python -m harness.export write it) to start from instead of random init; its
    # tensors must fit the shape above; the tokenizer comes from it when tokenizer.path is unset;
    # ignored when the run resumes from its own checkpoint
    init_from: str | None = None


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources.<name>``); unset keys take the ``data`` section's."""

    # anything data.path accepts: a file, glob, directory, list, prepared store, hub name
    path: Any = None
    # > 0; the weights are normalized over the sources
    weight: float = 1.0
    format: str | None = None
    text_field: str | None = None
    sample_by: str | None = None


@dataclass
class DataConfig:
    """The corpus, how it is read and cut into sequences."""

    name: str = "stdlib"
    # a path, glob, list of them, a prepared token-store directory, or a hub name
    path: Any = "${stdlib:}/*.py"
    # text | json | parquet; None: inferred from the file extension
    format: str | None = None
    text_field: str = "text"
    # text format only: what one document is (document | line | paragraph)
    sample_by: str = "document"
    # tokens per training sequence (each window holds seq_len + 1 tokens)
    seq_len: int = 256
    # the tail of the token stream held out for validation
    val_fraction: float = 0.05
    # dataset config name and split for hub datasets
    hub_name: str | None = None
    split: str = "train"
    # tokenization worker processes
    num_proc: int = 1
    # processes preparing the next steps' batches; None: 2 on CUDA, 0 on CPU
    loader_workers: int | None = None
    cache_dir: str = "${harness_cache:}"
    # on a cold cache one process tokenizes (harness.data.once) while the others wait for it, at most
    # this long (seconds); a larger corpus is best tokenized once with python -m harness.prepare_data
    prepare_timeout_s: float = 7200.0
    # a weighted mixture: name -> source (the keys of SourceConfig: path, weight, format, text_field,
    # sample_by), e.g. 'data.sources={web: {path: /d/c4/*.json.gz, weight: 0.7}, code: {...}}';
    # None: the one source data.path. (Untyped so that the whole mapping can be given on the command
    # line; each source is checked against SourceConfig before anything is read.)
    sources: Any = None
    # resume a run whose checkpoint has other sources or weights: every source continues from its
    # position and the new weights apply from the resume step
    allow_mixture_change: bool = False
    # attention stops at document boundaries (EOS) inside packed sequences; positions restart per document
    document_mask: bool = False


@dataclass
class TokenizerConfig:
    # a local directory AutoTokenizer loads, a directory with only tokenizer.json, or a tokenizer.json
    # file; None: train a byte-level BPE on the corpus
    path: str | None = None
    # vocabulary of the BPE trained when path is None
    train_vocab_size: int = 4096
    # the document separator when the tokenizer declares no EOS (or to override it), e.g. <|endoftext|>
    eos_token: str | None = None
    # false: the text of a special token inside a document (<|endoftext|>, </s>) is tokenized as text;
    # true: as that special token (corpora written with special tokens on purpose)
    parse_special_tokens: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # max global L2 norm; 0 disables clipping (the norm is still logged)
    grad_clip: float = 1.0
    # None: the fused kernel on CUDA, foreach elsewhere
    fused: bool | None = None


@dataclass
class BatchWarmupConfig:
    """Batch-size ramp from ``start_global_batch_size`` to ``train.global_batch_size``."""

    # None: no ramp
    start_global_batch_size: int | None = None
    # ramp length in optimizer steps; 0 (with tokens None): no ramp
    steps: int = 0
    # or the ramp length in tokens (Megatron's --rampup-batch-size ramps over samples)
    tokens: int | None = None
    # sequences added to the global batch per stage (Megatron's batch-size increment); required
    # with a ramp; the same at every world size, so the ramp does not depend on the layout
    increment: int | None = None


@dataclass
class ScheduleConfig:
    # cosine | constant | wsd
    name: str = "cosine"
    warmup_steps: int = 20
    min_lr: float = 1e-4
    # wsd only: the share of the steps spent decaying
    decay_fraction: float = 0.2
    batch_warmup: BatchWarmupConfig = field(default_factory=BatchWarmupConfig)


@dataclass
class TrainingConfig:
    """The ``train:`` section: budget, batch sizes, device and numerics of the step."""

    max_steps: int | None = 200
    # a token budget converted to steps (set max_steps=null with it)
    max_tokens: int | None = None
    # sequences per optimizer step (all ranks)
    global_batch_size: int | None = 16
    # sequences per forward/backward on one rank
    micro_batch_size: int | None = 4
    # derived when None
    gradient_accumulation_steps: int | None = None
    # drop an epoch's last partial batch (floor) instead of running a short step (ceil)
    drop_last: bool = False
    # end this invocation after this step with a checkpoint; the schedule still spans max_steps
    stop_at_step: int | None = None
    # auto | cpu | cuda
    device: str = "auto"
    # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    dtype: str = "auto"
    # torch.compile each transformer block (after activation checkpointing, before FSDP)
    compile: bool = False
    # skip | abort on a non-finite loss or grad norm; None: skip (abort with deepspeed)
    nonfinite: str | None = None
    # with skip: abort after this many non-finite steps in a row
    max_consecutive_skips: int = 5
    # loss-spike event when loss > spike_factor x the running median; 0 disables
    spike_factor: float = 3.0
    # steps in that running median
    spike_window: int = 50
    # FLOP/s of one device for MFU; None: datasheet table (GPU) or measured (CPU)
    peak_flops_per_device: float | None = None


@dataclass
class EvalConfig:
    # steps between validation passes; 0 disables
    every: int = 50
    # validation set: the first batches x train.global_batch_size held-out sequences (any layout alike)
    batches: int = 4
    # stop after this many evaluations without improvement; None disables
    patience: int | None = None


@dataclass
class ParallelConfig:
    """Keys every backend has; each ``parallel=<name>`` group option extends it with its own."""

    # none | ddp | fsdp | deepspeed (set by the config group: use parallel=<name>)
    name: str = "none"
    # collective timeout: a dead rank makes the others exit after this long
    timeout_s: float = 600.0
    # hang watchdog (harness/hooks/watchdog.py): a phase that lasts longer than its timeout dumps every
    # rank's stacks and exits 124. Step phase (from the end of the latest step to the next end):
    # None: max(300, 10 x the median of the latest 100 step times)
    hang_timeout_s: float | None = None
    # from the start of training until the first step ends: the hooks' start, NCCL's lazy communicator
    # set-up and the first step's torch.compile, which takes minutes on a large model
    hang_timeout_startup_s: float = 1800.0
    # one checkpoint save (or the wait for one in flight): a synchronous 70B save (~0.8 TB of weights
    # and optimizer state) at ~1 GB/s of shared-filesystem bandwidth takes ~13 min; raise it for slower
    # storage
    hang_timeout_checkpoint_s: float = 1800.0
    # one validation pass: eval.batches forward-only batches, plus the eval-mode recompile under compile
    hang_timeout_eval_s: float = 1800.0
    # the HF export: gather the full model to rank 0 and write its safetensors (~280 GB for 70B in fp32)
    hang_timeout_export_s: float = 1800.0
    # tensor-parallel degree on the mesh dp_replicate x dp_shard x tp (innermost: keep it within a node)
    tp: int = 1
    # with tp > 1: shard norms and the residual stream along the sequence (Korthikanti et al. 2022)
    sequence_parallel: bool = False
    # with tp > 1: cross-entropy on vocabulary-sharded logits (no all-gather of the logits)
    loss_parallel: bool = False
    # context-parallel degree: each sequence split over cp ranks (mesh pp x dp_replicate x dp_shard x cp x
    # tp; FSDP2 shards over dp_shard x cp), attention over the keys and values all-gathered across cp
    cp: int = 1
    # pipeline-parallel degree: the outermost mesh dimension, pp x dp_replicate x dp_shard x tp; each
    # stage holds a slice of the decoder layers (embeddings on the first, final norm and head on the last)
    pp: int = 1
    # with pp > 1: the schedule torch.distributed.pipelining runs (harness/parallel/pipeline.py)
    pp_schedule: str = "1F1B"
    # with pp > 1: the decoder layers of each stage, first to last (null: balanced)
    pp_layers: list[int] | None = None
    # recompute the checkpointed blocks' activations in backward (none, ddp, fsdp)
    activation_checkpointing: bool = False
    # 1: every block (full); k: every k-th block (torchtitan's layer-selective)
    activation_checkpointing_every: int = 1


# the hang watchdog's timeout key (under ``parallel.``) of each phase of harness/phases.py
HANG_TIMEOUT_KEYS = {
    "startup": "hang_timeout_startup_s",
    "step": "hang_timeout_s",
    "checkpoint": "hang_timeout_checkpoint_s",
    "eval": "hang_timeout_eval_s",
    "export": "hang_timeout_export_s",
}


@dataclass
class NoneParallelConfig(ParallelConfig):
    """``parallel=none``: one process, one device."""

    name: str = "none"


@dataclass
class DDPConfig(ParallelConfig):
    """``parallel=ddp``: full replicas, gradients all-reduced once per step (mesh: dp_replicate)."""

    name: str = "ddp"


@dataclass
class FSDPConfig(ParallelConfig):
    """``parallel=fsdp``: FSDP2 ``fully_shard`` per block and on the root over ``dp_shard``;
    HSDP replicates over ``dp_replicate`` (e.g. nodes x GPUs per node)."""

    name: str = "fsdp"
    # replica groups; dp_shard = world_size / (dp_replicate x tp)
    dp_replicate: int = 1
    # ZeRO-3 style; False keeps the gathered parameters until backward (ZeRO-2 style)
    reshard_after_forward: bool = True
    # float32 | bfloat16; None: the model's dtype
    param_dtype: str | None = None
    # dtype of the gradient reduce-scatter; None: param_dtype
    reduce_dtype: str | None = None
    # keep the sharded parameters, gradients and optimizer state on the CPU (needs a GPU)
    cpu_offload: bool = False
    # false: reduce-scatter gradients once per step, on its last micro-batch (fewest bytes moved; between
    # micro-batches every rank holds the unsharded gradients of its whole model, 4 bytes per parameter in
    # fp32); true: after every micro-batch (gradients stay sharded; accumulation x the reduce-scatter
    # bytes). harness.plan shows both memory figures and recommends true when only it fits
    reduce_grads_every_micro_batch: bool = False


@dataclass
class DeepSpeedConfig(ParallelConfig):
    """``parallel=deepspeed``: ZeRO stage 0-3, the DeepSpeed JSON config generated from ours."""

    name: str = "deepspeed"
    # 0 | 1 | 2 | 3
    zero_stage: int = 2
    # ZeRO-Offload of the optimizer states to the CPU
    offload_optimizer: bool = False
    # ZeRO-3 parameter offload to the CPU
    offload_param: bool = False
    # DeepSpeed bf16 mode; None: on with CUDA, off on CPU
    bf16: bool | None = None
    # a JSON file path or a dict merged over the generated DeepSpeed config
    ds_config: Any = None


@dataclass
class WandbConfig:
    # auto (WANDB_MODE if set, else online with an API key, else offline) | online | offline | disabled
    mode: str = "auto"
    project: str = "harness"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    # console line every N steps (metrics.jsonl gets every step)
    every: int = 10
    # auto (a bar on a terminal) | on | off
    progress: str = "auto"
    # time and count collectives (harness.parallel.comm); False: the comm fields are 0/null
    comm_timing: bool = True
    # gather every rank's step timings every N steps: rank 0's record gets their min/median/max and the
    # slowest ranks (rank_stats, slowest_ranks); 0: off
    rank_stats_every: int = 1
    # every N steps (gathered then too) rank 0 appends the full per-rank vectors to
    # <run>/rank_stats.jsonl; 0: never (rank_stats_every=0 turns both off)
    rank_stats_full_every: int = 100
    # a rank whose busy time exceeds the median rank's by this factor ...
    straggler_factor: float = 1.2
    # ... for this many consecutive rank stats is a straggler (an event and a warning)
    straggler_window: int = 5
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    # steps between checkpoints; 0: only at the end
    every: int = 100
    # complete checkpoints kept; older ones are deleted
    keep_last: int = 2
    # auto | never | a checkpoint directory | a run directory
    resume: str = "auto"
    # save_pretrained model + tokenizer into <run>/hf at the end
    export_hf: bool = True
    # training resumes once the state is staged in CPU memory; the files are written in the
    # background (parallel=none|ddp|fsdp; deepspeed saves synchronously)
    async_save: bool = True


@dataclass
class ProfileConfig:
    """``profile.*``: torch.profiler traces of chosen steps (``harness/hooks/profiler.py``)."""

    # [first, last] steps to trace (one trace per step); None: none (unless every / SIGUSR2)
    steps: list[int] | None = None
    # trace `active` steps every N steps; 0: off
    every: int = 0
    # steps per window for `every` and for SIGUSR2 (kill -USR2 <rank 0 pid>)
    active: int = 2
    # untraced warm-up steps of the profiler before each window
    warmup: int = 1
    # record input shapes (bigger traces)
    record_shapes: bool = False
    # CUDA: record allocator history and write memory_snapshot_rank_<r>.pickle per window
    memory_snapshot: bool = False


@dataclass
class JobConfig:
    """The whole run (``configs/train.yaml`` composes onto this)."""

    seed: int = 1234
    run_name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the parallel=<name> group option's class (NoneParallelConfig, DDPConfig, FSDPConfig, DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


# parallel=<name> -> its schema (registered as parallel/<name>_schema in Hydra's ConfigStore).
PARALLEL_SCHEMAS: dict[str, type[ParallelConfig]] = {
    "none": NoneParallelConfig,
    "ddp": DDPConfig,
    "fsdp": FSDPConfig,
    "deepspeed": DeepSpeedConfig,
}


@dataclass(frozen=True)
class BatchSizes:
    """Full-size batch arithmetic: ``global = micro * accumulation * dp`` (sequences), where ``dp``
    is the number of data-parallel ranks (the world size while ``parallel.tp`` is 1)."""

    global_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
