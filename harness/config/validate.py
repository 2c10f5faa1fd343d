"""Checks that need only the config (no data, no model): each section checks itself, then the
few checks that involve several sections run in one short ordered function, :func:`validate`.

Every check raises :class:`~harness.errors.ConfigError` whose message names the offending key and
the fix; the schedule section reports all of its problems in one message.

The ground floor: this module imports the schema, :mod:`harness.errors` and the standard library,
never a part (tests/test_layers.py). The arithmetic on the config that the parts build on lives
here: the sources' keys (:func:`check_sources`, for :func:`harness.data.source_specs`), the mesh
degrees (:func:`mesh_degrees`, for ``ParallelDims``), the widths tensor parallelism splits
(:func:`check_tensor_parallel`, :func:`intermediate_size`). What needs a part -- the installed
``transformers`` for the document mask (:func:`harness.model.document_mask_path`) -- the callers
check after :func:`validate`, before anything is built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from harness.config.schema import (
    HANG_TIMEOUT_KEYS,
    PARALLEL_SCHEMAS,
    BatchSizes,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    FSDPConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ProfileConfig,
    ScheduleConfig,
    SourceConfig,
    TokenizerConfig,
    TrainingConfig,
)
from harness.errors import ConfigError

# section -> {key: allowed values}
CHOICES = {
    "model": {"arch": ("llama", "gpt2"), "attn_implementation": ("sdpa", "eager", "flash_attention_2")},
    "data": {"sample_by": ("document", "line", "paragraph"), "format": (None, "text", "json", "parquet")},
    "optim": {"name": ("adamw",)},
    "schedule": {"name": ("cosine", "constant", "wsd")},
    "train": {
        "device": ("auto", "cpu", "cuda"),
        "dtype": ("auto", "float32", "bfloat16"),
        "nonfinite": (None, "skip", "abort"),
    },
    "logging": {"progress": ("auto", "on", "off")},
}
# section -> keys that must be > 0 (None allowed where the schema allows it)
POSITIVE = {
    "model": (
        "hidden_size",
        "num_layers",
        "num_heads",
        "max_position_embeddings",
        "vocab_multiple",
        "rope_theta",
        "norm_eps",
        "init_std",
        "num_kv_heads",
        "intermediate_size",
        "vocab_size",
    ),
    "data": ("seq_len", "num_proc", "prepare_timeout_s"),
    "tokenizer": ("train_vocab_size",),
    "optim": ("lr",),
    "train": ("max_steps", "max_tokens", "stop_at_step", "peak_flops_per_device"),
    "eval": ("batches", "patience"),
    "logging": ("every",),
    "checkpoint": ("keep_last",),
}
# keys whose None is allowed (the > 0 message says so)
NULLABLE = {
    "model.num_kv_heads",
    "model.intermediate_size",
    "model.vocab_size",
    "train.stop_at_step",
    "train.peak_flops_per_device",
    "eval.patience",
}
# section -> keys that must be >= 1
AT_LEAST_ONE = {"train": ("max_consecutive_skips", "spike_window")}
# section -> keys that must be >= 0
NON_NEGATIVE = {
    "data": ("loader_workers",),
    "optim": ("weight_decay", "grad_clip", "eps"),
    "train": ("spike_factor",),
    "eval": ("every",),
    "checkpoint": ("every",),
}
NON_NEGATIVE_HINTS = {
    "spike_factor": " (0 disables loss-spike events)",
    "loader_workers": " (0: load in the training process)",
}


def check_rules(section: str, node: Any) -> None:
    """The table-driven checks of one section: choices, > 0, >= 0 and finite floats."""
    for key, allowed in CHOICES.get(section, {}).items():
        if getattr(node, key) not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None) + (
                " (or null)" if None in allowed else ""
            )
            raise ConfigError(f"{section}.{key}={getattr(node, key)!r} is not one of {shown}")
    for key in POSITIVE.get(section, ()):
        value = getattr(node, key)
        if value is not None and value <= 0:
            null = " (or null)" if f"{section}.{key}" in NULLABLE else ""
            raise ConfigError(f"{section}.{key}={value} must be > 0{null}")
    for key in AT_LEAST_ONE.get(section, ()):
        if getattr(node, key) < 1:
            raise ConfigError(f"{section}.{key}={getattr(node, key)} must be >= 1")
    for key in NON_NEGATIVE.get(section, ()):
        value = getattr(node, key)
        if value is not None and value < 0:
            raise ConfigError(f"{section}.{key}={value} must be >= 0{NON_NEGATIVE_HINTS.get(key, '')}")
    bad = _nonfinite_float(node, f"{section}.")
    if bad:
        raise ConfigError(f"{bad[0]}={bad[1]} must be a finite number")


def _nonfinite_float(node: Any, prefix: str) -> tuple[str, float] | None:
    """The first float field (dotted key, value) that is NaN or infinite."""
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{prefix}{f.name}", v
        if dataclasses.is_dataclass(v):
            found = _nonfinite_float(v, f"{prefix}{f.name}.")
            if found:
                return found
    return None


def check_model(m: ModelConfig) -> None:
    check_rules("model", m)
    if m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}"
        )
    if m.num_kv_heads is not None and m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={m.num_kv_heads}"
        )


def check_data(d: DataConfig) -> None:
    check_rules("data", d)
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    check_sources(d)


def check_sources(d: DataConfig) -> list[tuple[str, SourceConfig]]:
    """The sources of ``data.sources`` checked, in order, as ``(name, SourceConfig)``; ``[]`` for
    ``data.path`` alone (``data.sources`` null). :func:`harness.data.source_specs` builds on it.

    Raises:
        ConfigError: ``data.sources`` not a mapping or empty; a source that is not a mapping of
            :class:`SourceConfig` keys, without a path, with a weight that is not a finite number
            > 0, or with a format / sample_by outside ``CHOICES["data"]`` (naming the source).
    """
    if d.sources is None:
        return []
    if not isinstance(d.sources, dict):
        raise ConfigError(f"data.sources={d.sources!r} must map source names to {{path: ..., weight: ...}}")
    if not d.sources:
        raise ConfigError(
            "data.sources={} names no source: give at least one, or data.sources=null for data.path"
        )
    return [(str(name), _check_source(f"data.sources.{name}", src)) for name, src in d.sources.items()]


def _check_source(key: str, src: Any) -> SourceConfig:
    keys = [f.name for f in dataclasses.fields(SourceConfig)]
    if not isinstance(src, dict):
        raise ConfigError(f"{key}={src!r} must be a mapping with the keys {', '.join(keys)}")
    unknown = [k for k in src if k not in keys]
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (a source has {', '.join(keys)})")
    src = SourceConfig(**src)
    if src.path in (None, "", []):
        raise ConfigError(f"{key}.path is not set: give the source's file, glob, directory or list")
    if isinstance(src.weight, bool) or not isinstance(src.weight, (int, float)) or not src.weight > 0:
        raise ConfigError(f"{key}.weight={src.weight!r} must be a number > 0 (the weights are normalized)")
    if not math.isfinite(src.weight):
        raise ConfigError(f"{key}.weight={src.weight!r} must be a finite number > 0")
    for k, allowed in CHOICES["data"].items():  # the same choices as data.format / data.sample_by
        if getattr(src, k) is not None and getattr(src, k) not in allowed:
            choices = ", ".join(str(a) for a in allowed if a is not None)
            raise ConfigError(f"{key}.{k}={getattr(src, k)!r} is not one of {choices}")
    return src


def check_tokenizer(t: TokenizerConfig) -> None:
    check_rules("tokenizer", t)
    if t.train_vocab_size < 257:
        raise ConfigError(
            f"tokenizer.train_vocab_size={t.train_vocab_size} must be >= 257 (256 byte symbols + "
            "<|endoftext|>)"
        )


def check_optim(o: OptimConfig) -> None:
    check_rules("optim", o)
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")


def check_schedule(s: ScheduleConfig, lr: float | None = None) -> None:
    """All of the schedule's problems in one message, ``min_lr`` against the peak ``lr`` (``optim.lr``)
    among them (ramp sizes are checked in :func:`validate`)."""
    check_rules("schedule", s)
    bw = s.batch_warmup
    problems = [
        f"schedule.{k}={v} must be >= 0"
        for k, v in (("warmup_steps", s.warmup_steps), ("min_lr", s.min_lr), ("batch_warmup.steps", bw.steps))
        if v < 0
    ]
    if not 0.0 <= s.decay_fraction <= 1.0:
        problems.append(f"schedule.decay_fraction={s.decay_fraction} must be in [0, 1]")
    if bw.tokens is not None and bw.tokens <= 0:
        problems.append(f"schedule.batch_warmup.tokens={bw.tokens} must be > 0 (or null)")
    if bw.increment is not None and bw.increment <= 0:
        problems.append(
            f"schedule.batch_warmup.increment={bw.increment} must be a positive number of sequences"
        )
    if lr is not None and s.min_lr > lr:
        problems.append(f"schedule.min_lr={s.min_lr} is larger than optim.lr={lr}")
    if bw.tokens is not None and bw.steps:
        problems.append(
            f"schedule.batch_warmup.tokens={bw.tokens} and schedule.batch_warmup.steps={bw.steps} are "
            "both set; give one ramp length (schedule.batch_warmup.steps=0 to ramp over tokens)"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def check_training(t: TrainingConfig) -> None:
    check_rules("train", t)
    if (t.max_steps is None) == (t.max_tokens is None):
        raise ConfigError(
            "set exactly one budget: train.max_steps or train.max_tokens "
            f"(got max_steps={t.max_steps}, max_tokens={t.max_tokens}; with max_tokens add "
            "train.max_steps=null)"
        )
    for key, limit in (("max_steps", 10**9), ("max_tokens", 10**16)):
        value = getattr(t, key)
        if value is not None and value > limit:
            raise ConfigError(f"train.{key}={value} is beyond {limit:.0e}; is a digit too many?")


def check_parallel(p: ParallelConfig) -> None:
    """The keys every backend has, then the chosen backend's own (``BACKEND_CHECKS``)."""
    schema = PARALLEL_SCHEMAS.get(p.name)
    if schema is None:
        raise ConfigError(f"parallel.name={p.name!r} is not one of {', '.join(PARALLEL_SCHEMAS)}")
    if type(p) is not schema:
        raise ConfigError(
            f"parallel.name={p.name} does not match the parallel config group; choose the backend "
            f"with parallel={p.name}, not parallel.name"
        )
    if not (math.isfinite(p.timeout_s) and p.timeout_s > 0):
        raise ConfigError(f"parallel.timeout_s={p.timeout_s} must be a finite number of seconds > 0")
    if p.hang_timeout_s is not None and not (math.isfinite(p.hang_timeout_s) and p.hang_timeout_s > 0):
        raise ConfigError(
            f"parallel.hang_timeout_s={p.hang_timeout_s} must be a finite number of seconds > 0 (or null: "
            "automatic)"
        )
    for phase, key in HANG_TIMEOUT_KEYS.items():
        value = getattr(p, key)
        if phase != "step" and not (value > 0 and math.isfinite(value)):
            raise ConfigError(
                f"parallel.{key}={value} must be a finite number of seconds > 0 (the hang watchdog's "
                f"timeout of the {phase} phase)"
            )
    if p.activation_checkpointing_every < 1:
        raise ConfigError(
            f"parallel.activation_checkpointing_every={p.activation_checkpointing_every} must be "
            ">= 1 (1: every block; k: every k-th block)"
        )
    if p.tp < 1:
        raise ConfigError(f"parallel.tp={p.tp} must be >= 1 (1: no tensor parallelism)")
    for key in ("sequence_parallel", "loss_parallel"):
        if getattr(p, key) and p.tp == 1:
            raise ConfigError(f"parallel.{key}=true needs parallel.tp > 1 (it splits work over the tp ranks)")
    BACKEND_CHECKS.get(type(p), lambda _: None)(p)


def _check_fsdp(p: FSDPConfig) -> None:
    for key in ("param_dtype", "reduce_dtype"):
        if getattr(p, key) not in (None, "float32", "bfloat16"):
            raise ConfigError(f"parallel.{key}={getattr(p, key)!r} is not one of float32, bfloat16 (or null)")
    if p.dp_replicate < 1:
        raise ConfigError(f"parallel.dp_replicate={p.dp_replicate} must be >= 1")


def _check_deepspeed(p: DeepSpeedConfig) -> None:
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not one of 0, 1, 2, 3")
    if p.offload_param and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_param needs parallel.zero_stage=3 (got {p.zero_stage})")
    if p.activation_checkpointing:
        raise ConfigError(
            "parallel.activation_checkpointing is for ddp/fsdp/none; with deepspeed use its own "
            "activation_checkpointing section in parallel.ds_config"
        )


BACKEND_CHECKS = {FSDPConfig: _check_fsdp, DeepSpeedConfig: _check_deepspeed}


def check_eval(e: EvalConfig) -> None:
    check_rules("eval", e)


def check_logging(g: LoggingConfig) -> None:
    check_rules("logging", g)
    if g.rank_stats_every < 0:
        raise ConfigError(f"logging.rank_stats_every={g.rank_stats_every} must be >= 0 (0: off)")
    if g.rank_stats_full_every < 0:
        raise ConfigError(f"logging.rank_stats_full_every={g.rank_stats_full_every} must be >= 0 (0: never)")
    if not g.straggler_factor > 1.0:
        raise ConfigError(
            f"logging.straggler_factor={g.straggler_factor} must be > 1 (a ratio to the median rank)"
        )
    if g.straggler_window < 1:
        raise ConfigError(f"logging.straggler_window={g.straggler_window} must be >= 1")
    if g.wandb.mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(
            f"logging.wandb.mode={g.wandb.mode!r} is not one of auto, online, offline, disabled"
        )


def check_checkpoint(c: CheckpointConfig) -> None:
    check_rules("checkpoint", c)
    if not isinstance(c.async_save, bool):
        raise ConfigError(f"checkpoint.async_save={c.async_save!r} must be true or false")


def check_profile(p: ProfileConfig) -> None:
    if p.steps is not None:
        if len(p.steps) != 2 or not 1 <= p.steps[0] <= p.steps[1]:
            raise ConfigError(f"profile.steps={list(p.steps)} must be [first, last] with 1 <= first <= last")
        if p.every:
            raise ConfigError("profile.steps and profile.every are exclusive: set one of them")
    if p.every < 0:
        raise ConfigError(f"profile.every={p.every} must be >= 0 (0: off)")
    if p.active < 1:
        raise ConfigError(f"profile.active={p.active} must be >= 1")
    if p.warmup < 0:
        raise ConfigError(f"profile.warmup={p.warmup} must be >= 0")
    if p.every and p.every < p.active + p.warmup:
        raise ConfigError(
            f"profile.every={p.every} must be >= profile.active + profile.warmup = {p.active + p.warmup}"
        )


SECTION_CHECKS = {
    "model": check_model,
    "data": check_data,
    "tokenizer": check_tokenizer,
    "optim": check_optim,
    "schedule": check_schedule,
    "train": check_training,
    "eval": check_eval,
    "parallel": check_parallel,
    "logging": check_logging,
    "checkpoint": check_checkpoint,
    "profile": check_profile,
}


def intermediate_size(model: ModelConfig) -> int:
    """MLP width: as configured, else 4*hidden (GPT-2) or 8/3*hidden rounded up to 64 (LLaMA)."""
    if model.intermediate_size is not None:
        return model.intermediate_size
    if model.arch == "gpt2":
        return 4 * model.hidden_size
    return (int(8 * model.hidden_size / 3) + 63) // 64 * 64


def check_tensor_parallel(model: ModelConfig, tp: int, backend: str) -> None:
    """Refuse a ``tp`` the model or the backend cannot run (:mod:`harness.parallel.tensor` splits
    heads, kv heads and MLP columns over ``tp``), before anything is built.

    Raises:
        ConfigError: ``tp > 1`` with a backend other than fsdp, a GPT-2 model (fused ``c_attn``
            Conv1D projections: no column-wise split of q/k/v), or head, kv-head or MLP widths not
            divisible by ``tp``.
    """
    if tp == 1:
        return
    if backend != "fsdp":
        raise ConfigError(
            f"parallel.tp={tp} needs parallel=fsdp (FSDP2 over dp_shard x tensor parallel over tp); "
            f"parallel={backend} runs data parallelism only"
        )
    if model.arch != "llama":
        raise ConfigError(
            f"parallel.tp={tp}: tensor parallelism supports Llama-style models (model.arch=llama); "
            f"model.arch={model.arch} fuses q/k/v into one Conv1D (c_attn) that cannot be split by heads"
        )
    widths = {
        "model.num_heads": model.num_heads,
        "model.num_kv_heads": model.num_kv_heads or model.num_heads,
        "model.intermediate_size": intermediate_size(model),
    }
    for key, value in widths.items():
        if value % tp:
            raise ConfigError(f"{key}={value} is not divisible by parallel.tp={tp} (each rank holds 1/tp)")


def resolve_batch_sizes(train: TrainingConfig, world_size: int, label: str = "world_size") -> BatchSizes:
    """Derive the missing one of global/micro/accumulation from the two given, at ``world_size``
    data-parallel ranks (``label`` names them in the messages).

    Raises:
        ConfigError: fewer than two given, a non-positive value, or values whose product does not
            match (the message shows the arithmetic).
    """
    g, m, k = train.global_batch_size, train.micro_batch_size, train.gradient_accumulation_steps
    for key, v in (("global_batch_size", g), ("micro_batch_size", m), ("gradient_accumulation_steps", k)):
        if v is not None and v <= 0:
            raise ConfigError(f"train.{key}={v} must be a positive integer")
    if sum(v is not None for v in (g, m, k)) < 2:
        raise ConfigError(
            "set two of train.global_batch_size, train.micro_batch_size, train.gradient_accumulation_steps "
            f"(got global={g}, micro={m}, accumulation={k})"
        )
    w = world_size
    if g is None:
        g = m * k * w
    elif m is None:
        if g % (k * w):
            raise ConfigError(
                f"train.global_batch_size={g} is not divisible by gradient_accumulation_steps={k} x "
                f"{label}={w} = {k * w}; change one of them"
            )
        m = g // (k * w)
    elif k is None:
        if g % (m * w):
            raise ConfigError(
                f"train.global_batch_size={g} is not divisible by micro_batch_size={m} x "
                f"{label}={w} = {m * w}; change one of them or set train.gradient_accumulation_steps"
            )
        k = g // (m * w)
    elif g != m * k * w:
        raise ConfigError(
            f"train.global_batch_size={g} != micro_batch_size={m} x gradient_accumulation_steps={k} x "
            f"{label}={w} = {m * k * w}; set one of them to null to derive it"
        )
    return BatchSizes(g, m, k, w)


def check_batch_ramp(schedule: ScheduleConfig, batch: BatchSizes, label: str = "world_size") -> None:
    """The ramp goes from its start to the full batch in whole increments, and every batch size of it
    splits evenly over the data-parallel ranks (``batch.world_size``; ``label`` names them). The last
    micro-batch of a ramp step may be shorter than ``micro_batch_size`` (the step's sequences are
    spread evenly over the ranks), so the ramp is the same at every world size that can run it.

    Raises:
        ConfigError: naming the key and, for a world size that cannot realize a batch, that batch.
    """
    bw = schedule.batch_warmup
    start, full, inc = bw.start_global_batch_size, batch.global_batch_size, bw.increment
    if start is None or (bw.steps == 0 and bw.tokens is None):
        return  # no ramp
    if not 0 < start <= full:
        raise ConfigError(
            f"schedule.batch_warmup.start_global_batch_size={start} must be in "
            f"[1, train.global_batch_size={full}]"
        )
    if inc is None:
        raise ConfigError(
            f"schedule.batch_warmup.increment is required with a batch ramp (start_global_batch_size="
            f"{start}): the sequences added per stage, e.g. schedule.batch_warmup.increment={full - start}"
        )
    if (full - start) % inc:
        raise ConfigError(
            f"schedule.batch_warmup.start_global_batch_size={start} does not reach train.global_batch_size="
            f"{full} in whole increments of schedule.batch_warmup.increment={inc}; change one of them"
        )
    dp = batch.world_size
    sizes = [start + k * inc for k in range((full - start) // inc + 1)]
    bad = next((b for b in sizes if b % dp), None)
    if bad is not None:
        raise ConfigError(
            f"the batch ramp {', '.join(map(str, sizes))} (schedule.batch_warmup) has a global batch of "
            f"{bad} sequences, which {label}={dp} cannot split evenly; make start_global_batch_size and "
            f"increment multiples of {dp}, or run on a {label} that divides them"
        )


# parallel.pp_schedule -> stages per rank (torch.distributed.pipelining's schedule classes)
PP_SCHEDULES = {
    "GPipe": 1,
    "1F1B": 1,
    "Interleaved1F1B": 2,
    "LoopedBFS": 2,
    "InterleavedZeroBubble": 2,
    "ZBVZeroBubble": 2,
    "DualPipeV": 2,
}


def _ramp_sizes(schedule: ScheduleConfig, batch: BatchSizes) -> list[int]:
    """Every global batch size of the run (sequences): the ramp's stages, then the full batch."""
    bw = schedule.batch_warmup
    start, full, inc = bw.start_global_batch_size, batch.global_batch_size, bw.increment
    if start is None or (bw.steps == 0 and bw.tokens is None) or not inc:
        return [full]
    return [start + k * inc for k in range((full - start) // inc + 1)]


def check_pipeline(cfg: JobConfig, batch: BatchSizes) -> None:
    """Refuse a pipeline-parallel layout (``parallel.pp > 1``) that cannot run, before anything is
    built: the backend, the schedule, more stages than decoder layers, ``parallel.pp_layers`` that do
    not cover the layers, tied embeddings (the first and last stages would each hold the matrix), the
    document mask, and a step whose micro-batches the schedule cannot run (each micro-batch full, as
    many as the schedule needs: 1F1B at least one per stage).

    Raises:
        ConfigError: naming the key.
    """
    par, model = cfg.parallel, cfg.model
    if par.pp < 1:
        raise ConfigError(f"parallel.pp={par.pp} must be >= 1")
    if par.pp == 1:
        if par.pp_layers is not None:
            raise ConfigError("parallel.pp_layers needs parallel.pp > 1 (the layers of each pipeline stage)")
        return
    if par.name != "fsdp":
        what = "is one process" if par.name == "none" else "runs data parallelism only"
        raise ConfigError(
            f"parallel.pp={par.pp} needs parallel=fsdp (pipeline stages x FSDP2 over dp_shard x tp); "
            f"parallel={par.name} {what}"
        )
    if par.pp_schedule not in PP_SCHEDULES:
        raise ConfigError(
            f"parallel.pp_schedule={par.pp_schedule!r} must be one of {', '.join(PP_SCHEDULES)}"
        )
    stages = par.pp * PP_SCHEDULES[par.pp_schedule]
    if model.arch != "llama":
        raise ConfigError(
            f"parallel.pp={par.pp}: pipeline stages are cut from Llama-style models (model.arch=llama)"
        )
    if stages > model.num_layers:
        raise ConfigError(
            f"parallel.pp={par.pp} with parallel.pp_schedule={par.pp_schedule} makes {stages} stages, more "
            f"than model.num_layers={model.num_layers} decoder layers"
        )
    if par.pp_layers is not None and (
        len(par.pp_layers) != stages or min(par.pp_layers) < 1 or sum(par.pp_layers) != model.num_layers
    ):
        raise ConfigError(
            f"parallel.pp_layers={list(par.pp_layers)} must give each of the {stages} stages at least one "
            f"layer and {model.num_layers} in all (model.num_layers)"
        )
    if model.tie_word_embeddings:
        raise ConfigError(
            f"parallel.pp={par.pp}: tied embeddings would live on the first and the last stage; set "
            "model.tie_word_embeddings=false"
        )
    if cfg.data.document_mask:
        raise ConfigError(
            f"parallel.pp={par.pp} does not run data.document_mask yet; set data.document_mask=false"
        )
    if cfg.train.compile and par.pp_schedule in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"):
        raise ConfigError(
            f"parallel.pp_schedule={par.pp_schedule} splits each backward into its input and weight "
            "gradients, which fails under torch.compile (pytorch#161904); set train.compile=false or "
            "choose GPipe, 1F1B, Interleaved1F1B or LoopedBFS"
        )
    for key in ("sequence_parallel", "loss_parallel"):
        if getattr(par, key):
            raise ConfigError(
                f"parallel.pp={par.pp} with parallel.{key}=true is not supported yet (not composed with "
                f"pipeline stages); set parallel.{key}=false"
            )
    dp, micro = batch.world_size, batch.micro_batch_size
    for size in _ramp_sizes(cfg.schedule, batch):
        per_rank = size // dp
        count = per_rank // micro
        if per_rank % micro or count < stages:
            key = (
                "train.global_batch_size"
                if size == batch.global_batch_size
                else "schedule.batch_warmup.start_global_batch_size"  # the ramp's first failing size
            )
            raise ConfigError(
                f"parallel.pp={par.pp}: a step of {size} sequences ({key}) gives each "
                f"data-parallel rank {per_rank}, which must be whole micro-batches of "
                f"train.micro_batch_size={micro}, at least {stages} of them (one per pipeline stage, "
                f"parallel.pp_schedule={par.pp_schedule}); set train.micro_batch_size to a divisor of "
                f"{per_rank} no larger than {max(per_rank // stages, 1)}, or raise {key}"
            )
        rounds = max(1, count // par.pp)
        if par.pp_schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and count % rounds:
            raise ConfigError(
                f"parallel.pp_schedule={par.pp_schedule}: a step of {size} sequences makes {count} "
                f"micro-batches per data-parallel rank, run in {count} // parallel.pp={par.pp} = {rounds} "
                f"rounds, and {count} is not a multiple of {rounds}; choose batch sizes and "
                "train.micro_batch_size that give a multiple of parallel.pp micro-batches"
            )


def mesh_degrees(parallel: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """The mesh ``(dp_replicate, dp_shard, tp)`` (inside ``parallel.pp`` stages) the backend
    ``parallel.name`` uses at ``world_size`` ranks (:meth:`harness.parallel.dims.ParallelDims.from_config`
    builds on it): DDP replicates over every data-parallel rank, FSDP shards over ``dp_shard``
    (replicas x shards), ZeRO shards over all.

    Raises:
        ConfigError: ``parallel.tp`` or ``parallel.dp_replicate`` (FSDP) does not divide the world size.
    """
    tp, pp, cp = parallel.tp, max(parallel.pp, 1), max(parallel.cp, 1)
    if world_size % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide world_size={world_size}")
    if world_size % (pp * cp * tp):
        split = f"parallel.pp={pp} x " + (f"parallel.cp={cp} x " if cp > 1 else "") + f"parallel.tp={tp}"
        raise ConfigError(
            f"{split} does not divide world_size={world_size} (launch a "
            f"multiple of {pp * cp * tp} processes, e.g. torchrun --nproc_per_node {pp * cp * tp})"
        )
    dp = world_size // (pp * cp * tp)
    if parallel.name == "ddp":
        return dp, 1, tp
    replicate = getattr(parallel, "dp_replicate", 1)
    if dp % replicate:
        others = [f"{k}={v}" for k, v in (("pp", pp), ("cp", cp), ("tp", tp)) if v > 1]
        raise ConfigError(
            f"parallel.dp_replicate={replicate} must divide world_size={world_size} (replicas x shards)"
            if not others
            else f"parallel.dp_replicate={replicate} must divide the data-parallel ranks world_size / "
            f"({' x '.join(others)}) = {world_size} / {pp * cp * tp} = {dp} (replicas x shards)"
        )
    return replicate, dp // replicate, tp


def validate(cfg: JobConfig, world_size: int = 1) -> BatchSizes:
    """Check everything that can be checked from the config alone (no data, no model): the top-level
    keys, each section, then the checks across sections, in this order. What needs a part (the
    document mask's ``transformers``) the caller checks next: see the module docstring.

    Returns:
        The full-size :class:`BatchSizes` at ``world_size`` processes.
    Raises:
        ConfigError: naming the first offending key and the fix.
    """
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32)")
    if not cfg.run_name or "/" in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(
            f"run_name={cfg.run_name!r} must be a non-empty name without '/' (it names runs/<run_name>)"
        )
    # the schedule's problems in one message, min_lr against the peak LR among them
    checks = {**SECTION_CHECKS, "schedule": functools.partial(check_schedule, lr=cfg.optim.lr)}
    for section, check in checks.items():
        check(getattr(cfg, section))
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}; lower data.seq_len or raise "
            "model.max_position_embeddings"
        )
    if cfg.train.nonfinite == "skip" and cfg.parallel.name == "deepspeed":
        raise ConfigError(
            "train.nonfinite=skip is not supported with parallel=deepspeed (the engine steps inside "
            "engine.step()); use train.nonfinite=abort or leave it null"
        )
    check_tensor_parallel(cfg.model, cfg.parallel.tp, cfg.parallel.name)
    dp_replicate, dp_shard, tp = mesh_degrees(cfg.parallel, world_size)
    pp, cp = max(cfg.parallel.pp, 1), max(cfg.parallel.cp, 1)
    split = " x ".join(f"{k}={v}" for k, v in (("pp", pp), ("cp", cp), ("tp", tp)) if v > 1)
    label = "world_size" if pp * cp * tp == 1 else f"data-parallel ranks (world_size / {split})"
    batch = resolve_batch_sizes(cfg.train, dp_replicate * dp_shard, label)
    check_batch_ramp(cfg.schedule, batch, label)
    check_pipeline(cfg, batch)
    check_context(cfg)
    return batch


def check_context(cfg: JobConfig) -> None:
    """Refuse a context-parallel layout (``parallel.cp > 1``) that cannot run, before anything is built:
    a backend other than FSDP2, a model other than Llama-style, a sequence that does not split into
    ``2 cp`` equal chunks, and what does not compose with it yet (the document mask, sequence and loss
    parallelism, an attention other than SDPA).

    Raises:
        ConfigError: naming the key.
    """
    par, cp = cfg.parallel, cfg.parallel.cp
    if cp < 1:
        raise ConfigError(f"parallel.cp={cp} must be >= 1")
    if cp == 1:
        return
    if par.name != "fsdp":
        raise ConfigError(
            f"parallel.cp={cp} needs parallel=fsdp (FSDP2 shards over dp_shard x cp and sums the cp ranks' "
            f"gradients); parallel={par.name} does not"
        )
    if cfg.model.arch != "llama":
        raise ConfigError(f"parallel.cp={cp}: context parallelism runs Llama-style models (model.arch=llama)")
    if cfg.data.seq_len % (2 * cp):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must be a multiple of 2 x parallel.cp = {2 * cp} (each cp rank "
            "holds two equal chunks of every sequence, a head and its mirrored tail)"
        )
    for key, on in (
        ("data.document_mask", cfg.data.document_mask),
        ("parallel.sequence_parallel", par.sequence_parallel),
        ("parallel.loss_parallel", par.loss_parallel),
    ):
        if on:
            raise ConfigError(f"parallel.cp={cp} with {key}=true is not supported yet; set {key}=false")
    if cfg.model.attn_implementation != "sdpa":
        raise ConfigError(
            f"parallel.cp={cp} runs its own attention (SDPA over the all-gathered keys and values), not "
            f"model.attn_implementation={cfg.model.attn_implementation}; set model.attn_implementation=sdpa"
        )
