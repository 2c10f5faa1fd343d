"""``torch.distributed.checkpoint`` files of a backend: ``<checkpoint>/dcp``, the format of one process,
DDP and FSDP2 alike (parameter names as keys, as ``get_state_dict`` gives them), so a checkpoint
reshards across world sizes and continues under any of those backends."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

DCP_DIR = "dcp"


def save_dcp(module: torch.nn.Module, optimizer, directory: str, no_dist: bool = False) -> None:
    """Write ``{"model", "optim"}`` of ``module`` / ``optimizer`` to ``<directory>/dcp`` (every rank its
    part; ``no_dist``: one process without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    with quiet(no_dist):
        dcp.save(
            {"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, DCP_DIR), no_dist=no_dist
        )


def load_dcp(module: torch.nn.Module, optimizer, directory: str, no_dist: bool = False) -> None:
    """Read what :func:`save_dcp` wrote at any world size into ``module`` / ``optimizer`` (resharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(module, optimizer)
    state = {"model": msd, "optim": osd}
    with quiet(no_dist):
        dcp.load(state, checkpoint_id=os.path.join(directory, DCP_DIR), no_dist=no_dist)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def quiet(no_dist: bool = True):
    """With ``no_dist``, silence DCP's warning that it runs without a process group (the intent)."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings(
                "ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized"
            )
        yield
