"""Pipeline parallelism (``parallel.pp``): the stage split keeps the whole model's names, bad layouts
are refused before anything is built, and pp=2 gives the losses and gradient norms of one process
(with accumulation, the batch ramp and validation) through a kill and a resume at pp=2 and across
pp 2 -> 1 -> 2; the planner's pipeline tables hold against the runs' bytes."""

import os

import pytest
from conftest import SMALL, compose, read_metrics, torchrun_train
from safetensors.torch import load_file

from harness.config import to_object, validate
from harness.config.validate import PP_SCHEDULES
from harness.errors import ConfigError
from harness.model import build_model
from harness.parallel.pipeline import build_part, split_layers, stage_ids

PP = [*SMALL, "model.num_layers=4", "model.tie_word_embeddings=false"]


def test_balanced_and_given_splits():
    assert split_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]  # the last stage also runs the LM head
    assert split_layers(7, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 7)]  # middle, first
    assert split_layers(6, 4) == [range(0, 1), range(1, 3), range(3, 5), range(5, 6)]
    assert split_layers(4, 2, [3, 1]) == [range(0, 3), range(3, 4)]


def test_stage_placement():
    assert [stage_ids(r, 2, "1F1B") for r in range(2)] == [[0], [1]]
    assert [stage_ids(r, 2, "Interleaved1F1B") for r in range(2)] == [[0, 2], [1, 3]]  # looped
    assert [stage_ids(r, 4, "ZBVZeroBubble") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]  # V


def test_parts_keep_the_whole_models_parameter_names():
    cfg = to_object(compose(*PP)).model
    model = build_model(cfg, 300, seed=0, device="meta")
    parts = [build_part(model, [0, 1], True, False), build_part(model, [2, 3], False, True)]
    names = [[n for n, _ in p.named_parameters()] for p in parts]
    assert names[0][0] == "model.embed_tokens.weight" and "lm_head.weight" not in names[0]
    assert names[1][-1] == "lm_head.weight" and not any(n.startswith("model.layers.1.") for n in names[1])
    assert sorted(names[0] + names[1]) == sorted(n for n, _ in model.named_parameters())
    assert len(model.model.layers) == 4  # the model itself is untouched
    v_part = build_part(model, [0, 3], True, True)  # a V's rank 0: the first and the last stage
    assert [n for n, _ in v_part.named_parameters() if "layers" not in n] == [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.pp=8"], 8, "parallel.pp=8 with parallel.pp_schedule=1F1B makes 8 stages, more than"),
        (["parallel.pp=2", "model.tie_word_embeddings=true"], 2, "set model.tie_word_embeddings=false"),
        (["parallel.pp=2", "parallel.pp_schedule=Zigzag"], 2, "parallel.pp_schedule='Zigzag' must be one of"),
        (
            ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"],
            2,
            "at least 4 of them (one per pipeline stage, parallel.pp_schedule=Interleaved1F1B)",
        ),
        (
            ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "train.micro_batch_size=1"]
            + ["train.global_batch_size=5", "schedule.batch_warmup.start_global_batch_size=null"],
            2,
            "makes 5 micro-batches per data-parallel rank, run in 5 // parallel.pp=2 = 2 rounds, and 5 is",
        ),
        (["parallel.pp=2", "parallel=ddp"], 2, "parallel.pp=2 needs parallel=fsdp"),
        (["parallel.pp=2", "parallel=none"], 2, "x tp); parallel=none is one process"),
        (
            ["parallel.pp=2", "parallel.pp_layers=[3,2]"],
            2,
            "parallel.pp_layers=[3, 2] must give each of the 2",
        ),
        (["parallel.pp_layers=[2,2]"], 1, "parallel.pp_layers needs parallel.pp > 1"),
        (
            ["parallel.pp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
            4,
            "parallel.pp=2 with parallel.sequence_parallel=true is not supported yet",
        ),
        (["parallel.pp=2"], 3, "parallel.pp=2 x parallel.tp=1 does not divide world_size=3"),
        (
            ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "train.compile=true"],
            2,
            "fails under torch.compile (pytorch#161904); set train.compile=false",
        ),
        (
            ["parallel.pp=2", "train.micro_batch_size=4"],
            2,
            "a step of 4 sequences (schedule.batch_warmup.start_global_batch_size) gives each data-parallel "
            "rank 4, which must be whole micro-batches of train.micro_batch_size=4, at least 2 of them (one "
            "per pipeline stage, parallel.pp_schedule=1F1B); set train.micro_batch_size to a divisor of 4 "
            "no larger than 2, or raise schedule.batch_warmup.start_global_batch_size",
        ),
    ],
)
def test_pipeline_layouts_that_cannot_run_are_refused_by_the_config_check(overrides, world, message):
    backend = [o for o in overrides if o.startswith("parallel=")] or ["parallel=fsdp"]
    cfg = to_object(compose(*PP, *backend, *(o for o in overrides if not o.startswith("parallel="))))
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        validate(cfg, world)


def test_batch_arithmetic_counts_the_pipeline_once():
    batch = validate(to_object(compose(*PP, "parallel=fsdp", "parallel.pp=2", "train.micro_batch_size=1")), 4)
    assert (batch.world_size, batch.gradient_accumulation_steps) == (2, 4)  # dp 2 x pp 2


FSDP_PP2 = ["parallel=fsdp", "parallel.pp=2"]
KEYS = ("step", "loss", "grad_norm", "val_loss", "lr", "tokens_total", "global_batch_size")


def _run(nproc, run_dir, corpus, *overrides, export=False, env=None, check=True):
    args = [*PP, "train.max_steps=6", "eval.every=3", "checkpoint.every=3", f"checkpoint.export_hf={export}"]
    args += [f"data.path={corpus}", f"hydra.run.dir={run_dir}", *overrides]
    return torchrun_train(nproc, *args, env=env, check=check)


def _rows(run_dir):
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(run_dir)]


def _close(rows, ref, rel):
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, 7))
    for r, f in zip(rows, ref):
        for k in ("loss", "grad_norm", "val_loss"):
            assert (r[k] is None) == (f[k] is None), (r, f)
            assert r[k] is None or abs(r[k] - f[k]) <= rel * abs(f[k]), (k, r, f)
        assert (r["lr"], r["tokens_total"], r["global_batch_size"]) == (
            f["lr"],
            f["tokens_total"],
            f["global_batch_size"],
        )


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("pp") / "one"
    _run(1, run_dir, small_corpus, "parallel=none", export=True)
    return _rows(run_dir) + [run_dir]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", list(PP_SCHEDULES))
def test_pp2_matches_one_process_with_the_ramp_and_accumulation(
    tmp_path, small_corpus, one_process, schedule
):
    """pp=2 at world 2, every schedule (two stages per rank for all but GPipe and 1F1B: 4 stages of
    one layer), the ramp giving 2, 3, 4 micro-batches per step (4, 6, 8 with micro-batches of 1 for
    the 4-stage schedules): per-step loss, grad norm and validation loss within 1e-5 of one process,
    and the HF export gathered from both ranks."""
    micro = 2 if PP_SCHEDULES[schedule] == 1 else 1
    args = [*FSDP_PP2, f"parallel.pp_schedule={schedule}", f"train.micro_batch_size={micro}"]
    proc = _run(2, tmp_path, small_corpus, *args, export=True)
    acc = 8 // micro
    assert (
        f"(micro {micro} x accumulation {acc} x dp 1; pp 2, world 2; pp_schedule {schedule})" in proc.stdout
    )
    _close(_rows(tmp_path), one_process[:-1], 1e-5)
    # the HF export gathers both stages on rank 0: every tensor, as the one-process run's
    if schedule == "1F1B":
        _check_pp_bytes(read_metrics(tmp_path))
    ours, ref = (load_file(d / "hf" / "model.safetensors") for d in (tmp_path, one_process[-1]))
    assert sorted(ours) == sorted(ref) and len(ref) == 4 * 9 + 3
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < 1e-5  # Adam on equal gradients to ~1e-7


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout", [["train.micro_batch_size=1"], ["parallel.tp=2"]], ids=["dp_shard2", "tp2"]
)
def test_pp2_x_another_dimension_at_world_4_matches_one_process(tmp_path, small_corpus, one_process, layout):
    """pp=2 x dp_shard=2 (FSDP2 within each stage) and pp=2 x tp=2 (each stage's layers split over 2
    ranks): the rows of one process (measured: within 1e-7)."""
    proc = _run(4, tmp_path, small_corpus, *FSDP_PP2, *layout)
    _close(_rows(tmp_path), one_process[:-1], 1e-5)
    if layout == [
        "train.micro_batch_size=1"
    ]:  # the plan's bytes are the run's (step 6: full, no new schedule)
        plan = _plan(*PP, *FSDP_PP2, *layout, "plan.gpus=4").communication
        last = read_metrics(tmp_path)[-1]["comm_by_dim"]
        assert {d: {op: last[d]["bytes_by_op"][op] for op in ops} for d, ops in plan.items()} == plan
        assert plan == {
            "pp": {"send": 4 * 32 * 64 * 4, "recv": 4 * 32 * 64 * 4},  # 4 micro-batches of 1 x 32 x 64 fp32
            "dp_shard": {"all_gather": 410_624, "reduce_scatter": 410_624},  # 102,656 fp32 parameters, once
        }
    if layout == ["parallel.tp=2"]:
        assert "(micro 2 x accumulation 4 x dp 1; pp 2, tp 2, world 4; pp_schedule 1F1B)" in proc.stdout
        last = read_metrics(tmp_path)[-1]["comm_by_dim"]
        assert set(last) == {"pp", "tp"}
        # rank 0 (stage 0: the embedding, layers 0-1): (4 x 2 + 1) all-reduces of 2 x 32 x 64 fp32 per
        # micro-batch; the run adds the gradient norm's fp64 partial sum (8 B; the plan leaves scalars out)
        plan = _plan(*PP, *FSDP_PP2, *layout, "plan.gpus=4", "train.dtype=float32").communication
        assert plan["tp"] == {"all_reduce": 4 * 9 * 2 * 32 * 64 * 4}
        assert last["tp"]["bytes_by_op"] == {"all_reduce": plan["tp"]["all_reduce"] + 8}
        assert {op: last["pp"]["bytes_by_op"][op] for op in ("send", "recv")} == plan["pp"]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_kill_at_pp_2_resumes_there_and_the_run_continues_across_pp_2_1_2(
    tmp_path, small_corpus, one_process
):
    """pp=2 SIGKILLed on rank 1 (the last stage) as step 6 starts: resumed at pp=2 from the step-3
    checkpoint and stopped after step 4, continued at one process to step 5, finished at pp=2. The
    checkpoints carry the whole model's names, so DCP reshards them across pipeline degrees; the rows
    are the one process's throughout."""
    killed = _run(2, tmp_path, small_corpus, *FSDP_PP2, env={"HARNESS_FAULT": "kill:6:1"}, check=False)
    assert killed.returncode != 0 and "step_00000003" in os.listdir(tmp_path / "checkpoints")
    proc = _run(2, tmp_path, small_corpus, *FSDP_PP2, "train.stop_at_step=4")
    assert f"resumed from {tmp_path}/checkpoints/step_00000003 at step 3" in proc.stdout
    _run(1, tmp_path, small_corpus, "parallel=none", "train.stop_at_step=5")
    proc = _run(2, tmp_path, small_corpus, *FSDP_PP2)
    assert f"resumed from {tmp_path}/checkpoints/step_00000005 at step 5" in proc.stdout
    _close(_rows(tmp_path), one_process[:-1], 1e-5)


def _plan(*overrides):
    """``harness.plan``'s report for ``overrides`` (a corpus of 10^9 tokens, not read)."""
    from harness.plan import make_plan

    return make_plan(to_object(compose("plan.dataset_tokens=1000000000", *overrides, schema="plan")))


def _readme_3d() -> list[str]:
    """The overrides of the README's 3-D command."""
    from test_readme import readme_overrides

    return readme_overrides("run_name=llama3-70b-3d")


def test_the_plan_of_the_readme_3d_layout_at_64_gpus():
    """The README's 3-D command planned at 64 H100s: each pipeline rank's two interleaved stages of 10
    layers, the embedding on rank 0 and the head on rank 3, the bubble (p-1)/(v m + p-1) at 128
    micro-batches, its send/recv bytes, and pp in the layouts table; the dry run refuses pp in one line."""
    from harness.plan import render_text

    pl = _plan(*_readme_3d(), "plan.gpus=64")
    assert [(r["stages"], r["layers"]) for r in pl.pipeline] == [
        ([0, 4], 20),
        ([1, 5], 20),
        ([2, 6], 20),
        ([3, 7], 20),
    ]
    assert pl.pipeline[0]["bubble"] == 3 / (2 * 128 + 3)
    act = 8192 * 8192 * 2  # micro 1 x seq 8192 x hidden 8192, bf16 parameters: a bf16 stream
    assert pl.communication["pp"] == {
        "send": 128 * act * 3,
        "recv": 128 * act * 3,
    }  # stage 0 one boundary, 4 two
    text = render_text(pl)
    assert (
        "== Pipeline stages (pp 4, Interleaved1F1B, 128 micro-batches per step: bubble 1.2% in theory" in text
    )
    assert "(micro 1 x accumulation 128 x dp 2; tp 8; pp 4, world 64)" in text
    assert " pp bubble  tp  dp_rep x shard" in text
    rows = {(r["pp"], r["tp"]): r for r in pl.layouts}
    assert rows[(4, 8)]["memory"] == max(r["memory"] for r in pl.pipeline)
    assert rows[(4, 8)]["bubble"] == pl.pipeline[0]["bubble"]
    assert sorted(rows) == [(p, t) for p in (1, 2, 4, 8, 16) for t in (1, 2, 4, 8) if p * t <= 64]


def test_the_planned_bubble_and_held_activations_follow_the_schedule():
    """Rank 0 holds every micro-batch under GPipe and LoopedBFS, p under 1F1B and ZBV (p - r on rank r
    for 1F1B), x (1 + (p-1)/(p v)) interleaved, p + 1 under DualPipeV; the bubble is (p-1)/(v m + p-1),
    0 for the zero-bubble schedules. The plan's rank activations scale with them."""
    from harness.layouts import pp_bubble, pp_in_flight

    p, m = 4, 16
    held = {s: pp_in_flight(s, p, m, v) for s, v in PP_SCHEDULES.items()}
    assert held == {
        "GPipe": 16,
        "1F1B": 4,
        "Interleaved1F1B": 4 * (1 + 3 / 8),
        "LoopedBFS": 16,
        "InterleavedZeroBubble": 4 * (1 + 3 / 8),
        "ZBVZeroBubble": 4,
        "DualPipeV": 5,
    }
    assert [pp_in_flight("1F1B", p, m, 1, r) for r in range(p)] == [4, 3, 2, 1]
    bubbles = {s: pp_bubble(s, p, m, v) for s, v in PP_SCHEDULES.items()}
    assert bubbles["1F1B"] == bubbles["GPipe"] == 3 / 19 and bubbles["Interleaved1F1B"] == 3 / 35
    assert bubbles["InterleavedZeroBubble"] == bubbles["ZBVZeroBubble"] == bubbles["DualPipeV"] == 0
    gpipe, one = (
        _plan(
            *PP,
            *FSDP_PP2,
            f"parallel.pp_schedule={s}",
            "plan.gpus=2",
            "schedule.batch_warmup.start_global_batch_size=null",
        ).pipeline
        for s in ("GPipe", "1F1B")
    )
    assert gpipe[0]["params"] == one[0]["params"] and gpipe[0]["memory"] > one[0]["memory"]


def _check_pp_bytes(records):
    """Each rank sends, and receives, one ``[micro, seq, hidden]`` fp32 tensor per micro-batch across
    the one stage boundary: activations forward on rank 0 (gradients back from rank 1), and so on:
    accumulation x 2 x 32 x 64 x 4 B each way, plus 4 B at a step that builds a schedule (a new
    micro-batch count: the stages' first handshake); the loss (fp32) and the norm (fp64) all-reduced."""
    for r in records:
        pp = r["comm_by_dim"]["pp"]["bytes_by_op"]
        boundary = r["gradient_accumulation_steps"] * 2 * 32 * 64 * 4
        new_schedule = r["step"] in (1, 3, 5)  # the ramp: 2, 2, 3, 3, 4, 4 micro-batches
        assert pp == {
            "send": boundary + 4 * new_schedule,
            "recv": boundary + 4 * new_schedule,
            "all_reduce": 12,
        }


@pytest.mark.slow
@pytest.mark.distributed
def test_a_hang_dump_names_the_stage_and_the_micro_batch(tmp_path, small_corpus):
    """Rank 1 (the last stage) stopped as step 2 starts: rank 0's watchdog dump says which stage it
    holds and which micro-batch's forward it started last (1F1B: the second, then it waits for the
    first one's gradient)."""
    proc = torchrun_train(
        2,
        *PP,
        *FSDP_PP2,
        "train.max_steps=6",
        "checkpoint.export_hf=false",
        "parallel.hang_timeout_s=3",
        f"data.path={small_corpus}",
        f"hydra.run.dir={tmp_path}",
        env={"HARNESS_FAULT": "stop:2:1"},
        check=False,
    )
    assert proc.returncode != 0
    dump = (tmp_path / "failures" / "hang_rank_0.txt").read_text()
    assert "pipeline: pp rank 0 of 2 (stages [0] of 2, 1F1B); stage 0: forward of micro-batch 2 of 2" in dump


def test_the_readmes_3d_command_is_a_valid_config_at_world_64():
    batch = validate(to_object(compose(*_readme_3d())), 64)
    assert (batch.world_size, batch.micro_batch_size, batch.gradient_accumulation_steps) == (2, 1, 128)
