"""The Trainer: owns every part of a run and runs its optimizer steps.

One iteration = one optimizer step over K accumulated micro-batches, in five steps:

1. sample    this rank's micro-batches of the planned step (sizes from the batch ramp)
2. forward   per micro-batch: summed token cross-entropy / target tokens of the whole step
3. backward  per micro-batch; gradients synchronized only on the last one
4. update    clip by global norm, optimizer step, LR scheduler step, zero grads -- once
5. log       the step's StepMetrics record; then the hooks (evaluation, metrics sinks, stop
             requests, checkpoint cadence, ...) in ``on_step_end``

:meth:`Trainer.from_config` checks everything that can be checked without a model first (config,
data, iteration plan, the checkpoint to resume from), then takes the run directory and builds the
model: bad input fails fast and leaves an existing run as it was.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
from omegaconf import OmegaConf

from harness import checkpoint as ckpt
from harness import failures, phases
from harness.config import BatchSizes, JobConfig, check_run_dir, to_object, validate
from harness.data import DataBundle, MicroBatch, PrepareOnce, build_data, build_loader
from harness.data.mixture import resume_mixture
from harness.dist import DistEnv, job_store, read_env
from harness.errors import CheckpointError, NonFiniteError
from harness.exits import EXIT_PEER_LOST, exit_code, report_exit, stop_signals_ignored
from harness.faults import Faults
from harness.hooks import Hook, default_hooks
from harness.hooks.watchdog import flight_recorder_env
from harness.metrics import MetricsLogger, StepMetrics, StepTimer, Throughput, max_memory_bytes, step_log
from harness.model import (
    build_model,
    check_attention,
    document_mask_path,
    lr_warning,
    model_stats,
    resolve_vocab_size,
)
from harness.parallel import Backend, ParallelDims, build_backend
from harness.pretrained import check_pretrained, load_pretrained, safetensors_files, tokenizer_config
from harness.rundir import RunDir
from harness.schedule import DataPosition, StepInfo, TrainingSchedule, build_schedule
from harness.weights import init_weights

log = logging.getLogger("harness")
LOGGERS = (log, step_log)


@dataclass
class TrainState:
    """What a checkpoint must restore to continue the same run (besides model/optimizer/RNG)."""

    step: int = 0  # completed optimizer steps
    tokens_total: int = 0
    position: DataPosition = field(default_factory=DataPosition)  # data position before the next step
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0  # steps whose update was skipped (train.nonfinite=skip)
    consecutive_skips: int = 0
    # this invocation ended on SIGUSR1/SIGTERM ("preempt") or SIGINT ("interrupt"); not saved
    stop_signal: str | None = None

    @property
    def preempted(self) -> bool:
        return self.stop_signal == "preempt"

    def to_dict(self) -> dict:
        best = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        return {
            "step": self.step,
            "tokens_total": self.tokens_total,
            "epoch": self.position.epoch,
            "offset": self.position.offset,
            "best_val_loss": best,
            "evals_since_best": self.evals_since_best,
            "stopped_early": self.stopped_early,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        best = d.get("best_val_loss")
        return cls(
            d["step"],
            d["tokens_total"],
            DataPosition(d["epoch"], d["offset"]),
            math.inf if best is None else float(best),
            d.get("evals_since_best", 0),
            d.get("stopped_early", False),
            d.get("skipped_steps", 0),
            d.get("consecutive_skips", 0),
        )


def _model_identity(cfg: JobConfig, vocab_size: int) -> dict:
    """The model keys a checkpoint must match to be resumed: the shape (``model.init_from`` says where a
    run started, not what it is: a resume may drop or change it)."""
    identity = {**asdict(cfg.model), "vocab_size": vocab_size, "name": None}
    identity.pop("init_from")
    return identity


class _Checked(NamedTuple):
    """What :meth:`Trainer.from_config` knows before any model exists."""

    batch: BatchSizes
    backend: Backend
    data: DataBundle
    vocab_size: int
    schedule: TrainingSchedule
    checkpoints: ckpt.CheckpointManager
    resume_from: str | None
    resume_state: dict | None
    mixture_note: str | None = None  # how a changed mixture continues


class Trainer:
    """Owns the backend (model, optimizer), scheduler, data and loader, checkpoint manager, run
    directory, metrics, hooks and :class:`TrainState`; :meth:`train` runs :meth:`train_step` until
    the budget. Use as a context manager (``with Trainer.from_config(...) as t: t.train()``): on exit
    the outcome is recorded and the run directory released."""

    def __init__(self, cfg: JobConfig, env: DistEnv, checked: _Checked, run: RunDir, resolved: dict):
        self.cfg, self.env, self.run, self.resolved = cfg, env, run, resolved
        self.backend, self.data, self.checkpoints = checked.backend, checked.data, checked.checkpoints
        self.schedule, self.plan, self.max_steps = (
            checked.schedule,
            checked.schedule.plan,
            checked.schedule.max_steps,
        )
        self.faults = Faults.from_env(env.rank)
        self.checkpoints.faults = self.faults
        self.state = TrainState()
        self.stop_reason: str | None = None
        self.phase = "start"  # the part of the step (or the hook) running now
        self.trained = False  # whether this invocation has steps to run
        self.timer = StepTimer(env.device)
        self.autocast_dtype = _autocast_dtype(cfg.train.dtype, env.device)
        self.vocab_size = checked.vocab_size
        self.init_from = None if checked.resume_from else cfg.model.init_from  # the checkpoint wins
        self._build_model(checked.vocab_size)
        if checked.resume_from:
            self.checkpoints.restore(checked.resume_from, self.load_state_dict)  # any rank failing: exit 74
            st = checked.resume_state  # a changed mixture resumes at its sample position in the new stream
            self.state.position = DataPosition(st["epoch"], st["offset"])
            log.info(
                "resumed from %s at step %d (%s tokens)",
                checked.resume_from,
                self.state.step,
                f"{self.state.tokens_total:,}",
            )
            self._warn_changed_settings(checked.resume_state)
            if cfg.model.init_from:
                log.info(
                    "model.init_from=%s is ignored: the run continues from its checkpoint",
                    cfg.model.init_from,
                )
            _log_layout_change(checked.resume_state.get("mesh"), self.backend.dims)
        self.trained = not self.done
        dims = self.backend.dims  # the tp ranks of one data-parallel rank read the same micro-batches
        dp = (dims.dp_rank(env.rank), dims.dp)
        self.loader = build_loader(
            self.data.train,
            cfg.seed,
            checked.batch.micro_batch_size,
            *dp,
            cfg.data.loader_workers,
            env.device.type,
            self.plan,
            self.max_steps,
            self.data.tokenizer.eos_token_id if cfg.data.document_mask else None,
        )
        metrics = None
        if env.is_main and self.trained:
            metrics = MetricsLogger.from_config(
                cfg.logging, run.path, self.max_steps, self.state.step, cfg.run_name, resolved
            )
        self.hooks: list[Hook] = default_hooks(
            cfg,
            env,
            dp,
            run.path,
            self.faults,
            self.data,
            checked.batch,
            metrics,
            self.loader,
        )

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, composed, run_dir: str, overrides: list[str] | tuple = ()) -> Trainer:
        """Check, take the run directory, build: the one way a run is put together.

        ``composed`` is the composed config (a DictConfig, or a :class:`JobConfig`).

        Raises:
            HarnessError: a config, data or checkpoint problem (before any model exists whenever it can
                be seen from the config, the data or the checkpoint metadata), or a run directory held
                by another live process.
        """
        if isinstance(composed, JobConfig):
            composed = OmegaConf.structured(composed)
        resolved = OmegaConf.to_container(composed, resolve=True)
        cfg = to_object(composed)
        check_run_dir(run_dir)
        env = read_env(cfg.train.device)
        log.setLevel(logging.INFO if env.is_main else logging.WARNING)  # rank 0 logs; the others only warn
        if env.device.type == "cpu":  # DeepSpeed, when a library imports it, would warn about the CPU
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        checked = cls._check(cfg, env, run_dir)
        trains = _resume_step(checked) < checked.schedule.max_steps and not (checked.resume_state or {}).get(
            "stopped_early"
        )
        invocation = {
            "overrides": list(overrides),
            "world_size": env.world_size,
            "parallel": cfg.parallel.name,
            "resume_from": checked.resume_from,
            "start_step": _resume_step(checked),
            "max_steps": checked.schedule.max_steps,
            "trains": trains,
            "config": resolved,
        }
        hydra = (composed, resolved, list(overrides)) if trains else None

        def agree(flag: float) -> float:  # summed over every rank, tp ranks included
            return checked.backend.all_reduce_sum(torch.tensor(flag, device=env.device), world=True).item()

        run = RunDir.open(run_dir, env, agree, invocation, hydra, LOGGERS)
        if env.is_main:
            _log_plan(cfg, env, checked)
        try:
            return cls(cfg, env, checked, run, resolved)
        except BaseException as e:
            run.report_failure(e, min(10.0, cfg.parallel.timeout_s))
            run.close(_outcome_of(e), LOGGERS)
            raise

    @staticmethod
    def _check(cfg: JobConfig, env: DistEnv, run_dir: str) -> _Checked:
        """Everything before a model: config, backend (process group, mesh), data, plan, resume point."""
        batch = validate(cfg, env.world_size)  # the config alone; then what needs a part
        if cfg.data.document_mask:
            document_mask_path(cfg.model, env.device.type)  # transformers reads the position_ids resets
        check_attention(cfg.model, env.device.type)
        dims = ParallelDims.from_config(cfg.parallel, env.world_size)
        if env.world_size > 1:
            flight_recorder_env(run_dir)  # before the process group exists
        backend = build_backend(cfg.parallel, env, dims, batch, cfg.optim, cfg.logging.comm_timing)
        if env.world_size > 1:  # a failed save or load on any rank ends every rank (harness.failures)
            hosts = [None] * env.world_size  # each rank's host: a lost rank is named with it
            torch.distributed.all_gather_object(hosts, socket.gethostname())
            failures.start(job_store(cfg.parallel.timeout_s), env.rank, env.world_size, hosts)
        if cfg.model.init_from:
            safetensors_files(cfg.model.init_from)  # weights there, before its tokenizer is read
        tokenizer = tokenizer_config(cfg.model, cfg.tokenizer)  # model.init_from's when tokenizer.path unset
        once = PrepareOnce.for_job(env.rank, env.local_rank, env.world_size, cfg.data.prepare_timeout_s)
        data = build_data(cfg.data, tokenizer, batch.global_batch_size, cfg.eval.every > 0, cfg.seed, once)
        vocab_size = resolve_vocab_size(cfg.model, len(data.tokenizer))
        schedule = build_schedule(cfg, batch, len(data.train))
        identity = {
            "model": _model_identity(cfg, vocab_size),
            "data": data.identity(cfg.data),
        }
        unchecked = ["data.sources"] if cfg.data.allow_mixture_change else []  # compared by _resume_mixture
        checkpoints = ckpt.CheckpointManager.from_config(
            cfg.checkpoint, run_dir, env, backend, identity, unchecked=unchecked
        )
        resume_from = checkpoints.find_resume()
        resume_state = checkpoints.resume_state  # rank 0 read it; None without a checkpoint
        note = _resume_mixture(cfg, data, resume_from, resume_state)
        if cfg.model.init_from and not resume_from:
            check_pretrained(cfg.model, vocab_size)
        return _Checked(
            batch, backend, data, vocab_size, schedule, checkpoints, resume_from, resume_state, note
        )

    def _build_model(self, vocab_size: int) -> None:
        """The model, parallelized over the mesh (TP -> AC -> compile -> FSDP/DDP), the optimizer after
        sharding, the LR scheduler, and the MFU arithmetic."""
        cfg, env = self.cfg, self.env
        model = build_model(cfg.model, vocab_size, cfg.seed, self.data.tokenizer.eos_token_id, device="meta")
        # what fills this rank's shards once they have storage: released weights (continued
        # pretraining, from step 0) or the layout-independent random init
        if self.init_from:
            init = functools.partial(load_pretrained, path=self.init_from)
        else:
            init = functools.partial(init_weights, model=cfg.model, seed=cfg.seed)
        self.backend.parallelize(model, cfg.train.compile, init=init)
        self.optimizer = self.backend.build_optimizer(cfg.optim)  # DeepSpeed wraps the model here
        self.model = self.backend.model
        lr = self.schedule.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: lr.torch_lambda(i))
        stats = model_stats(cfg.model, vocab_size, cfg.data.seq_len)
        self.throughput = Throughput.from_config(cfg.train, env.device, stats.flops_per_token, env.world_size)
        if env.is_main:
            log.info(
                "model: %s (%s), %s parameters (%s non-embedding), vocab %d, %.3g FLOPs/token; peak %.3g "
                "FLOP/s (%s)",
                cfg.model.name,
                cfg.model.arch,
                f"{stats.params:,}",
                f"{stats.non_embedding_params:,}",
                vocab_size,
                stats.flops_per_token,
                self.throughput.peak_flops,
                self.throughput.peak_source,
            )
            if warning := lr_warning(stats.params, cfg.optim.lr):
                log.warning("%s", warning)

    # -- the loop --------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the budget is reached, early stopping triggered, or a stop was requested."""
        s = self.state
        return s.step >= self.max_steps or s.stopped_early or self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """End this invocation after the current step (the checkpoint hook saves it)."""
        self.stop_reason = reason

    def train(self) -> TrainState:
        """Run optimizer steps from the current state until :attr:`done`; returns the state."""
        if self.done:
            log.warning(
                "nothing to train: the checkpoint is at step %d and the budget is %d steps%s; the run "
                "directory is left as it was",
                self.state.step,
                self.max_steps,
                " (stopped early)" if self.state.stopped_early else "",
            )
        self._started = time.perf_counter()
        self.model.train()
        phases.enter("startup")  # the hang watchdog's phases (harness/phases.py)
        try:
            self._call("on_train_start")
            for info in self.plan.steps(self.state.step, self.state.position, self.state.tokens_total):
                if self.done:
                    break
                self._call("on_step_start", info)
                record = self.train_step(info)
                phases.enter("step")  # a step ended: the next one is timed from here
                self._call("on_step_end", record)
            self._call("on_train_end")
        finally:
            for hook in self.hooks:
                hook.close()
        return self.state

    def train_step(self, info: StepInfo) -> StepMetrics:
        """One optimizer step: sample, forward + backward over the micro-batches, update, log."""
        self.timer.start()
        self.backend.begin_step()
        self.phase = "data"  # what the step is doing (the hang watchdog's dump says it)
        micro_batches = self.sample(info)  # 1. sample
        self.timer.mark("data")
        self.phase = "forward_backward"
        loss = self.forward_backward(micro_batches, info.step)  # 2. forward + 3. backward
        self.timer.mark("forward_backward")
        self.phase = "optimizer"
        grad_norm, stepped, lr = self.update(info.step, loss)  # 4. update
        self.timer.mark("optimizer")
        self.phase = "log"
        return self.log_step(info, loss, grad_norm, lr, stepped)  # 5. log

    def sample(self, info: StepInfo) -> list[MicroBatch]:
        """This rank's micro-batches of step ``info``, on the device."""
        return [mb.to(self.env.device, non_blocking=True) for mb in self.loader.micro_batches(info)]

    def forward_backward(self, micro_batches: list[MicroBatch], step: int) -> torch.Tensor:
        """The step's token-mean loss (0-d); gradients accumulated (:meth:`Backend.forward_backward`)."""
        self.faults.slow_step()
        return self.backend.forward_backward(micro_batches, self.autocast_dtype, self.faults.nan_loss(step))

    def update(self, step: int, loss: torch.Tensor) -> tuple[torch.Tensor, bool, float]:
        """Clip by the global norm, step the optimizer (skipped on every rank alike when the loss or the
        norm is not finite), step the LR scheduler. Returns ``(grad norm, stepped, LR used)``."""
        lr = self.scheduler.get_last_lr()[0]
        grad_norm, stepped = self.backend.clip_and_step(self.cfg.optim.grad_clip, loss)
        if not stepped:
            self._nonfinite(step, loss, grad_norm)
        self.scheduler.step()
        return grad_norm, stepped, lr

    def log_step(
        self, info: StepInfo, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, stepped: bool
    ) -> StepMetrics:
        """Advance :attr:`state` to the end of step ``info`` and return the step's record."""
        s = self.state
        s.step, s.tokens_total = info.step, info.tokens_total
        s.position = info.end_position(self.plan.num_sequences)
        if stepped:
            s.consecutive_skips = 0
        t = self.timer.durations()
        comm = self.backend.comm_stats()
        tokens_per_second = info.tokens / t["total"]
        return StepMetrics(
            step=info.step,
            epoch=info.epoch,
            tokens=info.tokens,
            tokens_total=info.tokens_total,
            loss=loss.item(),
            lr=lr,
            grad_norm=grad_norm.item(),
            global_batch_size=info.global_batch_size,
            gradient_accumulation_steps=info.gradient_accumulation_steps,
            step_time_s=t["total"],
            data_s=t["data"],
            forward_backward_s=t["forward_backward"],
            optimizer_s=t["optimizer"],
            comm_s=comm.comm_s,
            comm_exposed_s=comm.comm_exposed_s,
            comm_bytes=comm.comm_bytes,
            comm_busbw_gbps=comm.busbw_gbps,
            comm_bytes_by_op=comm.bytes_by_op,
            comm_by_dim=comm.by_dim,
            tokens_per_second=tokens_per_second,
            mfu=self.throughput.mfu(tokens_per_second),
            max_memory_bytes=max_memory_bytes(self.env.device),
            elapsed_s=time.perf_counter() - self._started,
            skipped_steps=s.skipped_steps,
            events=None if stepped else ["skipped_nonfinite"],
        )

    def _nonfinite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A step whose loss or gradient norm is not finite: count it as skipped, or abort (nothing saved)."""
        policy = self.cfg.train.nonfinite or ("abort" if self.backend.name == "deepspeed" else "skip")
        what = f"step {step}: non-finite loss {loss.item():.4g} / grad norm {grad_norm.item():.4g}"
        if policy == "abort":
            raise NonFiniteError(
                f"{what}; train.nonfinite=abort: stopping without saving (rerun with "
                "checkpoint.resume=auto to continue from the newest checkpoint, or set "
                "train.nonfinite=skip)"
            )
        s = self.state
        s.skipped_steps += 1
        s.consecutive_skips += 1
        log.warning("%s: update skipped (%d skipped so far)", what, s.skipped_steps)
        limit = self.cfg.train.max_consecutive_skips
        if s.consecutive_skips >= limit:
            raise NonFiniteError(
                f"{what}; {s.consecutive_skips} steps in a row were non-finite "
                f"(train.max_consecutive_skips={limit}): stopping without saving; lower optim.lr "
                "or check the data, then rerun with checkpoint.resume=auto"
            )

    def _call(self, event: str, *args) -> None:
        for hook in self.hooks:
            self.phase = f"{type(hook).__name__}.{event}"
            getattr(hook, event)(self, *args)

    def evaluate_sums(self, batches: list[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed validation loss (nats) and target count over this rank's micro-batches and every
        other rank's (0-d tensors; :meth:`Backend.evaluate_sums`)."""
        return self.backend.evaluate_sums(batches, self.autocast_dtype)

    def evaluate(self, batches: list[MicroBatch]) -> float:
        """Token-mean validation loss (nats) over ``batches`` of every rank."""
        loss_sum, targets = self.evaluate_sums(batches)
        return (loss_sum / targets.clamp(min=1)).item()

    # -- state, checkpoints, export --------------------------------------------------------------

    def state_dict(self) -> dict:
        """``trainer_state.json``: the position (step, tokens, data, early stopping), the LR scheduler,
        the budget and the resolved config (the model and optimizer are the backend's files)."""
        out = {
            **self.state.to_dict(),
            "max_steps": self.max_steps,
            "scheduler": self.scheduler.state_dict(),
            "config": self.resolved,
        }
        mixture = self.data.mixture_state()
        if mixture is not None:
            g = self.state.position.epoch * len(self.data.train) + self.state.position.offset
            names, counts = self.data.train.names, self.data.train.order.counts(g)
            sizes = [len(s) for s in self.data.train.sources]
            out["mixture"] = {
                **mixture,
                "samples": g,
                "counts": dict(zip(names, counts)),
                "epochs": {n: c // size for n, c, size in zip(names, counts, sizes)},  # completed epochs
            }
        return out

    def load_state_dict(self, meta: dict) -> None:
        """Restore the position from ``meta``; the hyperparameters come from this config.

        The LR of every later step is this config's schedule at that step, and ``optim.lr`` /
        ``weight_decay`` / ``betas`` / ``eps`` replace the saved ones in the param groups.
        """
        self.state = TrainState.from_dict(meta)
        self.scheduler.load_state_dict(meta["scheduler"])
        optim, groups = self.cfg.optim, self.optimizer.param_groups
        # LambdaLR computes base_lr * lambda(last_epoch); base_lr (saved) must be this config's optim.lr.
        self.scheduler.base_lrs = [optim.lr for _ in groups]
        lrs = [
            base * self.schedule.lr.torch_lambda(self.scheduler.last_epoch)
            for base in self.scheduler.base_lrs
        ]
        for i, (group, lr) in enumerate(zip(groups, lrs)):
            group.update(lr=lr, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
            group["weight_decay"] = optim.weight_decay if i == 0 else 0.0  # build_adamw: [decay, no_decay]
        self.scheduler._last_lr = lrs

    def save_checkpoint(self) -> str:
        """A checkpoint of the current step (every rank), staged in the ``checkpoint`` phase; complete once
        ``self.checkpoints.wait()`` returns (at once when ``checkpoint.async_save=false``)."""
        with phases.phase("checkpoint"):
            self.faults.on_save(self.state.step)
            return self.checkpoints.save(self.state.step, self.state_dict(), self.data.tokenizer)

    def export_hf(self) -> str | None:
        """Gather the full model (collective under sharding) and save it in HF format into ``<run>/hf``
        on rank 0 (returns the path there, None elsewhere)."""
        full = self.backend.full_state_dict()
        if not self.env.is_main:
            return None
        import transformers

        transformers.utils.logging.disable_progress_bar()
        model = build_model(
            self.cfg.model, self.vocab_size, self.cfg.seed, self.data.tokenizer.eos_token_id, device="meta"
        )
        model.load_state_dict(full, assign=True, strict=False)
        model.tie_weights()
        missing = [n for n, t in model.named_parameters() if t.is_meta]
        if missing:
            raise CheckpointError(f"the gathered state dict lacks {missing[:3]}; cannot export")
        path = ckpt.export_hf(model, self.data.tokenizer, os.path.join(self.run.path, "hf"))
        log.info("exported Hugging Face model and tokenizer to %s", path)
        return path

    def _warn_changed_settings(self, saved: dict) -> None:
        changed = changed_schedule_keys(saved, self.resolved, self.max_steps)
        if changed and not self.done and self.env.is_main:
            nxt = self.state.step + 1
            log.warning(
                "resuming with changed optimizer/schedule settings (%s): the new config's schedule applies "
                "from step %d on (LR at step %d: %.4g)",
                ", ".join(changed),
                nxt,
                nxt,
                self.schedule.lr(nxt),
            )
        data = (saved.get("config") or {}).get("data")  # no document_mask key: written before it existed
        mask = data.get("document_mask", False) if data is not None else self.cfg.data.document_mask
        if mask != self.cfg.data.document_mask and not self.done and self.env.is_main:
            log.warning(
                "resuming with changed data.document_mask %s -> %s: from step %d on attention %s document "
                "boundaries within packed sequences, so the loss is not comparable across the change",
                mask,
                self.cfg.data.document_mask,
                self.state.step + 1,
                "stops at" if self.cfg.data.document_mask else "crosses",
            )

    # -- the end ---------------------------------------------------------------------------------

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:  # a peer that left on a failed save (harness.failures): leave with its status
            failures.answer_roll_call()  # this rank is not lost: a peer holding a roll call must know
            failures.leave_if_announced()
        lost = isinstance(exc, Exception) and failures.is_peer_error(exc) and failures.report_lost(str(exc))
        if isinstance(exc, Exception):  # a save in flight still completes if it can (not on a 2nd Ctrl-C)
            self.checkpoints.wait(timeout_s=self.cfg.parallel.timeout_s)
        failures.stop()
        if exc is None:
            report_exit(self.env.rank, exit_code(self.state.stop_signal))  # before any rank exits
            with stop_signals_ignored():  # the outcome is recorded: a late SIGTERM must not cut the close
                self.run.close(self.outcome(), LOGGERS)
                self.backend.close()
            return
        # the failure is being recorded: the launcher's SIGTERM (torchrun ends the other workers as soon
        # as the failed rank exits) must not cut rank 0's report or the close; its SIGKILL still follows
        with stop_signals_ignored():
            if isinstance(exc, Exception):
                self.run.report_failure(exc, min(10.0, self.cfg.parallel.timeout_s))
            self.run.close(_outcome_of(exc), LOGGERS)
        if lost:  # ranks of the job are gone (their node killed, its link cut): the status says so
            failures.leave(EXIT_PEER_LOST)

    def outcome(self) -> str:
        """``done``, ``stopped`` (train.stop_at_step), ``preempt`` or ``interrupt``."""
        if self.state.stop_signal:
            return self.state.stop_signal
        return "done" if self.state.step >= self.max_steps or self.state.stopped_early else "stopped"


def _outcome_of(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted at once (second Ctrl-C)"
    return f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _resume_mixture(cfg: JobConfig, data: DataBundle, path: str | None, state: dict | None) -> str | None:
    """A mixture's segments from the checkpoint, or a new segment when ``data.allow_mixture_change``
    lets the mixture change (then ``state``'s data position moves to the same sample of the new stream)."""
    if not data.is_mixture or state is None:
        if state is not None and state.get("mixture") and not data.is_mixture:
            raise CheckpointError(
                f"checkpoint {path} was trained on a mixture (data.sources), this run on one "
                "source; use a new run_name / hydra.run.dir"
            )
        return None
    g, note = resume_mixture(
        data.train, data.weights, state.get("mixture"), cfg.data.allow_mixture_change, path
    )
    if g is not None:
        state["epoch"], state["offset"] = divmod(g, len(data.train))
    return note


def _resume_step(checked: _Checked) -> int:
    return checked.resume_state["step"] if checked.resume_state else 0


def _data_line(data, seq_len: int) -> str:
    """``data: <source>: N tokens -> M train sequences of L (+1) tokens, V validation``."""
    if data.is_mixture:
        source = f"mixture of {', '.join(data.stores)}"
        num_tokens = sum(s.num_tokens for s in data.stores.values())
        num_val = sum(len(v) for v in (data.val_by_source or {}).values())
    else:
        source, num_tokens = data.store.meta.get("source", data.store.path), data.store.num_tokens
        num_val = len(data.val) if data.val else 0
    return (
        f"data: {source}: {num_tokens:,} tokens -> {len(data.train)} train sequences of {seq_len} (+1) "
        f"tokens, {num_val} validation"
    )


def _log_layout_change(saved: dict | None, dims) -> None:
    """One line when the checkpoint was written on another mesh (DCP reshards it on load)."""
    now = {d: getattr(dims, d) for d in ("dp_replicate", "dp_shard", "tp")}
    if saved and saved != now:
        fmt = lambda m: " x ".join(f"{k} {v}" for k, v in m.items())  # noqa: E731
        log.info("resharded from mesh %s to %s", fmt(saved), fmt(now))


def _log_plan(cfg: JobConfig, env: DistEnv, c: _Checked) -> None:
    """The ``data:`` and ``plan:`` lines (the plan's tokens counted from the resume point) and the
    schedule's shortened warmups."""
    plan, st = c.schedule.plan, c.resume_state
    tokens = plan.total_tokens(c.schedule.max_steps)
    if st:
        tokens = plan.total_tokens(
            c.schedule.max_steps, st["step"], DataPosition(st["epoch"], st["offset"]), st["tokens_total"]
        )
    log.info("%s", _data_line(c.data, cfg.data.seq_len))
    b, dims = c.batch, c.backend.dims
    split = ", ".join(f"{k} {getattr(dims, k)}" for k in ("pp", "cp", "tp") if getattr(dims, k) > 1)
    ranks = f"world {env.world_size}" if not split else f"dp {dims.dp}; {split}, world {env.world_size}"
    if dims.pp > 1:
        ranks += f"; pp_schedule {cfg.parallel.pp_schedule}"
    log.info(
        "plan: %d steps, global batch %d (micro %d x accumulation %d x %s), %d iterations/epoch, %s "
        "tokens in total",
        c.schedule.max_steps,
        b.global_batch_size,
        b.micro_batch_size,
        b.gradient_accumulation_steps,
        ranks,
        plan.iterations_per_epoch(),
        f"{tokens:,}",
    )
    for warning in c.schedule.warnings:
        log.warning("%s", warning)
    if c.data.is_mixture:
        shares = ", ".join(f"{n} {w:.1%}" for n, w in c.data.weights.items())
        sizes = ", ".join(f"{n} {s.num_tokens:,}" for n, s in c.data.stores.items())
        log.info(
            "mixture: %d sources, weights %s; tokens %s (data.path is not used)",
            len(c.data.stores),
            shares,
            sizes,
        )
    if c.mixture_note:
        log.warning("%s", c.mixture_note)
    if cfg.data.document_mask:
        log.info("document mask: %s", document_mask_path(cfg.model, env.device.type))


SCHEDULE_KEYS = ("optim.", "schedule.", "train.max_steps", "train.max_tokens")


def changed_schedule_keys(saved: dict, resolved: dict, max_steps: int) -> list[str]:
    """``key old -> new`` for every optimizer / schedule / budget key of the checkpoint's config that
    this config changes (the budget also as a step count)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in (d or {}).items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    before, now = flat(saved.get("config")), flat(resolved)
    keys = sorted(k for k in before.keys() | now.keys() if k.startswith(SCHEDULE_KEYS))
    out = [f"{k} {before.get(k)} -> {now.get(k)}" for k in keys if before.get(k) != now.get(k)]
    if saved.get("max_steps") not in (None, max_steps) and not any(k.startswith("train.max_") for k in out):
        out.append(f"steps {saved['max_steps']} -> {max_steps}")
    return out


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
