"""``python -m harness.plan ... plan.dry_run=true`` (harness/dryrun.py): rank 0 of a 64-GPU llama3_8b
run built through the real build path under the fake process group and FakeTensorMode, its traced
step held against the planner's arithmetic."""

from __future__ import annotations

import dataclasses
import functools

import conftest
import pytest

from harness.config import to_object
from harness.dryrun import GIB, device_refusal, dry_run
from harness.metrics import GPU_SPECS
from harness.plan import main, make_plan

compose = functools.partial(conftest.compose, schema="plan")

# one micro-batch per step (64 sequences over 64 data-parallel ranks), no activation checkpointing:
# the fastest llama3_8b step to trace (~16 s of CPU)
L8B_64 = [
    "model=llama3_8b",
    "model.vocab_size=128256",
    "parallel=fsdp",
    "parallel.param_dtype=bfloat16",
    "parallel.reduce_dtype=float32",
    "train.global_batch_size=64",
    "train.micro_batch_size=1",
    "train.max_steps=100",
    "plan.gpus=64",
    "plan.gpu=H200",
    "plan.dataset_tokens=15000000000000",
]


@pytest.fixture(scope="module")
def llama3_8b_64():
    cfg = to_object(compose(*L8B_64))
    plan = make_plan(cfg)
    return plan, dry_run(cfg, plan)


def _row(out, name):
    return next(r for r in out.rows if r["category"] == name)


def test_dry_run_model_state_equals_the_plans_sharded_bytes(llama3_8b_64):
    """Every dimension of llama3_8b divides by 64: rank 0's FSDP2 shards hold exactly the planner's
    4 p / 64 bytes of fp32 parameters and of gradients; AdamW's two moments are 8 p / 64 plus the
    fused kernel's fp32 step counter, 4 bytes per parameter tensor (32 x 9 + 3 = 291 tensors)."""
    plan, out = llama3_8b_64
    p = 8_030_261_248
    assert plan.memory.params == 4 * p / 64 == 501_891_328
    assert _row(out, "parameters")["max"] == 501_891_328
    assert _row(out, "gradients")["max"] == 501_891_328
    assert _row(out, "optimizer states")["max"] == 8 * p // 64 + 4 * 291
    assert out.most_bytes_rank == 0 and out.micro_batches_traced == 1
    assert out.state_bytes[0] == out.state_bytes[out.fewest_bytes_rank] == 12 * p // 64


def test_dry_run_differences_from_the_plan_are_the_known_ones(llama3_8b_64):
    """Where the planner's arithmetic and FSDP2's real step part, by a stated amount:
    gathered parameters: FSDP2's copy-out holds the flat all-gather buffer and the unsharded parameters
    at once, so the root unit (embedding + LM head, 128256 x 4096 x 2 bf16 each) counts twice: the plan's
    figure + 2 x 128256 x 4096 x 2 bytes, to 1e-3. Activations: Korthikanti's 34 s b h per layer (GPT's 4h
    MLP) undercounts Llama 3's SwiGLU (3.5h, three projections) and its fp32 logits: +50..65 %.
    Attention: only the flash kernel ran (out + log-sum-exp: O(seq) per head)."""
    plan, out = llama3_8b_64
    root = 2 * 128256 * 4096 * 2
    assert _row(out, "gathered params")["max"] == pytest.approx(plan.memory.gathered + root, rel=1e-3)
    ratio = _row(out, "activations")["max"] / plan.memory.activations
    assert 1.50 < ratio < 1.65, ratio
    assert set(out.attention_kernels) == {
        "_scaled_dot_product_flash_attention_for_cpu.default",
        "_scaled_dot_product_flash_attention_for_cpu_backward.default",
    }
    assert out.attention_kernels["_scaled_dot_product_flash_attention_for_cpu.default"] == 32
    named = [w.split(":")[0] for w in out.warnings]
    assert named == ["gathered params", "activations", "unsharded grads", "total tensors"]
    assert out.refusal is None  # 69.4 GiB of tensors fit the H200's 141 GiB
    assert out.traces[0].peak / GIB == pytest.approx(69.43, abs=0.01)


def test_dry_run_refuses_what_the_build_refuses(capsys):
    """Heads not divisible by tp: the trainer's own check, one error line, exit 2, nothing built."""
    code = main([*L8B_64, "plan.gpus=48", "parallel.tp=3", "plan.dry_run=true", "plan.png="])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: model.num_heads=32 is not divisible by parallel.tp=3 (each rank holds 1/tp)"]


@pytest.mark.parametrize(
    "layout, message",
    [
        (
            ["parallel.pp=2", "model.tie_word_embeddings=false", "train.micro_batch_size=1"],
            "parallel.pp=2 (one rank's stages under a schedule) yet: its memory per stage is the planner's "
            "estimate; plan with plan.dry_run=false",
        ),
    ],
    ids=["pp"],
)
def test_dry_run_refuses_the_layouts_it_does_not_trace(capsys, layout, message):
    """Pipeline layouts: the planner's estimate only, one line, exit 2."""
    args = ["parallel=fsdp", *layout, "plan.gpus=2", "plan.png=", "plan.dataset_tokens=1000000000"]
    assert main([*args, "plan.dry_run=true"]) == 2
    assert capsys.readouterr().err.strip() == f"error: plan.dry_run=true does not trace {message}"


def test_dry_run_traces_a_context_parallel_step():
    """cp=2 at world 2 (the default 4-layer model, seq 1024): each rank's two chunks of the sequence run
    the flash kernel once each per layer (8 forward, 8 backward calls), through the harness's cp
    attention with its all-gathers under the fake process group; the model state is sharded over
    FSDP2's dp_shard x cp = 2 coordinates (12 bytes per parameter / 2 each), as the plan says; the
    header names each mesh dimension (with HSDP at world 4, dp_replicate too)."""
    from harness.dryrun import render

    args = ["parallel=fsdp", "parallel.cp=2", "plan.gpus=2", "plan.png=", "data.seq_len=1024"]
    batch = [
        "train.micro_batch_size=1",
        "train.global_batch_size=1",
        "schedule.batch_warmup.start_global_batch_size=null",
    ]
    cfg = to_object(compose(*args, *batch))
    plan = make_plan(cfg)
    out = dry_run(cfg, plan)
    assert out.attention_kernels == {
        "_scaled_dot_product_flash_attention_for_cpu.default": 2 * 4,
        "_scaled_dot_product_flash_attention_for_cpu_backward.default": 2 * 4,
    }
    p = plan.params
    assert _row(out, "parameters")["max"] == plan.memory.params == 4 * p / 2
    assert out.state_bytes == {0: 12 * p // 2, 1: 12 * p // 2}  # coordinates 0 and 1 of dp_shard x cp
    head = render(out, plan, 1.0).splitlines()[0]
    assert head.startswith("== Dry run: rank 0 of 2 (fsdp, dp_shard 1 x cp 2;"), head
    assert out.refusal is None
    cfg = to_object(
        compose(*args, *batch, "plan.gpus=4", "parallel.dp_replicate=2", "train.global_batch_size=2")
    )
    plan = make_plan(cfg)
    head = render(dry_run(cfg, plan), plan, 1.0).splitlines()[0]
    assert head.startswith("== Dry run: rank 0 of 4 (fsdp, dp_replicate 2 x dp_shard 1 x cp 2;"), head


def test_dry_run_refuses_a_step_the_device_cannot_hold(llama3_8b_64):
    """The same step on an H100 (80 GB = 74.5 GiB): 69.4 GiB of tensors + 10 % reserve + 1 GiB context."""
    plan, out = llama3_8b_64
    h100 = dataclasses.replace(plan.memory, device_memory=GPU_SPECS["H100"][1])
    assert device_refusal(out.traces[0].peak, h100, "H100") == (
        "the dry run's step needs 77.4 GiB on rank 0 (69.4 GiB of tensors + 10% allocator reserve + 1 GiB "
        "CUDA context) > the H100's 75 GiB: the run would fail there"
    )
    assert device_refusal(out.traces[0].peak, plan.memory, "H200") is None


def test_dry_run_of_a_tied_model_in_json_counts_the_embedding_once(tmp_path, capsys):
    """The default (tiny, tied embeddings) model at 2 GPUs: the traced parameters equal the plan's (the
    LM head is the embedding, as in the real build; it was traced as a second copy, +25 %), in
    ``plan.format=json``; a backend the dry run cannot trace is refused before ``plan.png`` is written."""
    import json

    args = ["plan.dry_run=true", "parallel=fsdp", "plan.gpus=2", "train.max_steps=10", "plan.format=json"]
    assert main([*args, f"hydra.run.dir={tmp_path / 'ok'}"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["category"]: r for r in out["dry_run"]["rows"]}
    assert rows["parameters"]["max"] == rows["parameters"]["plan"] == 4_212_992 * 4 // 2
    assert out["plan"]["world_size"] == 2 and out["dry_run"]["refusal"] is None
    assert main(["plan.dry_run=true", f"hydra.run.dir={tmp_path / 'none'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: plan.dry_run=true traces parallel=fsdp (FSDP2, with parallel.tp); parallel=none is not "
        "traced yet: its memory is the planner's estimate"
    ]
    assert not (tmp_path / "none").exists()
