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
from harness.hooks.spikes import LossSpikeHook
from harness.hooks.stop import StopHook, StopSignal

__all__ = [
    "CheckpointHook",
    "EvalHook",
    "ExportHook",
    "FaultHook",
    "Hook",
    "LossSpikeHook",
    "MetricsHook",
    "MixtureHook",
    "StopHook",
    "StopSignal",
    "default_hooks",
]


def default_hooks(
    cfg, dp: tuple[int, int], faults, data, micro_batch_size: int, metrics, loader
) -> list[Hook]:
    """The hooks of a training run, in the order they are called: faults, a mixture's tokens by
    source, evaluation and early stopping, loss spikes, the metrics sinks, stop requests, checkpoint
    cadence, export. ``dp``: this rank's ``(data-parallel rank, data-parallel ranks)``."""
    eos = data.tokenizer.eos_token_id if cfg.data.document_mask else None
    return [
        FaultHook(faults),
        MixtureHook(loader),
        EvalHook.from_config(cfg.eval, data, micro_batch_size, dp, eos),
        LossSpikeHook.from_config(cfg.train),
        MetricsHook(metrics),
        StopHook.from_config(cfg.train),
        CheckpointHook.from_config(cfg.checkpoint),
        ExportHook.from_config(cfg.checkpoint),
    ]
