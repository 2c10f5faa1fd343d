"""``parallel=none``: one process, one device, no collectives."""

from __future__ import annotations

import torch

from harness.parallel.base import Backend


class SingleProcess(Backend):
    """The model on this process's device; gradients never leave it (``comm_s`` is 0)."""

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model.to(self.env.device)
        return self.model
