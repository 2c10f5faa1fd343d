"""Bytes FSDP2 holds between micro-batches, measured on this rank (run under torchrun by
tests/test_plan.py::test_plan_counts_the_gradients_fsdp_holds_between_micro_batches).

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_memory_probe.py OUT.json [overrides]``
builds the model and the harness's FSDP backend from ``overrides``, runs one step of two micro-batches
through ``backend.accumulate`` / ``backend.backward`` as the trainer does, and writes rank 0's live tensor
bytes (every tensor Python can reach, and its ``.grad``, counted once per storage) above the sharded
model's, after the first micro-batch and after the last, with the model's parameter count.
"""

import gc
import json
import sys
import time
import warnings

import torch
from torch.distributed.tensor import DTensor


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage reachable from a Python tensor object or its ``.grad``."""
    gc.collect()
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .grad of a non-leaf
        for obj in gc.get_objects():
            if not isinstance(obj, torch.Tensor):
                continue
            for t in (obj, obj.grad if obj.is_leaf else None):
                if t is None:
                    continue
                t = t._local_tensor if isinstance(t, DTensor) else t
                if t.device.type == "meta":
                    continue
                st = t.untyped_storage()
                if st.data_ptr():
                    storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    return sum(storages.values())


def settled_bytes() -> int:
    """:func:`live_tensor_bytes` once two readings 20 ms apart agree (at most 2 s).

    A CI run (stop 28) once counted one layer's all-gather buffer (164,352 bytes = 41,088 fp32 parameters) as
    held after the first micro-batch; 80 runs here (40 under full CPU load) never did. The likely cause:
    gloo's worker thread drops its reference to a finished work after waking the caller, and that
    release waits for the GIL, so for a moment the buffer outlives its ``wait()``."""
    last = live_tensor_bytes()
    for _ in range(100):
        time.sleep(0.02)
        now = live_tensor_bytes()
        if now == last:
            return now
        last = now
    return last


def main(out: str, overrides: list[str]) -> None:
    from omegaconf import open_dict

    from harness.config import compose_checked, to_object
    from harness.dist import read_env
    from harness.model import build_model, count_parameters
    from harness.parallel.dims import ParallelDims
    from harness.parallel.distributed import FSDPBackend

    composed = compose_checked(["parallel=fsdp", *overrides])
    with open_dict(composed):
        del composed["hydra"]
    cfg = to_object(composed)
    env = read_env("cpu")
    backend = FSDPBackend(env, cfg.parallel, ParallelDims.from_config(cfg.parallel, env.world_size), False)
    model = build_model(cfg.model, cfg.model.vocab_size, cfg.seed, None)
    params = count_parameters(model)
    backend.parallelize(model)
    g = torch.Generator().manual_seed(env.rank)
    batches = [
        torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=g)
        for _ in range(2)
    ]
    base = settled_bytes()
    held = []
    for i, x in enumerate(batches):
        with backend.accumulate(is_last=i == len(batches) - 1):
            backend.backward(backend.model(input_ids=x, labels=x).loss)
        held.append(settled_bytes() - base)
    if env.is_main:
        with open(out, "w") as f:
            json.dump({"params": params, "after_first": held[0], "after_last": held[1]}, f)
    backend.barrier()
    backend.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
