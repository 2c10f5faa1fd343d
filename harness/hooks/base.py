"""The hook interface (see :mod:`harness.hooks`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.metrics import StepMetrics
    from harness.schedule import StepInfo
    from harness.trainer import Trainer


class Hook:
    """A per-step extra; every method is a no-op unless overridden."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this invocation."""

    def on_step_start(self, trainer: Trainer, info: StepInfo) -> None:
        """As optimizer step ``info.step`` starts."""

    def on_step_end(self, trainer: Trainer, record: StepMetrics) -> None:
        """After the step; ``trainer.state`` is already at ``record.step``."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step of this invocation (not after an error)."""

    def close(self) -> None:
        """Always called last, also after an error."""
