"""Iteration arithmetic: LR at given steps, batch ramp, epochs, tokens, token budgets."""

import math

import pytest
import torch

from harness.schedule import BatchRamp, DataPosition, IterationPlan, LRSchedule


def test_cosine_pinned_values():
    s = LRSchedule("cosine", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert s(0) == 0.0
    assert s(1) == pytest.approx(1e-4)
    assert s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)  # end of warmup: peak
    assert s(60) == pytest.approx(5.5e-4)  # mid-decay: (lr + min_lr) / 2
    assert s(35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(110) == pytest.approx(1e-4)  # last step: min_lr exactly
    assert s(500) == pytest.approx(1e-4)


def test_warmup_edges():
    s = LRSchedule("cosine", lr=1e-3, min_lr=1e-4, warmup_steps=20, max_steps=20)
    assert s(19) == pytest.approx(9.5e-4) and s(20) == pytest.approx(1e-3)  # the peak is reached
    z = LRSchedule("cosine", lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=10)
    assert z(0) == pytest.approx(1e-3) and z(10) == pytest.approx(1e-4)


def test_constant_and_wsd():
    c = LRSchedule("constant", lr=2e-3, min_lr=0.0, warmup_steps=4, max_steps=100)
    assert [c(i) for i in (0, 2, 4, 50, 100)] == pytest.approx([0, 1e-3, 2e-3, 2e-3, 2e-3])
    w = LRSchedule("wsd", lr=1e-3, min_lr=0.0, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert w(10) == pytest.approx(1e-3)
    assert w(80) == pytest.approx(1e-3)  # decay starts after step 80
    assert w(90) == pytest.approx(5e-4)
    assert w(100) == pytest.approx(0.0)


def test_scheduler_advances_once_per_optimizer_step():
    s = LRSchedule("cosine", lr=1e-2, min_lr=1e-3, warmup_steps=3, max_steps=12)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: s.torch_lambda(i))
    used = []
    for _ in range(12):
        used.append(opt.param_groups[0]["lr"])  # the LR update k uses
        opt.step()
        sched.step()
    assert used == pytest.approx([s(k) for k in range(1, 13)])
    assert used[-1] == pytest.approx(1e-3)


def test_batch_ramp_by_steps():
    ramp = BatchRamp(full=16, increment=4, start=4, steps=40)
    sizes = [ramp.at(step) for step in range(1, 46)]
    assert sizes[:14] == [4] * 14  # steps 1-14
    assert sizes[14:27] == [8] * 13  # steps 15-27
    assert sizes[27:40] == [12] * 13  # steps 28-40
    assert sizes[40:] == [16] * 5  # full from step 41
    assert ramp.end_step() == 41
    assert BatchRamp(full=16, increment=4).at(1) == 16


def test_batch_ramp_by_tokens():
    ramp = BatchRamp(full=8, increment=2, start=2, tokens=300)
    assert [ramp.at(1, t) for t in (0, 99, 100, 199, 200, 299, 300, 10_000)] == [2, 2, 4, 4, 6, 6, 8, 8]


def test_iterations_per_epoch_ceil_and_floor():
    ramp = BatchRamp(full=4, increment=2)
    plan = IterationPlan(num_sequences=10, seq_len=8, ramp=ramp, micro_batch_size=2)
    steps = [next(s) for s in [plan.steps()] for _ in range(6)]
    assert plan.iterations_per_epoch() == 3  # ceil(10/4)
    assert [s.global_batch_size for s in steps] == [4, 4, 2, 4, 4, 2]
    assert [s.gradient_accumulation_steps for s in steps] == [2, 2, 1, 2, 2, 1]
    assert [s.position for s in steps[2:4]] == [DataPosition(0, 8), DataPosition(1, 0)]
    assert steps[2].epoch == pytest.approx(1.0) and steps[3].epoch == pytest.approx(1.4)
    dropped = IterationPlan(10, 8, ramp, 2, drop_last=True)
    it = dropped.steps()
    assert dropped.iterations_per_epoch() == 2  # floor(10/4)
    got = [next(it) for _ in range(4)]
    assert [s.global_batch_size for s in got] == [4, 4, 4, 4]
    assert [s.position for s in got] == [
        DataPosition(0, 0),
        DataPosition(0, 4),
        DataPosition(1, 0),
        DataPosition(1, 4),
    ]


def test_short_last_batch_at_world_size_two():
    plan = IterationPlan(
        num_sequences=11, seq_len=8, ramp=BatchRamp(full=4, increment=4), micro_batch_size=2, world_size=2
    )
    it = plan.steps()
    sizes = [next(it).global_batch_size for _ in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2]  # 11 = 4 + 4 + 3 -> the short step is cut to 2 (a multiple of 2)
    it = IterationPlan(9, 8, BatchRamp(full=4, increment=4), 2, world_size=2).steps()
    got = [next(it) for _ in range(3)]
    assert [s.global_batch_size for s in got] == [4, 4, 4] and got[2].position == DataPosition(1, 0)


def test_tokens_total_is_sum_of_step_tokens_with_ramp():
    ramp = BatchRamp(full=16, increment=4, start=4, steps=10)
    plan = IterationPlan(num_sequences=1000, seq_len=128, ramp=ramp, micro_batch_size=4)
    it = plan.steps()
    infos = [next(it) for _ in range(30)]
    assert infos[-1].tokens_total == sum(i.tokens for i in infos) == plan.total_tokens(30)
    assert [i.tokens for i in infos[:3]] == [512, 512, 512]
    assert infos[-1].tokens == 16 * 128


def test_steps_for_token_budget():
    plan = IterationPlan(
        num_sequences=10**6, seq_len=1024, ramp=BatchRamp(full=8, increment=8), micro_batch_size=8
    )
    assert plan.steps_for_tokens(8 * 1024 * 100) == 100
    assert plan.steps_for_tokens(8 * 1024 * 100 + 1) == 101
    ramped = IterationPlan(10**6, 1024, BatchRamp(full=8, increment=2, start=2, steps=4), 2)
    it = ramped.steps()
    assert [next(it).global_batch_size for _ in range(6)] == [2, 2, 4, 6, 8, 8]  # 3 increments over 4 steps
    assert ramped.steps_for_tokens(14 * 1024) == 4
    assert ramped.steps_for_tokens(15 * 1024) == 5


def test_resumed_plan_continues_the_same_steps():
    plan = IterationPlan(37, 16, BatchRamp(full=8, increment=2, start=2, steps=6), 2)
    it = plan.steps()
    full = [next(it) for _ in range(25)]
    tail = plan.steps(start_step=11)  # position replayed from step 1
    assert [next(tail) for _ in range(14)] == full[11:]
    explicit = plan.steps(11, full[10].end_position(37), full[10].tokens_total)
    assert [next(explicit) for _ in range(14)] == full[11:]


@pytest.mark.parametrize(
    "model_params,tokens,batch_tokens,expected_steps",
    [(175e9, 300e9, 3.2e6, 93_750), (70e9, 2e12, 4e6, 500_000), (405e9, 15e12, 16e6, 937_500)],
)
def test_published_runs_iteration_counts(model_params, tokens, batch_tokens, expected_steps):
    """GPT-3 175B, LLaMA 2 70B and LLaMA 3 405B step counts from token budget and batch."""
    seq_len = 2048 if model_params == 175e9 else 4096
    batch = int(batch_tokens // seq_len)
    plan = IterationPlan(10**12, seq_len, BatchRamp(full=batch, increment=1), 1)
    steps = plan.steps_for_tokens(int(tokens))
    assert abs(steps - expected_steps) / expected_steps < 0.03


@pytest.mark.parametrize("parallel", ["none", "ddp", "fsdp tp=2"])
def test_the_batch_ramp_is_the_same_at_every_world_size(parallel):
    """The default run's ramp 8 -> 12 -> 16 (increment 4) at 1, 2 and 4 data-parallel ranks: the same
    global batch sizes and total tokens (757,760 over 200 steps) wherever it can run."""
    from conftest import compose

    from harness.config import to_object, validate
    from harness.schedule import build_schedule

    name, *tp = parallel.split()
    cfg = to_object(compose(f"parallel={name}", *[f"parallel.{t}" if t.startswith("tp") else t for t in tp]))
    want = [8] * 20 + [12] * 20 + [16] * 160
    for world in (1, 2, 4) if name != "none" else (1,):
        if tp and world == 1:
            continue
        batch = validate(cfg, world)
        sched = build_schedule(cfg, batch, num_sequences=10**6)
        steps = [i for _, i in zip(range(200), sched.plan.steps())]
        assert [i.global_batch_size for i in steps] == want, world
        assert steps[-1].tokens_total == 757_760
        per_rank = [i.global_batch_size // batch.world_size for i in steps[:40:20]]
        assert [i.gradient_accumulation_steps for i in steps[:40:20]] == [
            math.ceil(n / batch.micro_batch_size) for n in per_rank
        ]


def test_a_world_size_that_cannot_realize_a_ramp_batch_is_refused():
    from conftest import compose

    from harness.config import to_object, validate
    from harness.errors import ConfigError

    cfg = to_object(compose("parallel=ddp", "train.micro_batch_size=2"))
    assert validate(cfg, 4).global_batch_size == 16  # 8, 12 and 16 split over 4 ranks; 12 not over 8
    with pytest.raises(ConfigError) as err:
        validate(cfg, 8)
    assert str(err.value) == (
        "the batch ramp 8, 12, 16 (schedule.batch_warmup) has a global batch of 12 sequences, which "
        "world_size=8 cannot split evenly; make start_global_batch_size and increment multiples of 8, "
        "or run on a world_size that divides them"
    )
    with pytest.raises(ConfigError, match=r"schedule.batch_warmup.increment is required with a batch ramp"):
        validate(to_object(compose("schedule.batch_warmup.increment=null")))


def test_a_ramp_stage_splits_evenly_over_the_ranks():
    """12 sequences at micro_batch_size 4 on 2 ranks: a full global micro-batch of 8 (4 per rank), then
    a short one of 4 (2 per rank); together the ranks read the step's sequences exactly once."""
    import numpy as np

    from harness.data.loader import PackedSequences, StepLoader

    seqs = PackedSequences(np.arange(2000, dtype=np.uint16), seq_len=9)
    plan = IterationPlan(len(seqs), 9, BatchRamp(full=16, increment=4, start=12, steps=2), 4, world_size=2)
    info = next(plan.steps())
    assert (info.global_batch_size, info.gradient_accumulation_steps) == (12, 2)
    loaders = [StepLoader(seqs, 7, 4, rank=r, world_size=2) for r in (0, 1)]
    got = [[mb.input_ids.shape[0] for mb in ld.micro_batches(info)] for ld in loaders]
    assert got == [[4, 2], [4, 2]]
    starts = sorted(
        int(x) // 9 for ld in loaders for mb in ld.micro_batches(info) for x in mb.input_ids[:, 0]
    )
    assert starts == sorted(int(i) for i in loaders[0].step_indices(info))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_validation_set_is_the_same_at_every_world_size(world):
    """6 sequences (eval.batches x global_batch_size) in micro-batches of 2: the same 6 at any world
    size, each read by exactly one rank; every rank runs the same number of forwards (a rank without a
    share gets one sequence whose labels are all ignored)."""
    import numpy as np

    from harness.data.loader import IGNORE_INDEX, PackedSequences, validation_batches

    seqs = PackedSequences(np.arange(2000, dtype=np.uint16), seq_len=9)
    per_rank = [validation_batches(seqs, 6, 2, rank=r, world_size=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    starts = [
        int(row[0]) // 9
        for b in per_rank
        for mb in b
        for row, lab in zip(mb.input_ids, mb.labels)
        if (lab != IGNORE_INDEX).any()
    ]
    assert sorted(starts) == list(range(6))
