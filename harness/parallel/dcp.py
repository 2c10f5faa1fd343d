"""``torch.distributed.checkpoint`` files of a backend: ``<checkpoint>/dcp``, the format of one process,
DDP and FSDP2 alike (parameter names as keys, as ``get_state_dict`` gives them), so a checkpoint
reshards across world sizes and continues under any of those backends."""

from __future__ import annotations

import contextlib
import os
import warnings
from concurrent.futures import Future

import torch

DCP_DIR = "dcp"
_NO_DIST_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized"


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


def save_dcp_async(
    module: torch.nn.Module, optimizer, directory: str, process_group=None, no_dist: bool = False
) -> Future:
    """:func:`save_dcp` with ``torch.distributed.checkpoint.async_save``: this rank's state is copied
    into CPU memory now (the staging: model shard + optimizer state, as many bytes as the rank holds),
    then written by a background thread whose collectives run on ``process_group`` (a gloo group of
    the checkpoint's own, not the training's). Returns the write's future (its ``result()`` raises
    what the write raised, e.g. DCP's ``CheckpointException``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    if no_dist:  # the background thread warns too, outside any catch_warnings of this one
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
    out = dcp.async_save(
        {"model": msd, "optim": osd},
        checkpoint_id=os.path.join(directory, DCP_DIR),
        process_group=process_group,
        no_dist=no_dist,
    )
    return getattr(out, "upload_completion", out)  # an AsyncSaveResponse with an asynchronous stager


def written_dcp_files(directory: str, rank: int) -> list[str]:
    """The files of ``<directory>/dcp`` that rank ``rank`` wrote (paths relative to ``directory``):
    DCP names a rank's data files ``__<rank>_<n>.distcp``; rank 0, the coordinator, also writes
    ``.metadata``."""
    root = os.path.join(directory, DCP_DIR)
    prefix = f"__{rank}_"
    names = [n for n in os.listdir(root) if n.startswith(prefix) and n.endswith(".distcp")]
    if rank == 0:
        names.append(".metadata")
    return [os.path.join(DCP_DIR, n) for n in sorted(names)]


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
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield
