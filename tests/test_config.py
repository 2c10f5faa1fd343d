"""Config schema, Hydra composition and validation errors."""

import pytest
from conftest import compose
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from harness.config import JobConfig, resolve_batch_sizes, to_object, validate
from harness.errors import ConfigError
from harness.schedule import fit_schedule


def test_default_config_composes_to_typed_object():
    cfg = to_object(compose())
    assert isinstance(cfg, JobConfig)
    assert cfg.model.name == "tiny" and cfg.parallel.name == "none"
    assert cfg.train.max_steps == 200 and cfg.train.global_batch_size == 16
    assert cfg.data.path.endswith("/*.py")  # the stdlib resolver expanded
    batch = validate(cfg)
    assert (batch.global_batch_size, batch.micro_batch_size, batch.gradient_accumulation_steps) == (16, 4, 4)


def test_overrides_and_model_presets():
    cfg = to_object(compose("train.max_steps=500", "model=llama_125m", "optim.lr=6e-4", "schedule=wsd"))
    assert cfg.train.max_steps == 500
    assert (cfg.model.name, cfg.model.hidden_size, cfg.model.num_layers) == ("llama_125m", 768, 12)
    assert cfg.optim.lr == 6e-4 and cfg.schedule.name == "wsd"
    for preset in ("llama_1b", "llama3_8b", "gpt2_124m", "gpt2_tiny"):
        assert to_object(compose(f"model={preset}")).model.name == preset


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train.max_stepz=10")
    assert "max_stepz" in str(e.value.__cause__ or e.value)
    assert isinstance(e.value.__cause__, ConfigAttributeError)
    assert "full_key: train.max_stepz" in str(e.value.__cause__)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigCompositionException) as e:
        compose("train.max_steps=many")
    assert isinstance(e.value.__cause__, ValidationError)
    assert "max_steps" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "g,m,k,world,expected",
    [
        (16, 4, None, 1, (16, 4, 4)),
        (16, None, 2, 2, (16, 4, 2)),
        (None, 4, 3, 2, (24, 4, 3)),
        (8, 2, 4, 1, (8, 2, 4)),
    ],
)
def test_batch_arithmetic_derives_the_third(g, m, k, world, expected):
    t = JobConfig().train
    t.global_batch_size, t.micro_batch_size, t.gradient_accumulation_steps = g, m, k
    b = resolve_batch_sizes(t, world)
    assert (b.global_batch_size, b.micro_batch_size, b.gradient_accumulation_steps) == expected


def test_batch_arithmetic_errors_show_the_arithmetic():
    t = JobConfig().train
    t.global_batch_size, t.micro_batch_size, t.gradient_accumulation_steps = 16, 4, 2
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=16 != micro_batch_size=4 x gradient_accumulation_steps=2 x world_size=1 = "
        r"8",
    ):
        resolve_batch_sizes(t, 1)
    t.gradient_accumulation_steps = None
    t.global_batch_size = 18
    with pytest.raises(
        ConfigError, match=r"global_batch_size=18 is not divisible by micro_batch_size=4 x world_size=1 = 4"
    ):
        resolve_batch_sizes(t, 1)
    t.global_batch_size = None
    with pytest.raises(ConfigError, match="set two of"):
        resolve_batch_sizes(t, 1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.seq_len=2048"], r"data.seq_len=2048 exceeds model.max_position_embeddings=1024"),
        (["train.max_tokens=100000"], r"set exactly one budget"),
        (["train.max_steps=null"], r"set exactly one budget"),
        (["schedule.name=linear"], r"schedule.name='linear' is not one of cosine, constant, wsd"),
        (
            ["schedule.batch_warmup.start_global_batch_size=6"],
            r"start_global_batch_size=6 does not reach train.global_batch_size=16 in whole increments "
            r"of schedule.batch_warmup.increment=4",
        ),
        (["train.micro_batch_size=0"], r"train.micro_batch_size=0 must be a positive integer"),
        (["model.num_heads=3"], r"model.hidden_size=256 is not divisible by model.num_heads=3"),
        (["schedule.min_lr=1.0"], r"schedule.min_lr=1.0 is larger than optim.lr"),
        (["data.format=csv"], r"data.format='csv' is not one of text, json, parquet"),
        (["parallel.name=tp"], r"parallel.name='tp' is not one of none, ddp, fsdp, deepspeed"),
        (
            ["parallel=deepspeed", "parallel.offload_param=true"],
            r"parallel.offload_param needs parallel.zero_stage=3",
        ),
        (["parallel=fsdp", "parallel.dp_replicate=3"], r"parallel.dp_replicate=3 must divide world_size=1"),
        (
            ["parallel=fsdp", "parallel.name=ddp"],
            r"parallel.name=ddp does not match the parallel config group",
        ),
        (["parallel.tp=2"], r"parallel.tp=2 needs parallel=fsdp"),
        (
            ["schedule.warmup_steps=-1", "schedule.decay_fraction=2"],
            r"schedule.warmup_steps=-1 must be >= 0; schedule.decay_fraction=2.0 must be in \[0, 1\]",
        ),
        (["optim.betas=[0.9]"], r"optim.betas=\[0.9\] must be two numbers"),
        (["run_name="], r"run_name='' must be a non-empty name"),
        (["tokenizer.train_vocab_size=10"], r"tokenizer.train_vocab_size=10 must be >= 257"),
        (
            ["schedule.batch_warmup.tokens=1000"],
            r"batch_warmup.tokens=1000 and schedule.batch_warmup.steps=40 are both set",
        ),
    ],
)
def test_validation_errors_name_the_key(overrides, message):
    cfg = to_object(compose(*overrides))
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parallel.zero_stage=3"], "Key 'zero_stage' not in 'NoneParallelConfig'"),
        (["parallel=fsdp", "parallel.ds_config={}"], "Key 'ds_config' not in 'FSDPConfig'"),
        (
            ["parallel=deepspeed", "parallel.reshard_after_forward=false"],
            "Key 'reshard_after_forward' not in 'DeepSpeedConfig'",
        ),
        (["parallel=ddp", "parallel.dp_replicate=2"], "Key 'dp_replicate' not in 'DDPConfig'"),
    ],
)
def test_a_backends_knob_with_another_backend_is_not_a_key(overrides, message):
    """Each backend has its own schema: another backend's knob fails while composing."""
    from harness.config import compose_checked

    with pytest.raises(ConfigError, match=message):
        compose_checked(list(overrides))


def test_warmups_longer_than_the_run_are_shortened_with_a_warning():
    cfg = to_object(compose("train.max_steps=6"))  # LR warmup 20, batch ramp 40 steps
    fitted, warnings = fit_schedule(cfg.schedule, 6, "train.max_steps=6")
    assert fitted.warmup_steps == 6 and fitted.batch_warmup.steps == 6
    assert warnings == [
        "schedule.warmup_steps=20 > train.max_steps=6: the LR warmup is shortened to 6",
        "schedule.batch_warmup.steps=40 > train.max_steps=6: the batch ramp is shortened to 6",
    ]
    wsd = to_object(compose("schedule=wsd", "schedule.warmup_steps=190")).schedule  # decay: last 40 of 200
    fitted, warnings = fit_schedule(wsd, 200, "train.max_steps=200")
    assert fitted.warmup_steps == 160 and "before the wsd decay" in warnings[0]
    assert fit_schedule(cfg.schedule, 200, "train.max_steps=200") == (cfg.schedule, [])


def test_batch_warmup_steps_zero_means_no_ramp():
    from harness.schedule import BatchRamp

    cfg = to_object(compose("schedule.batch_warmup.steps=0"))
    batch = validate(cfg)
    assert BatchRamp.from_config(cfg.schedule.batch_warmup, batch).at(1) == 16
