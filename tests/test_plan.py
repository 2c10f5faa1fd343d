"""harness.plan: the plan's steps and tokens are the trainer's, published runs' iteration counts,
parameter counts of published models, warnings, the CLI and its PNG."""

import functools
import json
import os
import subprocess
import sys

import conftest
import pytest
from conftest import REPO, SMALL, read_metrics, train_small

from harness.config import to_object
from harness.model import model_stats, resolve_vocab_size
from harness.plan import make_plan, schedule_series

PY = sys.executable
compose = functools.partial(conftest.compose, schema="plan")  # the plan command's schema
# Llama 3 8B (its real vocabulary) under FSDP2 with bf16 parameters and fp32 gradient reduction
L8B_FSDP = [
    "model=llama3_8b",
    "model.vocab_size=128256",
    "parallel=fsdp",
    "parallel.param_dtype=bfloat16",
    "parallel.reduce_dtype=float32",
]


def test_plan_equals_the_trainers_logged_steps_and_tokens(tmp_path, small_corpus):
    """A run with batch-size warmup and a token budget: the plan's step count, token total and
    per-step LR / batch sizes are the ones the trainer logs."""
    args = [
        f"data.path={small_corpus}",
        "train.max_steps=null",
        "train.max_tokens=5000",
        "schedule.batch_warmup.steps=0",
        "schedule.batch_warmup.tokens=1500",
    ]
    train_small(tmp_path / "run", small_corpus, *args)
    logged = read_metrics(tmp_path / "run")
    cfg = to_object(compose(*SMALL, *args))
    plan = make_plan(cfg)
    assert plan.dataset_tokens_exact
    assert plan.max_steps == logged[-1]["step"] == len(logged)
    assert plan.total_tokens == logged[-1]["tokens_total"] >= 5000
    series = schedule_series(cfg, plan)
    assert series["step"] == [r["step"] for r in logged]
    assert series["global_batch_size"] == [r["global_batch_size"] for r in logged]
    assert series["global_batch_size"][0] == 4 and series["global_batch_size"][-1] == 8  # the ramp is in it
    assert series["tokens_total"] == [r["tokens_total"] for r in logged]
    assert series["lr"] == pytest.approx([r["lr"] for r in logged], rel=1e-12)
    assert plan.batch_warmup_end_step == next(r["step"] for r in logged if r["global_batch_size"] == 8)


PUBLISHED = {
    # name: (model overrides, seq_len, global batch (sequences), token budget, published steps, published
    # params)
    "GPT-3 175B": (
        [
            "model.arch=gpt2",
            "model.hidden_size=12288",
            "model.num_layers=96",
            "model.num_heads=96",
            "model.intermediate_size=49152",
            "model.vocab_size=50257",
            "model.max_position_embeddings=2048",
        ],
        2048,
        1562,
        300_000_000_000,
        93_750,
        175e9,
    ),  # Brown et al. 2020: 300B tokens, 3.2M batch
    "LLaMA 2 70B": (
        [
            "model.hidden_size=8192",
            "model.num_layers=80",
            "model.num_heads=64",
            "model.num_kv_heads=8",
            "model.intermediate_size=28672",
            "model.vocab_size=32000",
            "model.tie_word_embeddings=false",
            "model.max_position_embeddings=4096",
        ],
        4096,
        976,
        2_000_000_000_000,
        500_000,
        69e9,
    ),  # Touvron et al. 2023: 2T tokens, 4M batch
    "LLaMA 3 405B": (
        [
            "model.hidden_size=16384",
            "model.num_layers=126",
            "model.num_heads=128",
            "model.num_kv_heads=8",
            "model.intermediate_size=53248",
            "model.vocab_size=128256",
            "model.tie_word_embeddings=false",
            "model.max_position_embeddings=8192",
        ],
        8192,
        1953,
        15_000_000_000_000,
        937_500,
        405e9,
    ),  # Llama 3 paper: 15T tokens, 16M batch
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_runs_iteration_counts(name):
    model, seq_len, batch, budget, steps, params = PUBLISHED[name]
    cfg = to_object(
        compose(
            *model,
            f"data.seq_len={seq_len}",
            f"train.global_batch_size={batch}",
            "train.micro_batch_size=1",
            "schedule.batch_warmup.start_global_batch_size=null",
            "train.max_steps=null",
            f"train.max_tokens={budget}",
            "eval.every=0",
            "schedule.warmup_steps=2000",
            f"plan.dataset_tokens={budget * 2}",
        )
    )
    plan = make_plan(cfg, dataset=(budget * 2, False, "given", None))
    print(
        f"{name}: {plan.max_steps:,} steps x {plan.global_batch_tokens:,} tokens = {plan.total_tokens:,}; "
        f"{plan.params / 1e9:.1f}B parameters"
    )
    assert plan.max_steps == -(-budget // (batch * seq_len))  # ceil: the first step reaching the budget
    assert abs(plan.max_steps - steps) / steps < 0.001
    assert abs(plan.params - params) / params < 0.02
    assert plan.total_tokens >= budget > plan.total_tokens - batch * seq_len


def test_published_parameter_counts_of_presets():
    assert (
        model_stats(
            to_object(compose("model=llama3_8b", "model.vocab_size=128256")).model, 128256, 8192
        ).params
        == 8_030_261_248
    )


def test_warnings_instead_of_errors(small_corpus):
    cfg = to_object(
        compose(*SMALL, f"data.path={small_corpus}", "train.max_steps=10", "schedule.warmup_steps=50")
    )
    plan = make_plan(cfg)
    assert any("schedule.warmup_steps=50 > train.max_steps=10" in w for w in plan.warnings)
    assert any("tokens per parameter (< 1)" in w for w in plan.warnings)
    cfg = to_object(
        compose(
            "model=llama3_8b",
            "model.vocab_size=128256",
            "train.micro_batch_size=16",
            "train.global_batch_size=16",
            "data.seq_len=8192",
            "plan.gpu=A100",
            "schedule.batch_warmup.start_global_batch_size=null",
            "eval.every=0",
        )
    )
    plan = make_plan(cfg, dataset=(10**12, False, "given", None))
    assert any("exceeds the A100's 75 GiB" in w for w in plan.warnings)


def test_memory_divides_model_state_as_the_backends_do():
    base = [
        "model=llama3_8b",
        "model.vocab_size=128256",
        "train.global_batch_size=64",
        "train.micro_batch_size=1",
        "schedule.batch_warmup.start_global_batch_size=null",
        "eval.every=0",
        "plan.gpus=32",
    ]
    mem = {}
    for name, extra in {
        "ddp": ["parallel=ddp"],
        "fsdp": ["parallel=fsdp"],
        **{f"zero{s}": ["parallel=deepspeed", f"parallel.zero_stage={s}"] for s in (1, 2, 3)},
    }.items():
        cfg = to_object(compose(*base, *extra))
        mem[name] = make_plan(cfg, dataset=(10**12, False, "given", None)).memory
    p = 8_030_261_248
    assert mem["ddp"].params + mem["ddp"].grads + mem["ddp"].optimizer == 16 * p
    assert mem["fsdp"].params + mem["fsdp"].grads + mem["fsdp"].optimizer == pytest.approx(16 * p / 32)
    assert mem["zero1"].optimizer == pytest.approx(12 * p / 32) and mem["zero1"].grads == 2 * p
    assert mem["zero2"].grads == pytest.approx(2 * p / 32) and mem["zero2"].params == 2 * p
    assert mem["zero3"].params == pytest.approx(2 * p / 32)
    assert mem["zero3"].activations == mem["ddp"].activations  # activations are per micro-batch, not sharded


def test_cli_text_json_png_and_errors(tmp_path, small_corpus):
    png = tmp_path / "plan.png"
    proc = subprocess.run(
        [PY, "-m", "harness.plan", *SMALL, f"data.path={small_corpus}", f"plan.png={png}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for section in ("== Iterations", "== Model ==", "== Cost ==", "== Memory per device"):
        assert section in proc.stdout
    assert png.stat().st_size > 20_000
    proc = subprocess.run(
        [
            PY,
            "-m",
            "harness.plan",
            *SMALL,
            f"data.path={small_corpus}",
            "plan.format=json",
            "plan.png=",
            "train.max_steps=40",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["max_steps"] == 40 and out["png"] is None and out["memory"]["backend"] == "none"
    proc = subprocess.run(
        [PY, "-m", "harness.plan", "plan.gpu=V100"], cwd=REPO, capture_output=True, text=True
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == "error: plan.gpu='V100' is not one of H100, H200, A100, B200"
    )


# model preset: (peak LR, min LR, seq_len, global batch in sequences) of configs/recipe/<model>.yaml
RECIPES = {
    "llama3_8b": (3e-4, 3e-5, 8192, 512),  # Llama 2 7B recipe (Table 1), Llama 3's 8,192-token sequences
    "llama3_70b": (1.5e-4, 1.5e-5, 8192, 512),  # Llama 2 70B recipe
    "llama_1b": (4e-4, 4e-5, 2048, 1024),  # TinyLlama 1.1B
}


@pytest.mark.parametrize("model", list(RECIPES))
def test_big_presets_plan_with_their_published_batch_and_lr(model):
    """The presets bring their own batch and LR (the tiny model's 8 -> 16 ramp cannot run on 64 ranks
    and its 3e-3 peak is a small model's); an explicit override still wins, and 3e-3 warns."""
    lr, min_lr, seq_len, batch = RECIPES[model]
    base = [f"model={model}", "model.vocab_size=128256", "parallel=fsdp", "plan.gpus=64", "eval.every=0"]
    cfg = to_object(compose(*base))
    pl = make_plan(cfg, dataset=(10**12, False, "given", None))
    assert (cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.warmup_steps) == (lr, min_lr, 2000)
    assert cfg.schedule.batch_warmup.start_global_batch_size is None
    assert (pl.seq_len, pl.global_batch_size) == (seq_len, batch)
    assert pl.global_batch_tokens == {8192: 4_194_304, 2048: 2_097_152}[seq_len]
    assert not any("optim.lr" in w for w in pl.warnings)
    pl = make_plan(to_object(compose(*base, "optim.lr=3e-3")), dataset=(10**12, False, "given", None))
    params = pl.params
    assert (
        f"optim.lr=0.003 is a small model's peak LR for {params / 1e9:.2f}B parameters: published runs from "
        "0.5B parameters on peak at 4e-4 or lower (GPT-3 Table 2.1, TinyLlama, Llama 2 Table 1); lower "
        "optim.lr"
    ) in pl.warnings
    assert to_object(compose(*base, "train.global_batch_size=64")).train.global_batch_size == 64


def test_lr_warning_threshold():
    from harness.model import lr_warning

    assert lr_warning(499_999_999, 3e-3) is None  # a small model may peak high
    assert lr_warning(500_000_000, 9.9e-4) is None
    assert lr_warning(500_000_000, 1e-3).startswith("optim.lr=0.001 is a small model's peak LR for 0.50B")
    assert lr_warning(4_212_992, 3e-3) is None  # the default tiny run


PROBE = [  # world 2, micro-batch 2, global batch 8: two micro-batches per step
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.intermediate_size=128",
    "model.vocab_size=320",
    "data.seq_len=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "schedule.batch_warmup.start_global_batch_size=null",
]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "extra, between",
    [
        ([], "unsharded_grads"),  # fp32: 4 bytes x every parameter on every rank
        (["parallel.param_dtype=bfloat16"], "unsharded_grads"),  # accumulated in bf16: 2 bytes
        (["parallel.reduce_grads_every_micro_batch=true"], "grads"),  # sharded: 4 bytes / 2 ranks
    ],
)
def test_plan_counts_the_gradients_fsdp_holds_between_micro_batches(tmp_path, extra, between):
    """FSDP with accumulation at world 2: the gradient bytes rank 0 holds after the first micro-batch and
    after the step's last (measured: every live tensor's storage, tests/fsdp_memory_probe.py) are the
    plan's arithmetic, exactly (the parameter counts are exact)."""
    from harness.plan import memory_estimate

    out = tmp_path / "held.json"
    cmd = [*conftest.TORCHRUN2, "tests/fsdp_memory_probe.py", str(out), *PROBE, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = json.loads(out.read_text())
    cfg = to_object(compose(*PROBE, "parallel=fsdp", *extra, "plan.gpus=2"))
    params = model_stats(cfg.model, 320, 32).params
    mem = memory_estimate(cfg, params, 320, None, 2, accumulation=2)
    assert held["params"] == params == 102_720
    assert held["after_first"] == getattr(mem, between)
    assert held["after_last"] == mem.grads == 4 * params / 2  # fp32 shards of the gradients
    assert (
        held["after_first"] == {"unsharded_grads": (2 if extra else 4) * params, "grads": 2 * params}[between]
    )


def test_plan_weighs_reducing_every_micro_batch():
    """Llama 3 70B, tp 8 on 32 H100s, 64 micro-batches per step: the deferred reduce-scatter leaves 8.8B
    unsharded fp32 gradients per rank (does not fit); reducing every micro-batch fits, for 64 x the
    reduce-scatter bytes."""
    base = [
        "model=llama3_70b",
        "model.vocab_size=128256",
        "parallel=fsdp",
        "parallel.tp=8",
        "parallel.sequence_parallel=true",
        "parallel.param_dtype=bfloat16",
        "parallel.reduce_dtype=float32",
        "parallel.activation_checkpointing=true",
        "train.global_batch_size=256",
        "plan.gpus=32",
    ]
    given = (10**13, False, "given", None)
    once = make_plan(to_object(compose(*base)), dataset=given)
    every = make_plan(
        to_object(compose(*base, "parallel.reduce_grads_every_micro_batch=true")), dataset=given
    )
    local = once.memory.unsharded_grads / 4
    assert once.gradient_accumulation_steps == 64 and local == pytest.approx(8.82e9, rel=1e-3)
    assert once.memory.unsharded_grads_other == every.memory.unsharded_grads
    assert every.memory.unsharded_grads_other == once.memory.unsharded_grads
    assert once.memory.total_checkpointed > 75 * 2**30 > every.memory.total_checkpointed
    before, after = once.memory.total_checkpointed / 2**30, every.memory.total_checkpointed / 2**30
    assert [w for w in once.warnings if "per device" in w] == [
        f"estimated {before:.1f} GiB per device exceeds the H100's 75 GiB: set "
        f"parallel.reduce_grads_every_micro_batch=true ({after:.1f} GiB: the "
        f"{local * 4 / 2**30:.1f} GiB of unsharded gradients held between micro-batches are reduce-scattered "
        "after each one instead, accumulation x the reduce-scatter bytes)"
    ]
    assert not any("per device" in w for w in every.warnings)
    rs = once.communication["dp_shard"]["reduce_scatter"]
    assert every.communication["dp_shard"]["reduce_scatter"] == 64 * rs == 64 * local * 4
    # Llama 3 8B on 64 H100s (fp32 reduce, activation checkpointing): the unsharded gradients are 4 bytes
    # x 8.03B parameters on every rank, not the 0.47 GiB shard
    pl = make_plan(
        to_object(
            compose(
                *L8B_FSDP,
                "parallel.activation_checkpointing=true",
                "plan.gpus=64",
            )
        ),
        dataset=given,
    )
    assert pl.memory.unsharded_grads == 4 * 8_030_261_248
    assert 48 * 2**30 < pl.memory.total_checkpointed < 54 * 2**30


def test_the_trainer_logs_the_plans_lr_warning(tmp_path, small_corpus, monkeypatch):
    """The trainer and the plan share harness.model.lr_warning (its size threshold lowered here so that
    the small test model counts as big): one line in train.log."""
    import harness.model

    monkeypatch.setattr(harness.model, "BIG_MODEL_PARAMS", 1000)
    train_small(tmp_path / "run", small_corpus, "train.max_steps=2", "optim.lr=3e-3", "eval.every=0")
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert sum("optim.lr=0.003 is a small model's peak LR for 0.00B parameters" in x for x in lines) == 1


def test_the_plan_reads_a_bare_tokenizer_json_as_training_does(tmp_path, small_corpus, shared_data):
    """GPT-2's tokenizer.json alone declares no EOS: training takes it with tokenizer.eos_token, and so
    must the plan, both when it tokenizes a sample (plan.exact_max_mb=0) and with plan.dataset_tokens."""
    import shutil

    bare = tmp_path / "tokenizer.json"
    shutil.copy(f"{shared_data}/tokenizers/gpt2/tokenizer.json", bare)
    base = [
        *SMALL,
        f"data.path={small_corpus}",
        f"tokenizer.path={bare}",
        'tokenizer.eos_token="<|endoftext|>"',
    ]
    for extra in ("plan.exact_max_mb=0", "plan.dataset_tokens=1000000"):
        cfg = to_object(compose(*base, extra))
        vocab = resolve_vocab_size(cfg.model, 50257)  # GPT-2's vocabulary, padded as the model is
        assert make_plan(cfg).params == model_stats(cfg.model, vocab, cfg.data.seq_len).params, extra


def test_the_memory_warning_names_every_switch_that_alone_fits():
    """8B on 8 H100s at seq 8192, micro-batch 1 x 8: 99.4 GiB; activation checkpointing alone (65.4)
    and reducing every micro-batch alone (72.6) both fit, and the warning names both, AC first."""
    cfg = to_object(
        compose(
            *L8B_FSDP,
            "plan.gpus=8",
            "train.global_batch_size=64",
            "train.max_steps=1000",
        )
    )
    plan = make_plan(cfg, dataset=(10**13, False, "given", None))
    mem, warning, gib = plan.memory, [w for w in plan.warnings if "per device" in w], 2**30
    other = mem.peak(False, mem.unsharded_grads_other) / gib
    assert warning == [
        f"estimated {mem.peak(False) / gib:.1f} GiB per device exceeds the H100's 75 GiB: set "
        f"parallel.activation_checkpointing=true ({mem.peak(True) / gib:.1f} GiB: recomputes each "
        "block's activations in backward, about a third more compute); or set "
        f"parallel.reduce_grads_every_micro_batch=true ({other:.1f} GiB: the {mem.unsharded_grads / gib:.1f} "
        "GiB of unsharded gradients held between micro-batches are reduce-scattered after each one "
        "instead, accumulation x the reduce-scatter bytes)"
    ]
    assert mem.peak(True) < 75 * gib and mem.peak(False, mem.unsharded_grads_other) < 75 * gib
