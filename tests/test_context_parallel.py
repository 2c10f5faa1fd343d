"""Context parallelism (``parallel.cp``): each sequence split over cp ranks in two mirrored chunks,
attention over the all-gathered keys and values, and the losses, gradient norms, validation losses
and token counts of one process (seq 1024, gloo), through a kill and a resume at cp 2 -> 1 -> 2."""

import os
from collections import Counter

import pytest
import torch
from conftest import SMALL, compose, read_metrics, torchrun_train

from harness.config import to_object, validate
from harness.errors import ConfigError
from harness.parallel.context import chunk_positions

CP = [
    *SMALL,
    "data.seq_len=1024",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.tie_word_embeddings=false",
]
FSDP_CP2 = ["parallel=fsdp", "parallel.cp=2"]
KEYS = ("step", "loss", "grad_norm", "val_loss", "lr", "tokens", "tokens_total", "global_batch_size")
KEYS += ("tokens_per_second", "step_time_s")


def test_each_rank_holds_a_head_chunk_and_its_mirror():
    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    parts = torch.cat([chunk_positions(16, 4, r) for r in range(4)])
    assert sorted(parts.tolist()) == list(range(16))  # every position once


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["parallel=ddp", "parallel.cp=2"],
            "parallel.cp=2 needs parallel=fsdp (FSDP2 shards over dp_shard x cp and sums the cp ranks' "
            "gradients); parallel=ddp does not",
        ),
        (
            [*FSDP_CP2, "data.seq_len=1022"],
            "data.seq_len=1022 must be a multiple of 2 x parallel.cp = 4 (each cp rank holds two equal "
            "chunks of every sequence, a head and its mirrored tail)",
        ),
        (
            [*FSDP_CP2, "data.document_mask=true"],
            "parallel.cp=2 with data.document_mask=true is not supported yet; set data.document_mask=false",
        ),
        (
            [*FSDP_CP2, "parallel.tp=2", "parallel.sequence_parallel=true"],
            "parallel.cp=2 with parallel.sequence_parallel=true is not supported yet; set "
            "parallel.sequence_parallel=false",
        ),
        (
            [*FSDP_CP2, "parallel.tp=2", "parallel.loss_parallel=true"],
            "parallel.cp=2 with parallel.loss_parallel=true is not supported yet; set "
            "parallel.loss_parallel=false",
        ),
        (
            [*FSDP_CP2, "model.attn_implementation=eager"],
            "parallel.cp=2 runs its own attention (SDPA over the all-gathered keys and values), not "
            "model.attn_implementation=eager; set model.attn_implementation=sdpa",
        ),
        (
            [*FSDP_CP2, "parallel.cp=3"],
            "parallel.pp=1 x parallel.cp=3 x parallel.tp=1 does not divide world_size=4 (launch a multiple "
            "of 3 processes, e.g. torchrun --nproc_per_node 3)",
        ),
        (
            [*FSDP_CP2, "parallel.dp_replicate=4", "parallel.tp=2"],  # world 8: 2 data-parallel ranks
            "parallel.dp_replicate=4 must divide the data-parallel ranks world_size / (cp=2 x tp=2) = 8 / 4 "
            "= 2 (replicas x shards)",
        ),
    ],
)
def test_layouts_context_parallelism_cannot_run_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(to_object(compose(*CP, *overrides)), 8 if "parallel.tp=2" in overrides else 4)
    assert str(e.value) == message


def _run(nproc, run_dir, corpus, *overrides, env=None, check=True):
    args = [*CP, "train.max_steps=6", "eval.every=3", "checkpoint.every=3", "checkpoint.export_hf=false"]
    args += [f"data.path={corpus}", f"hydra.run.dir={run_dir}", *overrides]
    return torchrun_train(nproc, *args, env=env, check=check)


def _rows(run_dir):
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(run_dir)]


def _close(rows, ref, rel=1e-5):
    """Loss, grad norm and validation loss within ``rel`` of ``ref``; the step's tokens, the LR and the
    batch exactly (tokens counted once, not cp times)."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 7))
    for r, f in zip(rows, ref):
        for k in ("loss", "grad_norm", "val_loss"):
            assert (r[k] is None) == (f[k] is None), (r, f)
            assert r[k] is None or abs(r[k] - f[k]) <= rel * abs(f[k]), (k, r, f)
        for k in ("lr", "tokens", "tokens_total", "global_batch_size"):
            assert r[k] == f[k], (k, r, f)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("cp") / "one"
    _run(1, run_dir, small_corpus, "parallel=none")
    return _rows(run_dir)


def _plan(*overrides):
    """``harness.plan``'s report for the tests' config + ``overrides`` (a corpus of 10^9 tokens, not read)."""
    from harness.plan import make_plan

    return make_plan(to_object(compose(*CP, "plan.dataset_tokens=1000000000", *overrides, schema="plan")))


def test_the_plan_halves_each_ranks_tokens_and_adds_the_gathered_keys_and_values():
    """cp=2 halves each rank's activations and logits and adds every layer's all-gathered keys and
    values (kept for its backward); the layouts table lists cp 1, 2, 4 (x tp) and the config's own cp,
    and cp's bytes per step are each layer's keys and values gathered, and their gradients
    reduce-scattered, per micro-batch."""
    from harness.plan import render_text

    flat = "schedule.batch_warmup.start_global_batch_size=null"  # no ramp: 4 data-parallel ranks at cp=1
    one, two = (_plan("parallel=fsdp", f"parallel.cp={cp}", "plan.gpus=4", flat).memory for cp in (1, 2))
    kv = (
        2 * 2 * 1024 * 2 * 2 * 16
    )  # per layer: keys and values of micro-batch 2 x 1,024 tokens x 2 heads x 16, bf16
    assert two.activations == one.activations / 2 + 2 * kv
    pl = _plan(*FSDP_CP2, "plan.gpus=4", flat)
    assert [(r["cp"], r["tp"]) for r in pl.layouts] == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]
    odd = _plan("parallel=fsdp", "parallel.cp=3", "data.seq_len=1020", "plan.gpus=6", flat)  # its own cp too
    assert [(r["cp"], r["tp"]) for r in odd.layouts] == [(1, 1), (1, 2), (2, 1), (3, 1), (3, 2)]
    # cp spanning the world: a run logs FSDP2's dp_shard_cp traffic under cp (one group), and the plan says so
    note = "(cp spans the world: a run's comm_by_dim counts dp_shard_cp's bytes under cp, one group)"
    assert note in render_text(_plan(*FSDP_CP2, "plan.gpus=2")).splitlines()
    assert note not in render_text(pl)
    per = 2 * 2 * 2 * 2 * 1024 * 32 * 2  # 2 micro-batches x 2 layers x (keys, values) x [2, 1024, 32] bf16
    assert pl.communication["cp"] == {"all_gather": per, "reduce_scatter": per}


def _saved_by_forward(fake: bool) -> Counter:
    """``(shape, bytes)`` of each storage autograd saves in one forward of rank 0 of cp=2 (world 2, under
    torch's fake process group: the all-gathers return at once), with real tensors or, as the dry run
    builds it (meta model, ``to_empty`` under the mode), under ``FakeTensorMode``."""
    import contextlib

    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from harness.data.loader import MicroBatch
    from harness.dist import DistEnv
    from harness.model import build_model
    from harness.parallel.context import ContextParallel
    from harness.parallel.dims import ParallelDims
    from harness.parallel.loss import token_loss_sum
    from harness.weights import to_empty_tied

    cfg = to_object(compose(*CP, *FSDP_CP2))
    if dist.is_initialized():  # an earlier test's in this process (as harness.dryrun._build does)
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        dims = ParallelDims.from_config(cfg.parallel, 2)
        cp = ContextParallel(dims, DistEnv(0, 0, 2, torch.device("cpu")))
        cp.fake_trace = fake  # as the dry run sets it
        mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        model = build_model(cfg.model, 256, 0, None, device="meta" if fake else "cpu")
        saved: dict[int, tuple] = {}

        def pack(t):
            st = t.untyped_storage()
            saved[st._cdata] = (tuple(t.shape), st.nbytes())
            return t

        with mode:
            if fake:
                to_empty_tied(model, "cpu")
            cp.apply(model)
            mb = cp.shard(MicroBatch.from_sequences(torch.zeros((1, 1025), dtype=torch.long)))
            kernel = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if fake else contextlib.nullcontext()
            with kernel, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                token_loss_sum(model, mb, None)
    finally:
        dist.destroy_process_group()
    return Counter(saved.values())


def test_the_dry_runs_fake_cp_step_saves_what_a_real_one_does():
    """The dry run's stand-in (``is_causal=True`` under FakeTensorMode, ``ContextParallel.fake_trace``)
    keeps the same tensors for backward as the real cp attention, storage for storage --
    each layer's gathered keys and values ``[1, 2 kv heads, 1024, 16]`` included -- but for the real CPU
    run's materialized lower-right mask of the tail chunk (256 queries x 1,024 keys, 4 bytes each, one per
    layer), which the GPU's kernel does not make."""
    real, fake = _saved_by_forward(False), _saved_by_forward(True)
    assert real[((1, 2, 1024, 16), 1024 * 2 * 16 * 4)] == fake[((1, 2, 1024, 16), 1024 * 2 * 16 * 4)] == 2 * 2
    assert fake - real == Counter()
    assert real - fake == Counter({((256, 1024), 256 * 1024 * 4): 2})


def _cp_bytes(record, micro: int, kv_heads: int, layers: int = 2) -> dict:
    """Per micro-batch and layer, forward: the keys' and the values' all-gather, each ``[micro, kv_heads,
    seq 1024, head_dim 16]`` fp32 gathered; backward: their gradients reduce-scattered, the same size."""
    per = record["gradient_accumulation_steps"] * layers * 2 * (micro * kv_heads * 1024 * 16 * 4)
    return {"all_gather": per, "reduce_scatter": per, "all_reduce": 4}  # + the loss's partial sums (fp32)


@pytest.mark.slow
@pytest.mark.distributed
def test_cp2_at_world_2_matches_one_process_and_counts_tokens_once(tmp_path, small_corpus, one_process):
    """cp=2 at world 2 (FSDP2 over dp_shard x cp = the 2 cp ranks), the batch ramp and accumulation on:
    the one process's losses, gradient norms and validation losses (within 1e-5), the same tokens per
    step, and the keys and values all-gathered over cp to the byte."""
    proc = _run(2, tmp_path, small_corpus, *FSDP_CP2)
    assert "(micro 2 x accumulation 4 x dp 1; cp 2, world 2)" in proc.stdout
    rows = _rows(tmp_path)
    _close(rows, one_process)
    for r in rows:  # tokens/s (and MFU, from it) count the whole sequences' tokens once
        assert r["tokens_per_second"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-9)
    for r in read_metrics(tmp_path):
        # the cp group is the world here, and FSDP2's (dp_shard 1 x cp 2: the same ranks) shares it: its
        # gathers and reductions come on top of attention's (separated at world 4, below)
        assert set(r["comm_by_dim"]) == {"cp"}
        cp, attention = r["comm_by_dim"]["cp"]["bytes_by_op"], _cp_bytes(r, micro=2, kv_heads=2)
        assert all(cp[op] > attention[op] for op in ("all_gather", "reduce_scatter")), r["step"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [["train.micro_batch_size=1"], ["parallel.tp=2"], ["parallel.pp=2"]],
    ids=["dp_shard2", "tp2", "pp2"],
)
def test_cp2_x_another_dimension_at_world_4_matches_one_process(tmp_path, small_corpus, one_process, layout):
    """cp=2 x dp_shard=2 (FSDP2 over the flattened dp_shard x cp), cp=2 x tp=2 (each rank's chunks
    through its heads) and pp=2 x cp=2 (1F1B; each stage's rotary tables at the rank's chunk positions):
    the one process's rows; the cp group moves only attention's keys and values."""
    _run(4, tmp_path, small_corpus, *FSDP_CP2, *layout)
    _close(_rows(tmp_path), one_process)
    tp, pp = layout == ["parallel.tp=2"], layout == ["parallel.pp=2"]
    for r in read_metrics(tmp_path):  # tp splits the 2 kv heads; a pipeline stage holds 1 of the 2 layers
        expected = _cp_bytes(
            r, micro=1 if layout == ["train.micro_batch_size=1"] else 2, kv_heads=1 if tp else 2
        )
        if pp:  # steps 1, 3, 5 build a schedule (2, 3, 4 micro-batches): its shape inference runs a forward
            if r["step"] % 2:
                continue
            expected = _cp_bytes(r, micro=2, kv_heads=2, layers=1)
        assert r["comm_by_dim"]["cp"]["bytes_by_op"] == expected, r["step"]
        assert set(r["comm_by_dim"]) == (
            {"cp", "dp_shard_cp", "tp"}
            if tp
            else {"cp", "dp_shard_cp", "pp"}
            if pp
            else {"cp", "dp_shard", "dp_shard_cp"}
        )
    if not tp:  # the plan's bytes are the run's (step 6: full, no new schedule), FSDP2's over dp_shard x cp
        plan = _plan(*FSDP_CP2, *layout, "plan.gpus=4", "train.dtype=float32").communication
        last = read_metrics(tmp_path)[-1]["comm_by_dim"]
        assert {d: {op: last[d]["bytes_by_op"][op] for op in ops} for d, ops in plan.items()} == plan
        assert set(plan) == ({"cp", "dp_shard_cp", "pp"} if pp else {"cp", "dp_shard_cp"})


@pytest.mark.slow
@pytest.mark.distributed
def test_a_kill_at_cp_2_resumes_at_cp_1_and_the_run_finishes_at_cp_2(tmp_path, small_corpus, one_process):
    """cp=2 SIGKILLed on rank 1 as step 6 starts; continued at one process from the step-3 checkpoint
    and stopped after step 4; finished at cp=2: DCP reshards across cp degrees (the FSDP2 shards of
    dp_shard x cp), and the rows are the one process's throughout."""
    killed = _run(2, tmp_path, small_corpus, *FSDP_CP2, env={"HARNESS_FAULT": "kill:6:1"}, check=False)
    assert killed.returncode != 0 and "step_00000003" in os.listdir(tmp_path / "checkpoints")
    proc = _run(1, tmp_path, small_corpus, "parallel=none", "train.stop_at_step=4")
    assert f"resumed from {tmp_path}/checkpoints/step_00000003 at step 3" in proc.stdout
    proc = _run(2, tmp_path, small_corpus, *FSDP_CP2)
    assert f"resumed from {tmp_path}/checkpoints/step_00000004 at step 4" in proc.stdout
    _close(_rows(tmp_path), one_process)


def test_the_readmes_long_context_command_is_a_valid_config_at_world_32():
    from test_readme import readme_overrides

    batch = validate(to_object(compose(*readme_overrides("run_name=llama3-8b-128k"))), 32)
    assert (batch.world_size, batch.micro_batch_size, batch.gradient_accumulation_steps) == (1, 1, 16)
