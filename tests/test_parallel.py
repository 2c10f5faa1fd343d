"""Backend pieces that need no process group: the generated DeepSpeed config, the comm tracker."""

import json

import pytest
import torch

from harness.config import DeepSpeedConfig
from harness.errors import ConfigError
from harness.parallel import comm
from harness.parallel.deepspeed import deepspeed_config


def test_deepspeed_config_is_generated_and_user_config_merged(tmp_path):
    cfg = DeepSpeedConfig(zero_stage=3, offload_optimizer=True)
    ds = deepspeed_config(cfg, micro_batch_size=2, accumulation=4, world_size=8, grad_clip=1.0, cuda=True)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 1.0
    user = {
        "zero_optimization": {"overlap_comm": True},
        "activation_checkpointing": {"partition_activations": True},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    for given in (user, str(path)):
        merged = deepspeed_config(DeepSpeedConfig(ds_config=given), 2, 4, 8, 1.0, cuda=False)
        assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged, not replaced
        assert merged["activation_checkpointing"] == {"partition_activations": True}
        assert merged["bf16"] == {"enabled": False}


def test_deepspeed_config_conflicts_and_bad_files_are_errors(tmp_path):
    bad = DeepSpeedConfig(ds_config={"train_micro_batch_size_per_gpu": 16})
    with pytest.raises(
        ConfigError, match=r"sets train_micro_batch_size_per_gpu=16, .* set train.micro_batch_size"
    ):
        deepspeed_config(bad, 2, 4, 8, 1.0, cuda=False)
    with pytest.raises(ConfigError, match=r"parallel.ds_config='.*missing.json' is not a readable JSON file"):
        deepspeed_config(DeepSpeedConfig(ds_config=str(tmp_path / "missing.json")), 2, 4, 8, 1.0, False)


def test_tracker_unions_intervals_and_counts_bytes():
    tr = comm.CommTracker()
    tr._record(comm._Call("all_reduce", 400, 2, start=0.0, end=1.0))
    tr._record(comm._Call("all_gather", 800, 2, start=0.5, end=1.5))  # overlaps the first
    tr._record(comm._Call("reduce_scatter", 800, 2, start=3.0, end=3.5))
    tr._blocked(0.25)
    s = tr.stats()
    assert s.comm_s == pytest.approx(2.0)  # [0, 1.5] + [3, 3.5]
    assert s.comm_exposed_s == pytest.approx(0.25)
    assert s.comm_bytes == 2000 and s.bytes_by_op == {
        "all_reduce": 400,
        "all_gather": 800,
        "reduce_scatter": 800,
    }
    bus = 400 * 2 * (1 / 2) + 800 * (1 / 2) + 800 * (1 / 2)  # nccl-tests bus factors at n=2
    assert s.busbw_gbps == pytest.approx(bus / 2.0 / 1e9)
    tr.reset()
    assert tr.stats().comm_bytes == 0


def test_payload_bytes_positional_and_keyword():
    t = torch.zeros(10, dtype=torch.float32)
    names = ("output", "input", "op", "group", "async_op")
    assert comm._payload((torch.zeros(5), t), {}, names, 1) == 40
    assert comm._payload((), {"output": torch.zeros(5), "input": t}, names, 1) == 40
    assert comm._payload(([t, t], t), {}, ("tensor_list", "tensor"), "list0") == 80


def test_deepspeed_config_typo_is_an_error():
    typo = DeepSpeedConfig(ds_config={"zero_optimisation": {"stage": 1}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"
    ):
        deepspeed_config(typo, 2, 4, 8, 1.0, cuda=False)


def test_checkpoint_format_must_suit_the_backend():
    from types import SimpleNamespace

    from harness.checkpoint import CheckpointManager
    from harness.errors import CheckpointError
    from harness.parallel import backend_class

    def _check_format(path, saved, parallel, world_size):
        cls = backend_class(parallel)
        backend = SimpleNamespace(
            name=parallel, checkpoint_format=cls.checkpoint_format, reshardable=cls.reshardable
        )
        env = SimpleNamespace(world_size=world_size)
        CheckpointManager(None, "run", env, backend, {}, None)._check_format(path, saved)

    _check_format("ck", {"parallel": "fsdp", "world_size": 2}, "ddp", 1)  # dcp reshards: fine
    _check_format("ck", {"parallel": "deepspeed", "world_size": 2}, "deepspeed", 2)
    with pytest.raises(CheckpointError, match=r"written by parallel=none, which parallel=fsdp cannot load"):
        _check_format("ck", {"parallel": "none", "world_size": 1}, "fsdp", 2)
    with pytest.raises(
        CheckpointError, match=r"DeepSpeed at world size 2, .* resume only at that world size \(now 1\)"
    ):
        _check_format("ck", {"parallel": "deepspeed", "world_size": 2}, "deepspeed", 1)


def test_groups_made_outside_the_mesh_are_labelled_by_the_dimension_they_span():
    """DeepSpeed's ZeRO-1/2 reduce gradients over its own copy of the world group
    (``dist.new_group(range(world))``): its traffic is ``dp_shard``'s, not a process-group id."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from harness.parallel.dims import ParallelDims

    if dist.is_initialized():  # left by an earlier in-process one-rank run that failed on purpose
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        dims = ParallelDims(1, 2, 1, 2)  # ZeRO at world 2: dp_shard spans the world
        tr = comm.CommTracker(group_dims=dims.group_dims("cpu"), rank_dims=dims.rank_dims("cpu"))
        clone = dist.new_group(ranks=[0, 1])  # deepspeed.utils.groups._clone_world_group
        assert clone.group_name not in tr.group_dims
        # torch's own all_reduce (an earlier in-process run may have installed the tracker's wrapper)
        all_reduce = comm._wrap(getattr(dist.all_reduce, "__wrapped__", dist.all_reduce), "all_reduce", 0)
        saved, comm._TRACKER = comm._TRACKER, tr
        try:
            all_reduce(torch.zeros(10), group=clone)
            all_reduce(torch.zeros(1))
        finally:
            comm._TRACKER = saved
        assert tr.stats().by_dim["dp_shard"]["bytes_by_op"] == {"all_reduce": 44}
        assert list(tr.stats().by_dim) == ["dp_shard"]
        assert tr.describe_last().startswith("all_reduce of 4 bytes over dp_shard (2 ranks)")
    finally:
        dist.destroy_process_group()


def test_adamw_decays_a_zero3_parameter_by_its_whole_shape():
    """A ZeRO-3 partitioned parameter holds an empty 1-D placeholder and its whole shape in ``ds_shape``:
    a matrix is decayed, a norm gain is not (grouped by the placeholder, every parameter lost its decay
    and ZeRO-3's second step left one process's by 3e-5)."""
    from harness.config import OptimConfig
    from harness.parallel.base import build_adamw

    net = torch.nn.Module()
    for name, shape in (("weight", (4, 3)), ("gain", (4,))):
        p = torch.nn.Parameter(torch.empty(0))
        p.ds_shape = torch.Size(shape)
        net.register_parameter(name, p)
    opt = build_adamw(net, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    assert [(g["weight_decay"], [p.ds_shape for p in g["params"]]) for g in opt.param_groups] == [
        (0.1, [torch.Size([4, 3])]),
        (0.0, [torch.Size([4])]),
    ]
