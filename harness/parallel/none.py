"""``parallel=none``: one process, one device, no collectives."""

from __future__ import annotations

import os
from concurrent.futures import Future

import torch

from harness.parallel.base import Backend
from harness.parallel.dcp import DCP_DIR, load_dcp, save_dcp, save_dcp_async, written_dcp_files


class SingleProcess(Backend):
    """The model on this process's device; gradients never leave it (``comm_s`` is 0).

    Checkpoints are ``torch.distributed.checkpoint`` files (``dcp/``), written and read without a
    process group, the format of DDP and FSDP2: a one-process run continues under ``parallel=ddp`` or
    ``fsdp`` at any world size, and theirs continue here. Checkpoints of one-process runs from before
    (``model.pt`` / ``optimizer.pt``, format ``torch``) still resume.
    """

    name = "none"
    checkpoint_format = "dcp"
    legacy_formats = ("torch",)  # also read by load() (harness.checkpoint checks the format first)
    async_save = True

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
        return self.materialize(model)

    def save(self, directory: str) -> None:
        """``<directory>/dcp`` (:func:`harness.parallel.dcp.save_dcp`), without a process group."""
        save_dcp(self.model, self.optimizer, directory, no_dist=True)

    def save_async(self, directory: str) -> Future:
        """DCP's ``async_save`` without a process group (:func:`~harness.parallel.dcp.save_dcp_async`)."""
        return save_dcp_async(self.model, self.optimizer, directory, no_dist=True)

    def written_files(self, directory: str) -> list[str]:
        return written_dcp_files(directory, 0)

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` (or DDP / FSDP2 at any world size) wrote; a checkpoint without
        ``dcp/`` is read as the older ``model.pt`` / ``optimizer.pt``."""
        if not os.path.isdir(os.path.join(directory, DCP_DIR)):
            return super().load(directory)
        load_dcp(self.model, self.optimizer, directory, no_dist=True)
