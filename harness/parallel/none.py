"""``parallel=none``: one process, one device, no collectives."""

from __future__ import annotations

import torch

from harness.parallel.base import Backend


class SingleProcess(Backend):
    """The model on this process's device; gradients never leave it (``comm_s`` is 0)."""

    name = "none"

    @classmethod
    def from_config(cls, cfg, env, dims, batch, optim, comm_timing) -> SingleProcess:
        """Raises ConfigError when started with more than one process."""
        from harness.errors import ConfigError

        if env.world_size != 1:
            raise ConfigError(
                f"parallel.name=none runs one process, but WORLD_SIZE={env.world_size}; "
                "use parallel=ddp|fsdp|deepspeed, or launch one process"
            )
        return cls(env, cfg, dims)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.env.device)
