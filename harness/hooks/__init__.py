"""Per-step extras, called by the :class:`~harness.trainer.Trainer` at fixed points (after
OLMo-core's callbacks): one file per hook, each built from its own config section.

The trainer calls, in the order of :func:`default_hooks`:

- ``on_train_start(trainer)``          before the first step of this invocation
- ``on_step_start(trainer, info)``     as an optimizer step starts (``info``: its :class:`StepInfo`)
- ``on_step_end(trainer, record)``     after the step's five steps (``record``: its :class:`StepMetrics`,
                                       which a hook may complete: ``val_loss``, ``events``)
- ``on_train_end(trainer)``            after the last step (not after an error)
- ``close()``                          always, last (release signal handlers, files)

Adding a hook: subclass :class:`Hook` in a new file here, give it a ``from_config``, and add it to
:func:`default_hooks` at the point where it must run.
"""

from __future__ import annotations

from harness.hooks.base import Hook
from harness.hooks.checkpointing import CheckpointHook
from harness.hooks.evaluation import EvalHook
from harness.hooks.export import ExportHook
from harness.hooks.faults import FaultHook
from harness.hooks.metrics import MetricsHook
from harness.hooks.mixture import MixtureHook
from harness.hooks.profiler import ProfilerHook
from harness.hooks.rank_stats import RankStatsHook
from harness.hooks.spikes import LossSpikeHook
from harness.hooks.stop import StopHook, StopSignal
from harness.hooks.watchdog import HangWatchdog

__all__ = [
    "CheckpointHook",
    "EvalHook",
    "ExportHook",
    "FaultHook",
    "HangWatchdog",
    "Hook",
    "LossSpikeHook",
    "MetricsHook",
    "MixtureHook",
    "ProfilerHook",
    "RankStatsHook",
    "StopHook",
    "StopSignal",
    "default_hooks",
]


def default_hooks(cfg, env, dp: tuple[int, int], run_dir: str, faults, data, batch, metrics, loader):
    """The hooks of a training run, in the order they are called: faults, a mixture's tokens by
    source, evaluation and early stopping, loss spikes, per-rank stats, the profiler, the metrics
    sinks, stop requests, checkpoint cadence, export, the hang watchdog. ``dp``: this rank's
    ``(data-parallel rank, data-parallel ranks)``; ``batch``: the full-size :class:`BatchSizes`."""
    eos = data.tokenizer.eos_token_id if cfg.data.document_mask else None
    stop = StopHook.from_config(cfg.train)
    return [
        FaultHook(faults),
        MixtureHook(loader),
        EvalHook.from_config(cfg.eval, data, batch, dp, eos),
        LossSpikeHook.from_config(cfg.train),
        RankStatsHook.from_config(cfg.logging, run_dir),
        ProfilerHook(cfg.profile, run_dir, env.rank, stop.signal),
        MetricsHook(metrics),
        stop,
        CheckpointHook.from_config(cfg.checkpoint),
        ExportHook.from_config(cfg.checkpoint),
        HangWatchdog.from_config(cfg.parallel, run_dir),
    ]
