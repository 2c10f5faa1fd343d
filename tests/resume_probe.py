"""What each rank checks when the ranks choose a checkpoint together (run under torchrun by
tests/test_resume_shares.py).

``python -m torch.distributed.run --nproc_per_node N tests/resume_probe.py OUT ROOT [CHECKPOINT]``
creates a gloo process group and calls :func:`harness.checkpoint.latest_checkpoint` on ``ROOT`` with
``check=True`` over every rank, then (with ``CHECKPOINT``) :meth:`CheckpointManager.find_resume` with
``checkpoint.resume=CHECKPOINT``. Per rank it writes ``OUT/rank_<r>.json``: the chosen checkpoint,
the files this rank hashed (relative to ``ROOT``, in order), the ``harness`` warnings it logged, and
find_resume's path or error message.
"""

import json
import logging
import os
import sys
from types import SimpleNamespace

import torch.distributed as dist

from harness import checkpoint as ckpt
from harness.dist import broadcast_object, gather_object
from harness.errors import HarnessError


def main(out: str, root: str, resume: str | None) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("harness").addHandler(handler)
    peers = ckpt.Peers(rank, world, gather_object, broadcast_object)
    chosen = ckpt.latest_checkpoint(root, check=True, peers=peers)
    hashed = [os.path.relpath(p, root) for p, _ in ckpt.HASHED]
    found = None
    if resume:
        env = SimpleNamespace(rank=rank, world_size=world)
        backend = SimpleNamespace(
            name="fsdp",
            checkpoint_format="dcp",
            reshardable=True,
            gather_object=gather_object,
            broadcast_object=broadcast_object,
        )
        manager = ckpt.CheckpointManager(SimpleNamespace(resume=resume), "run", env, backend, {}, None)
        try:
            found = manager.find_resume()
        except HarnessError as e:
            found = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, f"rank_{rank}.json"), "w") as f:
        json.dump({"chosen": chosen, "hashed": hashed, "warnings": warnings, "find_resume": found}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
