"""A mixture's tokens by source in every step's record (``tokens_by_source``)."""

from __future__ import annotations

from harness.hooks.base import Hook


class MixtureHook(Hook):
    """Fills ``record.tokens_by_source`` (this step's tokens of every source, all ranks) for a
    mixture (``data.sources``); a no-op for one source."""

    def __init__(self, loader):
        self.loader = loader
        self._info = None

    def on_step_start(self, trainer, info) -> None:
        self._info = info

    def on_step_end(self, trainer, record) -> None:
        if self._info is not None:
            record.tokens_by_source = self.loader.tokens_by_source(self._info)
