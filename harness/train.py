"""Entry point: ``python -m harness.train [hydra overrides]`` (console script ``harness-train``).

Builds the parts in dependency order -- config checks, data, iteration plan, checkpoint
lookup (all before any model exists, so bad input fails fast), then model, backend,
optimizer and scheduler -- and hands them to :func:`harness.loop.train`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass

import hydra
import torch
import transformers
from omegaconf import OmegaConf

from harness import checkpoint as ckpt
from harness.config import (
    CONFIG_DIR,
    BatchSizes,
    TrainConfig,
    check_schedule_fits,
    compose_checked,
    to_object,
    validate,  # fmt: skip
)
from harness.data import DataBundle, StepLoader, build_data, validation_batches
from harness.data.loader import PrefetchLoader
from harness.data.tokenizer import tokenizer_fingerprint
from harness.dist import DistEnv, announce_error, read_env
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.exits import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, report_exit
from harness.loop import LoopParts, StopSignal, TrainState
from harness.loop import train as train_loop
from harness.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink, device_peak_flops, step_log
from harness.model import ModelStats, build_model, model_stats, resolve_vocab_size
from harness.parallel import Backend, build_backend
from harness.parallel.base import prepare_blocks
from harness.plan import iteration_plan
from harness.rundir import RunDirLock, open_log_file, record_invocation, write_hydra_dir
from harness.schedule import DataPosition, IterationPlan, LRSchedule

log = logging.getLogger("harness")
# DeepSpeed still calls the collectives torch 2.13 renamed; DDP warns about broadcast_buffers once per rank.
warnings.filterwarnings(
    "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
)
warnings.filterwarnings("ignore", message=r".*broadcast_buffers.*", category=FutureWarning)


@dataclass
class Prepared:
    """Everything decided before a model exists: checked config, backend, data, plan, resume point."""

    cfg: TrainConfig
    run_dir: str
    resolved: dict  # the config with interpolations resolved (saved in checkpoints and wandb)
    env: DistEnv
    batch: BatchSizes
    backend: Backend
    data: DataBundle
    vocab_size: int
    plan: IterationPlan
    max_steps: int
    schedule: LRSchedule
    stats: ModelStats
    model_key: dict  # model shape, compared on resume
    data_key: dict  # corpus/tokenizer identity, compared on resume
    resume_from: str | None
    resume_state: dict | None  # the trainer_state.json of resume_from

    @property
    def start_step(self) -> int:
        return self.resume_state["step"] if self.resume_state else 0

    @property
    def will_train(self) -> bool:
        """False when the checkpoint already ends the run (budget reached or stopped early)."""
        done = self.resume_state and self.resume_state.get("stopped_early")
        return self.start_step < self.max_steps and not done

    def planned_tokens(self) -> int:
        """Tokens at the end of the budget, continuing from the resume point (its world size may differ)."""
        st = self.resume_state
        if not st:
            return self.plan.total_tokens(self.max_steps)
        position = DataPosition(st["epoch"], st["offset"])
        return self.plan.total_tokens(self.max_steps, st["step"], position, st["tokens_total"])

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")


def run(cfg, run_dir: str, overrides: list[str] | None = None) -> TrainState:
    """Train as ``cfg`` says, writing everything into ``run_dir``; returns the final state.

    Nothing is written into ``run_dir`` until the config, the data and any checkpoint to resume
    from have been checked and rank 0 holds the run directory's lock (:mod:`harness.rundir`); then
    the invocation is recorded in ``invocations.jsonl`` and ``train.log``, and ``.hydra/`` is
    written only when this invocation trains.

    Raises:
        HarnessError: a config, data or checkpoint problem (raised before the model is built
            whenever it can be detected from the config, the data or the checkpoint metadata),
            or a run directory held by another live process.
    """
    composed = OmegaConf.structured(cfg) if isinstance(cfg, TrainConfig) else cfg
    p = prepare(composed, run_dir)
    lock = _lock_run_dir(p)
    log_file = None
    outcome = "failed"
    try:
        if p.env.is_main:
            log_file = open_log_file(run_dir, log, step_log)
            record_invocation(run_dir, "start", overrides=list(overrides or []), world_size=p.env.world_size,
                              parallel=p.cfg.parallel.name, resume_from=p.resume_from, start_step=p.start_step,
                              max_steps=p.max_steps, trains=p.will_train, config=p.resolved)  # fmt: skip
            if p.will_train:
                write_hydra_dir(run_dir, composed, p.resolved, overrides or [])
        state = _train(p)
        outcome = state.stop_signal or (
            "stopped" if state.step < p.max_steps and not state.stopped_early else "done"
        )
        return state
    except Exception as e:
        _report_failure(p, e)
        outcome = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        raise
    except KeyboardInterrupt:
        outcome = "interrupted at once (second Ctrl-C)"
        raise
    finally:
        if lock is not None:
            record_invocation(run_dir, "end", outcome=outcome)
            lock.release()
        if log_file is not None:
            log.removeHandler(log_file)
            step_log.removeHandler(log_file)
            log_file.close()


def _lock_run_dir(p: Prepared) -> RunDirLock | None:
    """Rank 0 takes the run directory's lock; every rank raises the same error when it cannot."""
    lock, error = None, None
    if p.env.is_main:
        try:
            lock = RunDirLock(p.run_dir).acquire()
        except ConfigError as e:
            error = e
    if p.env.world_size > 1:
        refused = p.backend.all_reduce_sum(torch.tensor(float(error is not None), device=p.env.device))
        if error is None and refused.item() > 0:
            error = ConfigError(f"rank 0 could not lock the run directory {p.run_dir} (see its error)")
    if error is not None:
        raise error
    return lock


def _report_failure(p: Prepared, e: Exception) -> None:
    """Every rank records its error in ``<run>/failures/rank_<r>.json``; rank 0 then logs the first
    one (by time) once in ``train.log``, so the root cause of a multi-rank failure is in one place
    (the other ranks usually fail afterwards in a collective with the dead one)."""
    import time
    import traceback

    directory = os.path.join(p.run_dir, "failures")
    record = {"rank": p.env.rank, "time": time.time(), "error": f"{type(e).__name__}: {e}",
              "traceback": traceback.format_exc()}  # fmt: skip
    with contextlib.suppress(OSError):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"rank_{p.env.rank}.json"), "w") as f:
            json.dump(record, f)
    if not p.env.is_main:
        return
    records = [record]
    deadline = time.time() + min(10.0, p.cfg.parallel.timeout_s)
    while p.env.world_size > 1 and time.time() < deadline:  # give the others a moment to report theirs
        with contextlib.suppress(OSError, ValueError):
            records = [json.load(open(os.path.join(directory, n))) for n in os.listdir(directory)]
        if len(records) >= p.env.world_size:
            break
        time.sleep(0.2)
    first = min(records, key=lambda r: r["time"])
    if isinstance(e, HarnessError) and first["rank"] == p.env.rank:
        return  # reported as one error line by the caller
    log.error(
        "training failed: rank %d raised first: %s\n%s", first["rank"], first["error"], first["traceback"]
    )
    if first["rank"] != p.env.rank:
        log.error("rank %d stopped because of it: %s", p.env.rank, " ".join(record["error"].split())[:300])


def prepare(cfg, run_dir: str) -> Prepared:
    """Check the config, start the backend (process group), load the data, plan the iterations and
    find the checkpoint to resume from -- all before any model is built.

    Raises:
        HarnessError: the first problem found, naming the key or file.
    """
    if isinstance(cfg, TrainConfig):
        cfg = OmegaConf.structured(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    cfg: TrainConfig = to_object(cfg)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(
            f"hydra.run.dir={run_dir!r} is a file, not a directory; choose another run directory"
        )
    env = read_env(cfg.train.device)
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)  # rank 0 logs; others only warn
    batch = validate(cfg, env.world_size)
    backend = build_backend(cfg, env, batch)
    data = build_data(cfg.data, cfg.tokenizer, batch.global_batch_size, need_val=cfg.eval.every > 0)
    vocab_size = resolve_vocab_size(cfg.model, len(data.tokenizer))
    plan, max_steps = iteration_plan(cfg, batch, len(data.train))  # the same arithmetic as harness.plan
    check_schedule_fits(cfg, max_steps)
    schedule = LRSchedule(cfg.schedule.name, cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.warmup_steps,
                          max_steps, cfg.schedule.decay_fraction)  # fmt: skip
    model_key = {**asdict(cfg.model), "vocab_size": vocab_size, "name": None}
    data_key = {"tokens": data.store.num_tokens, "tokenizer": tokenizer_fingerprint(data.tokenizer),
                "seq_len": cfg.data.seq_len, "val_fraction": cfg.data.val_fraction}  # fmt: skip
    resume_from = _find_resume(cfg.checkpoint.resume, os.path.join(run_dir, "checkpoints"), model_key, data_key,
                               cfg.parallel.name, env.world_size)  # fmt: skip
    resume_state = ckpt.read_state(resume_from) if resume_from else None
    return Prepared(cfg, run_dir, resolved, env, batch, backend, data, vocab_size, plan, max_steps, schedule,
                    model_stats(cfg.model, vocab_size, cfg.data.seq_len), model_key, data_key, resume_from,
                    resume_state)  # fmt: skip


def _train(p: Prepared) -> TrainState:
    """Build the model, optimizer and scheduler; restore; run the loop; export."""
    cfg, env, backend, data, batch = p.cfg, p.env, p.backend, p.data, p.batch
    if env.is_main:
        log.info("data: %s: %s tokens -> %d train sequences of %d (+1) tokens, %d validation",
                 data.store.meta.get("source", data.store.path), f"{data.store.num_tokens:,}", len(data.train),
                 cfg.data.seq_len, len(data.val) if data.val else 0)  # fmt: skip
        log.info("plan: %d steps, global batch %d (micro %d x accumulation %d x world %d), %d iterations/epoch, "
                 "%s tokens in total", p.max_steps, batch.global_batch_size, batch.micro_batch_size,
                 batch.gradient_accumulation_steps, env.world_size, p.plan.iterations_per_epoch(),
                 f"{p.planned_tokens():,}")  # fmt: skip

    model = build_model(cfg.model, p.vocab_size, cfg.seed, data.tokenizer.eos_token_id)
    prepare_blocks(model, cfg.parallel.activation_checkpointing, cfg.parallel.activation_checkpointing_every,
                   cfg.train.compile)  # fmt: skip
    backend.setup(model)
    optimizer = backend.build_optimizer(cfg.optim)  # after sharding; DeepSpeed wraps the model here
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: p.schedule.torch_lambda(i))
    peak_flops, peak_source = (
        (cfg.train.peak_flops_per_device, "train.peak_flops_per_device")
        if cfg.train.peak_flops_per_device
        else device_peak_flops(env.device)
    )
    if env.is_main:
        log.info("model: %s (%s), %s parameters (%s non-embedding), vocab %d, %.3g FLOPs/token; peak %.3g FLOP/s "
                 "(%s)", cfg.model.name, cfg.model.arch, f"{p.stats.params:,}",
                 f"{p.stats.non_embedding_params:,}", p.vocab_size, p.stats.flops_per_token, peak_flops,
                 peak_source)  # fmt: skip

    state = TrainState()
    if p.resume_from:
        state = _restore(p.resume_from, backend, scheduler, p.schedule, env.rank, cfg.optim)
        log.info(
            "resumed from %s at step %d (%s tokens)", p.resume_from, state.step, f"{state.tokens_total:,}"
        )
        changed = changed_schedule_keys(p.resume_state, p.resolved, p.max_steps)
        if changed and state.step < p.max_steps and env.is_main:
            log.warning("resuming with changed optimizer/schedule settings (%s): the new config's schedule applies "
                        "from step %d on (LR at step %d: %.4g)", ", ".join(changed), state.step + 1,
                        state.step + 1, p.schedule(state.step + 1))  # fmt: skip

    def save(st: TrainState) -> None:
        def write(directory: str) -> None:  # every rank: its model/optimizer part and its RNG state
            backend.save(directory)
            os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
            torch.save(_rng_state(), os.path.join(directory, "rng", f"rank_{env.rank}.pt"))
            if env.is_main:
                data.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))

        meta = {**st.to_dict(), "max_steps": p.max_steps, "scheduler": scheduler.state_dict(),
                "parallel": cfg.parallel.name, "world_size": env.world_size, "model": p.model_key,
                "data": p.data_key, "config": p.resolved}  # fmt: skip
        path = ckpt.save_checkpoint(p.ckpt_root, st.step, write, meta, cfg.checkpoint.keep_last, env.is_main,
                                    backend.barrier)  # fmt: skip
        log.info("checkpoint: %s", path)

    metrics = MetricsLogger(_sinks(p, state.step) if env.is_main and p.will_train else [])
    parts = LoopParts(
        backend=backend, model=backend.model, scheduler=scheduler,
        loader=_loader(p),
        val_batches=validation_batches(data.val, cfg.eval.batches, batch.micro_batch_size, env.rank, env.world_size)
        if data.val else [],
        plan=p.plan, max_steps=p.max_steps, grad_clip=cfg.optim.grad_clip, eval_every=cfg.eval.every,
        patience=cfg.eval.patience, checkpoint_every=cfg.checkpoint.every, stop_at_step=cfg.train.stop_at_step,
        flops_per_token=p.stats.flops_per_token, peak_flops=peak_flops, peak_source=peak_source,
        autocast_dtype=_autocast_dtype(cfg.train.dtype, env.device), metrics=metrics, save_checkpoint=save,
        nonfinite=cfg.train.nonfinite or ("abort" if cfg.parallel.name == "deepspeed" else "skip"),
        max_consecutive_skips=cfg.train.max_consecutive_skips, spike_factor=cfg.train.spike_factor,
        spike_window=cfg.train.spike_window,
    )  # fmt: skip
    try:
        if p.will_train:
            with StopSignal() as parts.stop_signal:
                state = train_loop(parts, state)
        else:
            log.warning("nothing to train: the checkpoint is at step %d and the budget is %d steps%s; the run "
                        "directory is left as it was", state.step, p.max_steps,
                        " (stopped early)" if state.stopped_early else "")  # fmt: skip
    finally:
        metrics.close()
    finished = state.step >= p.max_steps or state.stopped_early
    exported = os.path.isdir(os.path.join(p.run_dir, "hf"))
    if cfg.checkpoint.export_hf and finished and (p.will_train or not exported):
        _export(p)
    report_exit(env.rank, exit_status(state))  # for harness.launch.node under torchrun
    backend.close()
    return state


def _loader(p: Prepared) -> StepLoader | PrefetchLoader:
    """The step loader; with ``data.loader_workers`` > 0 (default 2 on CUDA), prefetched by worker processes."""
    loader = StepLoader(p.data.train, p.cfg.seed, p.batch.micro_batch_size, p.env.rank, p.env.world_size)
    workers = p.cfg.data.loader_workers
    if workers is None:
        workers = 2 if p.env.device.type == "cuda" else 0
    if workers == 0:
        return loader
    return PrefetchLoader(loader, p.plan, p.max_steps, workers, pin_memory=p.env.device.type == "cuda")


def _sinks(p: Prepared, start_step: int) -> list:
    """Rank 0's metric sinks: metrics.jsonl (cut back to ``start_step``), console, wandb."""
    path = os.path.join(p.run_dir, "metrics.jsonl")
    _truncate_metrics(path, start_step)
    sinks = [
        JsonlSink(path),
        ConsoleSink(p.max_steps, start_step, p.cfg.logging.every, p.cfg.logging.progress),
    ]
    w = p.cfg.logging.wandb
    if w.mode != "disabled":
        sinks.append(WandbSink(w.mode, w.project, w.entity, w.name or p.cfg.run_name, p.run_dir, p.resolved))
    return sinks


def _export(p: Prepared) -> None:
    """Gather the full model (collective under sharding) and save it in HF format on rank 0."""
    full = p.backend.full_state_dict()
    if not p.env.is_main:
        return
    transformers.utils.logging.disable_progress_bar()
    model = build_model(p.cfg.model, p.vocab_size, p.cfg.seed, p.data.tokenizer.eos_token_id, device="meta")
    model.load_state_dict(full, assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, t in model.named_parameters() if t.is_meta]
    if missing:
        raise CheckpointError(f"the gathered state dict lacks {missing[:3]}; cannot export")
    path = ckpt.export_hf(model, p.data.tokenizer, os.path.join(p.run_dir, "hf"))
    log.info("exported Hugging Face model and tokenizer to %s", path)


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_format(path: str, saved: dict, parallel: str, world_size: int) -> None:
    """A checkpoint's weights format must suit this backend (none: model.pt; ddp/fsdp: dcp/, any world size;
    deepspeed: its own files, only at the world size that wrote them)."""
    family = {"none": "none", "ddp": "dcp", "fsdp": "dcp", "deepspeed": "deepspeed"}
    was = saved.get("parallel", "none")
    if family.get(was) != family[parallel]:
        raise CheckpointError(
            f"checkpoint {path} was written by parallel={was}, which parallel={parallel} cannot load; resume with "
            f"parallel={was}, or export it (python -m harness.export {path} OUT) and start a new run from it"
        )
    if was == "deepspeed" and saved.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint {path} was written by DeepSpeed at world size {saved.get('world_size')}, and DeepSpeed "
            f"checkpoints resume only at that world size (now {world_size}); relaunch with that many processes, "
            f"or export it with python -m harness.export"
        )


def _find_resume(resume: str, ckpt_root: str, model_key: dict, data_key: dict, parallel: str = "none",
                 world_size: int = 1) -> str | None:  # fmt: skip
    """The checkpoint to resume from (or None), checked against this run's model and data.

    ``resume`` is ``auto`` (the newest complete checkpoint under ``ckpt_root``, if any), ``never``,
    a checkpoint directory, or a run directory (its newest checkpoint).

    Raises:
        ConfigError / CheckpointError: ``never`` over existing checkpoints, a path that is not a
            complete checkpoint, or a checkpoint of another model shape or corpus/tokenizer.
    """
    if resume == "never":
        existing = ckpt.list_checkpoints(ckpt_root)
        if existing:
            raise ConfigError(
                f"checkpoint.resume=never, but {ckpt_root} already holds checkpoints (up to step {existing[-1][0]}); "
                "set checkpoint.resume=auto to continue that run, or pick a new run_name / hydra.run.dir"
            )
        return None
    if resume == "auto":
        path = ckpt.latest_checkpoint(ckpt_root, check=True)  # a damaged newest one: the previous
        if path is None:
            damaged = ckpt.checkpoint_dirs(ckpt_root)
            if damaged:  # never silently start over on top of a run's history
                raise CheckpointError(
                    f"{ckpt_root} holds {len(damaged)} checkpoint(s) (newest {os.path.basename(damaged[-1])}) but "
                    "none is complete and intact (see the warnings); move them away to start over, or set "
                    "checkpoint.resume to a good checkpoint"
                )
            return None
    else:
        path = os.path.expanduser(resume)
        if os.path.isdir(os.path.join(path, "checkpoints")):  # a run directory
            path = ckpt.latest_checkpoint(os.path.join(path, "checkpoints"), check=True) or path
        if not ckpt.is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={resume!r} is not auto, never, or a complete checkpoint directory "
                "(runs/<run_name>/checkpoints/step_NNNNNNNN, or a run directory)"
            )
        problem = ckpt.verify(path)
        if problem:
            raise CheckpointError(
                f"checkpoint.resume: {path} is damaged ({problem}); choose another checkpoint"
            )
    ckpt.scan_pickles(path)  # before anything is unpickled
    with open(os.path.join(path, ckpt.STATE)) as f:
        saved = json.load(f)
    _check_format(path, saved, parallel, world_size)
    for section, now, fix in (("model", model_key, "the model config that wrote it"),
                              ("data", data_key, "the corpus, tokenizer and data.seq_len it was trained on")):  # fmt: skip
        before = saved.get(section, {})
        diff = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and k != "name"}
        if diff:
            shown = ", ".join(
                f"{section}.{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items())
            )
            raise CheckpointError(
                f"checkpoint {path} was written with a different {section} ({shown}); use a new run_name / "
                f"hydra.run.dir, or {fix}"
            )
    return path


def _restore(path: str, backend, scheduler, schedule: LRSchedule, rank: int, optim) -> TrainState:
    """Load model, optimizer, scheduler and RNG state; returns the train state.

    The checkpoint gives the position (step, data, optimizer moments); the config gives the
    hyperparameters: the LR of every later step is ``schedule(step)`` of *this* config, and
    ``optim.lr`` / ``weight_decay`` / ``betas`` / ``eps`` replace the saved ones in the param groups.
    """
    meta = ckpt.read_state(path)
    try:
        backend.load(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise ckpt.unreadable(path, e) from e
    scheduler.load_state_dict(meta["scheduler"])
    state = TrainState.from_dict(meta)
    # LambdaLR computes base_lr * lambda(last_epoch); base_lr (saved) must be this config's optim.lr.
    groups = backend.optimizer.param_groups
    scheduler.base_lrs = [optim.lr for _ in groups]
    lrs = [base * schedule.torch_lambda(scheduler.last_epoch) for base in scheduler.base_lrs]
    for i, (group, lr) in enumerate(zip(groups, lrs)):
        group.update(lr=lr, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        group["weight_decay"] = optim.weight_decay if i == 0 else 0.0  # build_adamw: [decay, no_decay]
    scheduler._last_lr = lrs
    rng_path = os.path.join(path, "rng", f"rank_{rank}.pt")
    if os.path.isfile(rng_path):  # absent when resuming at a larger world size
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


SCHEDULE_KEYS = ("optim", "schedule", "train.max_steps", "train.max_tokens")


def changed_schedule_keys(saved: dict, resolved: dict, max_steps: int) -> list[str]:
    """``key old -> new`` for every optimizer / schedule / budget key of the checkpoint's config that
    this config changes (the budget as a step count)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            key = f"{prefix}{k}"
            out.update(flat(v, key + ".") if isinstance(v, dict) else {key: v})
        return out

    before, now = flat(saved.get("config")), flat(resolved)
    keys = sorted(k for k in before.keys() | now.keys()
                  if k.startswith(SCHEDULE_KEYS) and k.split(".")[0] in ("optim", "schedule", "train"))  # fmt: skip
    out = [f"{k} {before.get(k)} -> {now.get(k)}" for k in keys if before.get(k) != now.get(k)]
    if saved.get("max_steps") not in (None, max_steps) and not any(k.startswith("train.max_") for k in out):
        out.append(f"steps {saved['max_steps']} -> {max_steps}")
    return out


def exit_status(state: TrainState) -> int:
    """0, 75 after a preemption signal, 130 after Ctrl-C (see :mod:`harness.exits`)."""
    return {"preempt": EXIT_PREEMPTED, "interrupt": EXIT_INTERRUPTED}.get(state.stop_signal, EXIT_OK)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines of steps after ``step`` (a resumed run logs them again, identically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    code = run_cli(cfg, hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task))
    if code:
        sys.exit(code)


def run_cli(cfg, run_dir: str, overrides: list[str]) -> int:
    """:func:`run` with the command line's outcome (:mod:`harness.exits`): 0 done, 75 preempted
    (checkpointed; rerun to continue), 130 Ctrl-C (checkpointed), 2 a problem the user can fix
    (one ``error:`` line on stderr, printed by rank 0 before any rank exits)."""
    try:
        return exit_status(run(cfg, run_dir, overrides))
    except HarnessError as e:
        announce_error(str(e))
        report_exit(_rank(), EXIT_USAGE)
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)  # only if the rejected run left it empty
        return EXIT_USAGE
    except KeyboardInterrupt:
        latest = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
        print(f"interrupted; newest checkpoint: {latest or 'none'} (rerun with checkpoint.resume=auto to continue)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED


def _rank() -> int:
    from harness.dist import read_ranks

    try:
        return read_ranks()[0]
    except ConfigError:
        return 0


def check_overrides(overrides: list[str]) -> None:
    """Raise :class:`ConfigError` (one line) when Hydra cannot compose ``overrides`` (see ``compose_checked``)."""
    compose_checked(overrides)


def main() -> None:
    """Console-script entry (``harness-train``): one ``error:`` line and exit 2 for a config Hydra
    cannot compose; otherwise Hydra's own main (multirun, ``--cfg`` etc. go straight to Hydra)."""
    argv = sys.argv[1:]
    if not any(a.startswith("-") for a in argv):
        try:
            check_overrides(argv)
        except ConfigError as e:
            announce_error(str(e))
            report_exit(_rank(), EXIT_USAGE)
            sys.exit(EXIT_USAGE)
    _hydra_main()


if __name__ == "__main__":
    main()
