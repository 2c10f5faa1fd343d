"""Entry point: ``python -m harness.train [hydra overrides]`` (console script ``harness-train``).

Builds the parts in dependency order -- config checks, data, iteration plan, checkpoint
lookup (all before any model exists, so bad input fails fast), then model, backend,
optimizer and scheduler -- and hands them to :func:`harness.loop.train`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict

import hydra
import torch
import transformers
from omegaconf import OmegaConf

from harness import checkpoint as ckpt
from harness.config import TrainConfig, check_schedule_fits, to_object, validate
from harness.data import StepLoader, build_data, validation_batches
from harness.dist import read_env
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.loop import LoopParts, TrainState
from harness.loop import train as train_loop
from harness.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink, device_peak_flops
from harness.model import build_model, count_parameters, model_stats, resolve_vocab_size
from harness.parallel import build_backend
from harness.schedule import BatchRamp, IterationPlan, LRSchedule

log = logging.getLogger("harness")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def run(cfg, run_dir: str) -> TrainState:
    """Train as ``cfg`` says, writing everything into ``run_dir``; returns the final state.

    Raises:
        HarnessError: a config, data or checkpoint problem (raised before the model is built
            whenever it can be detected from the config, the data or the checkpoint metadata).
    """
    resolved = OmegaConf.to_container(
        OmegaConf.create(cfg) if isinstance(cfg, TrainConfig) else cfg, resolve=True
    )
    cfg: TrainConfig = to_object(cfg)
    env = read_env(cfg.train.device)
    batch = validate(cfg, env.world_size)
    backend = build_backend(cfg.parallel, env)
    os.makedirs(run_dir, exist_ok=True)

    # Data and iteration plan: everything the run will do, before any model exists.
    data = build_data(cfg.data, cfg.tokenizer, batch.global_batch_size, need_val=cfg.eval.every > 0)
    vocab_size = resolve_vocab_size(cfg.model, len(data.tokenizer))
    bw = cfg.schedule.batch_warmup
    ramp = BatchRamp(batch.global_batch_size, batch.micro_batch_size * env.world_size,
                     bw.start_global_batch_size, bw.steps, bw.tokens)  # fmt: skip
    plan = IterationPlan(len(data.train), cfg.data.seq_len, ramp, batch.micro_batch_size, env.world_size,
                         cfg.train.drop_last)  # fmt: skip
    max_steps = cfg.train.max_steps or plan.steps_for_tokens(cfg.train.max_tokens)
    check_schedule_fits(cfg, max_steps)
    schedule = LRSchedule(cfg.schedule.name, cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.warmup_steps,
                          max_steps, cfg.schedule.decay_fraction)  # fmt: skip
    stats = model_stats(cfg.model, vocab_size, cfg.data.seq_len)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    model_key = {**asdict(cfg.model), "vocab_size": vocab_size, "name": None}
    resume_from = _find_resume(cfg.checkpoint.resume, ckpt_root, model_key)
    if env.is_main:
        _write_resolved(run_dir, resolved)
        log.info("data: %s: %s tokens -> %d train sequences of %d (+1) tokens, %d validation",
                 data.store.meta.get("source", data.store.path), f"{data.store.num_tokens:,}", len(data.train),
                 cfg.data.seq_len, len(data.val) if data.val else 0)  # fmt: skip
        log.info("plan: %d steps, global batch %d (micro %d x accumulation %d x world %d), %d iterations/epoch, "
                 "%s tokens in total", max_steps, batch.global_batch_size, batch.micro_batch_size,
                 batch.gradient_accumulation_steps, env.world_size, plan.iterations_per_epoch(),
                 f"{plan.total_tokens(max_steps):,}")  # fmt: skip

    # Model, backend, optimizer, scheduler.
    model = build_model(cfg.model, vocab_size, cfg.seed, data.tokenizer.eos_token_id)
    module = backend.setup(model)
    optimizer = backend.build_optimizer(cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule.torch_lambda(i))
    peak_flops, peak_source = (
        (cfg.train.peak_flops_per_device, "train.peak_flops_per_device")
        if cfg.train.peak_flops_per_device
        else device_peak_flops(env.device)
    )
    if env.is_main:
        log.info("model: %s (%s), %s parameters (%s non-embedding), vocab %d, %.3g FLOPs/token; peak %.3g FLOP/s "
                 "(%s)", cfg.model.name, cfg.model.arch, f"{count_parameters(model):,}",
                 f"{stats.non_embedding_params:,}", vocab_size, stats.flops_per_token, peak_flops, peak_source)  # fmt: skip

    state = TrainState()
    if resume_from:
        state = _restore(resume_from, backend, optimizer, scheduler, schedule)
        log.info("resumed from %s at step %d (%s tokens)", resume_from, state.step, f"{state.tokens_total:,}")

    def save(st: TrainState) -> None:
        tensors = {"model": backend.model_state_dict(),
                   "optimizer": {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   "rng": _rng_state()}  # fmt: skip
        meta = {**st.to_dict(), "max_steps": max_steps, "model": model_key,
                "data": {"tokens": data.store.num_tokens, "seq_len": cfg.data.seq_len}, "config": resolved}  # fmt: skip
        path = ckpt.save_checkpoint(ckpt_root, st.step, tensors, meta, cfg.checkpoint.keep_last)
        log.info("checkpoint: %s", path)

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    sinks = []
    if env.is_main:
        _truncate_metrics(metrics_path, state.step)
        sinks = [
            JsonlSink(metrics_path),
            ConsoleSink(max_steps, state.step, cfg.logging.every, cfg.logging.progress),
        ]
        if cfg.logging.wandb.mode != "disabled":
            w = cfg.logging.wandb
            sinks.append(WandbSink(w.mode, w.project, w.entity, w.name or cfg.run_name, run_dir, resolved))
    metrics = MetricsLogger(sinks)
    parts = LoopParts(
        backend=backend, model=module, scheduler=scheduler,
        loader=StepLoader(data.train, cfg.seed, batch.micro_batch_size, env.rank, env.world_size),
        val_batches=validation_batches(data.val, cfg.eval.batches, batch.micro_batch_size, env.rank, env.world_size)
        if data.val else [],
        plan=plan, max_steps=max_steps, grad_clip=cfg.optim.grad_clip, eval_every=cfg.eval.every,
        patience=cfg.eval.patience, checkpoint_every=cfg.checkpoint.every, flops_per_token=stats.flops_per_token,
        peak_flops=peak_flops, autocast_dtype=_autocast_dtype(cfg.train.dtype, env.device), metrics=metrics,
        save_checkpoint=save,
    )  # fmt: skip
    try:
        if state.step < max_steps and not state.stopped_early:
            state = train_loop(parts, state)
        else:
            log.info("nothing to do: the checkpoint is at step %d of max_steps=%d", state.step, max_steps)
    finally:
        metrics.close()
    if env.is_main and cfg.checkpoint.export_hf:
        transformers.utils.logging.disable_progress_bar()
        path = ckpt.export_hf(backend.unwrapped(), data.tokenizer, os.path.join(run_dir, "hf"))
        log.info("exported Hugging Face model and tokenizer to %s", path)
    backend.close()
    return state


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _find_resume(resume: str, ckpt_root: str, model_key: dict) -> str | None:
    """The checkpoint to resume from (or None), checked against this run's model shape."""
    if resume == "never":
        existing = ckpt.list_checkpoints(ckpt_root)
        if existing:
            raise ConfigError(
                f"checkpoint.resume=never, but {ckpt_root} already holds checkpoints (up to step {existing[-1][0]}); "
                "set checkpoint.resume=auto to continue that run, or pick a new run_name / hydra.run.dir"
            )
        return None
    path = ckpt.latest_checkpoint(ckpt_root) if resume == "auto" else os.path.expanduser(resume)
    if path is None:
        return None
    if not ckpt.is_complete(path):
        raise CheckpointError(f"checkpoint.resume={resume!r}: {path} is not a complete checkpoint")
    with open(os.path.join(path, ckpt.STATE)) as f:
        saved = json.load(f).get("model", {})
    diff = {k: (saved.get(k), v) for k, v in model_key.items() if saved.get(k) != v and k != "name"}
    if diff:
        shown = ", ".join(f"model.{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(
            f"checkpoint {path} was written by a different model ({shown}); use a new run_name / hydra.run.dir, "
            "or the model config that wrote it"
        )
    return path


def _restore(path: str, backend, optimizer, scheduler, schedule: LRSchedule) -> TrainState:
    objs, meta = ckpt.load_checkpoint(path)
    backend.load_model_state_dict(objs["model"])
    optimizer.load_state_dict(objs["optimizer"]["optimizer"])
    scheduler.load_state_dict(objs["optimizer"]["scheduler"])
    state = TrainState.from_dict(meta)
    # The schedule may have changed (e.g. a larger max_steps): take the LR from it, not from the file.
    lr = schedule(state.step + 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scheduler._last_lr = [lr for _ in optimizer.param_groups]
    torch.set_rng_state(objs["rng"]["torch"])
    if "cuda" in objs["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(objs["rng"]["cuda"])
    return state


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


def _write_resolved(run_dir: str, resolved: dict) -> None:
    hydra_dir = os.path.join(run_dir, ".hydra")
    os.makedirs(hydra_dir, exist_ok=True)
    with open(os.path.join(hydra_dir, "resolved.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(resolved)))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except HarnessError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry (``harness-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
