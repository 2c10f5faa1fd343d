"""The initial weights a layout starts from, and what building them cost this rank (run under torchrun
by tests/test_init.py).

``python -m torch.distributed.run --nproc_per_node N tests/init_probe.py OUT [overrides]`` builds the
model on the meta device and the harness's backend from ``overrides`` as the trainer does
(``build_model(device="meta")`` -> ``backend.parallelize(init=init_weights)`` -> ``build_optimizer``),
then writes the whole model gathered on rank 0 to ``OUT.pt`` (not with ``--no-gather``) and, per
rank, ``OUT.rank<r>.json``: the peak RSS grown while building (bytes), the bytes of this rank's
parameter shards (DeepSpeed ZeRO-3: its partitions, ``p.ds_tensor``) and of the largest parameter,
and the model's full fp32 bytes.
"""

import functools
import json
import os
import resource
import sys

import torch
from torch.distributed.tensor import DTensor


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_bytes(p: torch.Tensor) -> int:
    """The bytes of ``p`` this rank stores: a DTensor's local shard, a DeepSpeed ZeRO-3 parameter's
    partition (``p.ds_tensor``) plus whatever whole data it still holds, or a plain tensor."""
    if isinstance(p, DTensor):
        p = p.to_local()
    partition = getattr(p, "ds_tensor", None)
    own = p.numel() * p.element_size()
    return own + (partition.numel() * partition.element_size() if partition is not None else 0)


def main(out: str, overrides: list[str], gather: bool = True) -> None:
    from omegaconf import open_dict

    from harness.config import compose_checked, to_object
    from harness.config.validate import resolve_batch_sizes
    from harness.dist import read_env
    from harness.model import build_model
    from harness.parallel import ParallelDims, build_backend
    from harness.weights import init_weights, unique_parameters

    composed = compose_checked(overrides)
    with open_dict(composed):
        del composed["hydra"]
    cfg = to_object(composed)
    env = read_env("cpu")
    dims = ParallelDims.from_config(cfg.parallel, env.world_size)
    batch = resolve_batch_sizes(cfg.train, dims.dp)
    backend = build_backend(cfg.parallel, env, dims, batch, cfg.optim, comm_timing=False)
    vocab = cfg.model.vocab_size
    before = rss_bytes()
    model = build_model(cfg.model, vocab, cfg.seed, None, device="meta")
    full = sum(p.numel() * 4 for _, p in unique_parameters(model))
    largest = max(p.numel() * 4 for _, p in unique_parameters(model))
    backend.parallelize(model, init=functools.partial(init_weights, model=cfg.model, seed=cfg.seed))
    grown = peak_rss_bytes() - before
    local = sum(local_bytes(p) for _, p in unique_parameters(backend.unwrapped()))
    backend.build_optimizer(cfg.optim)
    if gather:
        state = backend.full_state_dict()
        if env.is_main:
            torch.save(state, out + ".pt")
    with open(f"{out}.rank{env.rank}.json", "w") as f:
        json.dump({"grown": grown, "local": local, "largest": largest, "full": full}, f)
    backend.barrier()
    backend.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    gather = "--no-gather" not in args
    main(*[a for a in args if a != "--no-gather"][:1], [a for a in args[1:] if a != "--no-gather"], gather)
    # Its files are written and closed: skip the interpreter's teardown, where a DeepSpeed ZeRO-3 rank
    # aborted once under load ("terminate called without an active exception", exit -6).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
