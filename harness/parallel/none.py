"""``parallel=none``: one process, one device, no collectives."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from harness.parallel.base import Backend

DCP_DIR = "dcp"  # as harness.parallel.distributed: one format for every backend but DeepSpeed


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

    def save(self, directory: str) -> None:
        """``<directory>/dcp``: ``{"model", "optim"}`` as ``get_state_dict`` gives them (parameter names
        as keys, as under DDP and FSDP2)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        with no_process_group():
            dcp.save(
                {"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, DCP_DIR), no_dist=True
            )

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` (or DDP / FSDP2 at any world size) wrote; a checkpoint without
        ``dcp/`` is read as the older ``model.pt`` / ``optimizer.pt``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = os.path.join(directory, DCP_DIR)
        if not os.path.isdir(path):
            return super().load(directory)
        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        with no_process_group():
            dcp.load(state, checkpoint_id=path, no_dist=True)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )


@contextlib.contextmanager
def no_process_group():
    """Silences DCP's warning that it runs without a process group (which is the intent here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized"
        )
        yield
