"""Data mixtures: the blending order's prefix rule, exact tokens per source, bitwise kill/resume
(across a source's epoch and two resumes), refused and allowed mixture changes, per-source
validation, the planner's per-source table, and bad sources named in one line."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import numpy as np
import pytest
from conftest import REPO, SMALL, TORCHRUN2, compose, read_metrics, train_small

from harness.config import to_object
from harness.data import build_data, source_specs
from harness.data.mixture import BlendOrder, Segment, normalized
from harness.errors import CheckpointError, ConfigError, HarnessError

KEEP = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens_total",
    "tokens_by_source",
    "val_loss",
    "val_loss_by_source",
)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, small_corpus):
    """A large and a small source (the small one wraps into new epochs within a dozen steps)."""
    root = tmp_path_factory.mktemp("mixture")
    lines = open(small_corpus).read().splitlines()
    (root / "big.jsonl").write_text("\n".join(lines[:10]) + "\n")
    small = [json.dumps({"text": json.loads(line)["text"][:400]}) for line in lines[10:]]
    (root / "small.jsonl").write_text("\n".join(small) + "\n")
    return str(root / "big.jsonl"), str(root / "small.jsonl")


def _mix(big, small, w_big=0.6, w_small=0.4):
    big_source = f"big: {{path: '{big}', weight: {w_big}}}"
    return f"data.sources={{{big_source}, small: {{path: '{small}', weight: {w_small}}}}}"


def _rows(run_dir):
    return [{k: r.get(k) for k in KEEP} for r in read_metrics(run_dir)]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.9, 0.1], [1, 1, 1, 7]])
def test_every_prefix_of_the_blending_order_is_within_one_sequence_of_the_weights(weights):
    w = normalized(weights)
    order = BlendOrder([Segment(0, w, tuple(0 for _ in w))])
    sources, numbers = order.assign(0, 10_000)
    counts = np.zeros(len(w))
    for n, j in enumerate(sources, 1):
        assert numbers[n - 1] == counts[j]  # the k-th sample of a source is its k-th draw
        counts[j] += 1
        assert np.abs(counts - np.array(w) * n).max() < 1
    fresh = BlendOrder([Segment(0, w, tuple(0 for _ in w))])  # random access: same draws from anywhere
    s, k = fresh.assign(7_777, 300)
    assert np.array_equal(s, sources[7_777:8_077]) and np.array_equal(k, numbers[7_777:8_077])
    assert fresh.counts(5_000) == np.bincount(sources[:5_000], minlength=len(w)).tolist()


def test_a_new_segment_continues_each_source_with_new_weights():
    order = BlendOrder([Segment(1000, (0.5, 0.5), (700, 300))])
    sources, numbers = order.assign(1000, 400)
    assert numbers[sources == 0][0] == 700 and numbers[sources == 1][0] == 300
    counts = np.bincount(sources, minlength=2)
    assert abs(counts[0] - 200) < 1 and abs(counts[1] - 200) < 1


def test_sources_from_the_command_line_in_hydras_dict_syntax():
    cfg = to_object(
        compose(
            "data.sources={web: {path: /d/c4/*.json.gz, weight: 0.7}, "
            "code: {path: /d/code.jsonl, weight: 0.3}}"
        )
    )
    specs = source_specs(cfg.data)
    assert [(s.name, s.weight, s.data.path) for s in specs] == [
        ("web", 0.7, "/d/c4/*.json.gz"),
        ("code", 0.3, "/d/code.jsonl"),
    ]
    mix = to_object(compose("data=mixture", "data.sources.packages.weight=0.5")).data.sources
    assert mix["packages"]["weight"] == 0.5 and mix["modules"]["weight"] == 0.7


@pytest.fixture(scope="module")
def straight(tmp_path_factory, two_sources):
    run_dir = tmp_path_factory.mktemp("mix_straight")
    train_small(
        run_dir, two_sources[0], _mix(*two_sources), "train.max_steps=12", "checkpoint.export_hf=false"
    )
    return run_dir


def test_every_record_has_the_exact_tokens_of_each_source(straight, two_sources):
    recs = read_metrics(straight)
    w = normalized([0.6, 0.4])
    order = BlendOrder([Segment(0, w, (0, 0))])
    drawn = 0
    for r in recs:
        by = r["tokens_by_source"]
        assert sum(by.values()) == r["tokens"]
        n = r["global_batch_size"]
        s, _ = order.assign(drawn, n)
        assert by == {"big": int((s == 0).sum()) * 32, "small": int((s == 1).sum()) * 32}
        drawn += n
        total = np.array(order.counts(drawn))
        assert np.abs(total - np.array(w) * drawn).max() < 1  # the prefix rule after every step
    evals = [r for r in recs if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [5, 10, 12]
    for r in evals:
        by = r["val_loss_by_source"]
        assert set(by) == {"big", "small"} and min(by.values()) <= r["val_loss"] <= max(by.values())


def test_kill_and_two_resumes_give_the_uninterrupted_mixture_bitwise(straight, tmp_path, two_sources):
    state = json.loads((straight / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())
    cfg = to_object(compose(*SMALL, _mix(*two_sources)))
    data = build_data(cfg.data, cfg.tokenizer, 8, True, cfg.seed)
    small_sequences = len(data.train.sources[1])
    assert state["mixture"]["counts"]["small"] > small_sequences  # the small source started a new epoch
    assert state["mixture"]["epochs"] == {
        "big": 0,
        "small": state["mixture"]["counts"]["small"] // small_sequences,
    }
    for stop in (4, 8):
        train_small(
            tmp_path,
            two_sources[0],
            _mix(*two_sources),
            "train.max_steps=12",
            f"train.stop_at_step={stop}",
            "checkpoint.export_hf=false",
        )
    train_small(
        tmp_path, two_sources[0], _mix(*two_sources), "train.max_steps=12", "checkpoint.export_hf=false"
    )
    assert _rows(tmp_path) == _rows(straight)


def test_a_changed_mixture_is_refused_or_continued_from_each_sources_position(tmp_path, two_sources, caplog):
    args = ["train.max_steps=8", "checkpoint.export_hf=false", "eval.every=0"]
    train_small(tmp_path, two_sources[0], _mix(*two_sources), *args, "train.stop_at_step=4")
    saved = json.loads((tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())[
        "mixture"
    ]
    with pytest.raises(
        CheckpointError, match=r"another mixture \(big weight 0.6 -> 0.8, small weight 0.4 -> 0.2\)"
    ):
        train_small(tmp_path, two_sources[0], _mix(*two_sources, 0.8, 0.2), *args)
    with caplog.at_level(logging.WARNING, logger="harness"):
        train_small(
            tmp_path, two_sources[0], _mix(*two_sources, 0.8, 0.2), *args, "data.allow_mixture_change=true"
        )
    note = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mixture changed")]
    counts = saved["counts"]
    assert note == [
        f"mixture changed (big weight 0.6 -> 0.8, small weight 0.4 -> 0.2): the new weights apply from "
        f"here, each source continues (big at sample {counts['big']}, small at sample {counts['small']})"
    ]
    after = read_metrics(tmp_path)[4:]
    drawn = {"big": 0, "small": 0}
    for r in after:
        for k, v in r["tokens_by_source"].items():
            drawn[k] += v // 32
    total = sum(drawn.values())
    assert abs(drawn["big"] - 0.8 * total) < 1  # the new weights from the resume step on
    longer = ["train.max_steps=10", "checkpoint.export_hf=false", "eval.every=0"]
    train_small(
        tmp_path, two_sources[0], _mix(*two_sources, 0.8, 0.2), *longer
    )  # the new mixture is the run's now
    assert [r["step"] for r in read_metrics(tmp_path)][-3:] == [8, 9, 10]


def test_plan_prints_each_source_and_warns_about_many_epochs(two_sources):
    from harness.plan import make_plan, render_text

    cfg = to_object(compose(*SMALL, _mix(*two_sources, 0.2, 0.8), "train.max_steps=400", schema="plan"))
    pl = make_plan(cfg)
    by = {s["name"]: s for s in pl.sources}
    assert sum(s["planned_tokens"] for s in pl.sources) == pl.total_tokens
    assert by["small"]["epochs"] > 4 and by["big"]["epochs"] < 4
    assert any("data.sources.small repeats" in w and "Muennighoff" in w for w in pl.warnings)
    assert not any("data.sources.big repeats" in w for w in pl.warnings)
    assert "== Mixture" in render_text(pl)


BAD = [
    ("{big: {path: '{big}', wieght: 0.5}}", "data.sources.big: unknown key 'wieght'"),
    ("{big: {path: '{big}', weight: 0}}", "data.sources.big.weight=0 must be a number > 0"),
    ("{big: {path: '{big}', weight: heavy}}", "data.sources.big.weight='heavy' must be a number > 0"),
    ("{big: {path: '{big}'}, empty: {path: '{empty}'}}", "data.sources.empty: '"),
    (
        "{big: {path: '{big}'}, again: {path: '{big}'}}",
        "data.sources.again and data.sources.big resolve to the same",
    ),
    (
        "{big: {path: '{big}'}, notext: {path: '{notext}'}}",
        "data.sources.notext: data.text_field='text': no such column",
    ),
    (
        "{big: {path: '{big}'}, gone: {path: /nonexistent/*.jsonl}}",
        "data.sources.gone: '/nonexistent/*.jsonl' matches no",
    ),
    (
        "{big: {path: '{big}'}, linked: {path: '{hardlink}'}}",
        "data.sources.linked and data.sources.big resolve to the same",
    ),
    (
        "{big: {path: '{big}', format: xml}}",
        "data.sources.big.format='xml' is not one of text, json, parquet",
    ),
    ("{big: {path: '{big}', sample_by: word}}", "data.sources.big.sample_by='word' is not one of document"),
]


@pytest.mark.parametrize(
    "sources,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)]
)
def test_a_bad_source_is_one_line_naming_it_before_any_model(
    tmp_path, two_sources, sources, message, capsys, monkeypatch
):
    import harness.train as harness_train
    import harness.trainer

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notext.jsonl").write_text('{"body": "words"}\n' * 20)
    os.link(two_sources[0], tmp_path / "hardlink.jsonl")
    fill = {
        "{hardlink}": str(tmp_path / "hardlink.jsonl"),
        "{big}": two_sources[0],
        "{empty}": str(tmp_path / "empty.jsonl"),
        "{notext}": str(tmp_path / "notext.jsonl"),
    }
    for k, v in fill.items():
        sources = sources.replace(k, v)
    monkeypatch.setattr(harness.trainer, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    argv = [*SMALL, f"data.sources={sources}"]
    code = harness_train.run_cli(compose(*argv), str(tmp_path / "run"), argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_world2_mixture_resume_is_bitwise(tmp_path, two_sources):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(run_dir, *extra):
        cmd = [
            *TORCHRUN2,
            "-m",
            "harness.train",
            *SMALL,
            _mix(*two_sources),
            "parallel=fsdp",
            "train.max_steps=8",
            "eval.every=4",
            "checkpoint.export_hf=false",
            *extra,
            f"hydra.run.dir={run_dir}",
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "straight")
    launch(tmp_path / "resumed", "train.stop_at_step=3")
    launch(tmp_path / "resumed")
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")
    assert all(r["tokens_by_source"] for r in read_metrics(tmp_path / "straight"))


def test_source_checks_run_with_the_config_checks():
    with pytest.raises(ConfigError, match="data.sources.a: unknown key 'pth'"):
        from harness.config import validate

        validate(to_object(compose("data.sources={a: {pth: x}}")))
    with pytest.raises(ConfigError, match=r"data.sources=\{\} names no source"):
        validate(to_object(compose("data.sources={}")))
    assert issubclass(ConfigError, HarnessError)


def test_every_rank_gets_the_same_number_of_validation_batches():
    from harness.data import validation_batches
    from harness.data.loader import IGNORE_INDEX, PackedSequences

    seqs = PackedSequences(np.arange(3 * 8 + 1, dtype=np.uint16), 8)  # 3 sequences
    ranks = [validation_batches(seqs, 4, 2, rank, 2) for rank in (0, 1)]
    assert [len(r) for r in ranks] == [1, 1]
    assert ranks[0][0].input_ids.shape == (2, 8) and ranks[1][0].num_targets().item() == 8
    one = PackedSequences(
        np.arange(9, dtype=np.uint16), 8
    )  # 1 sequence: rank 1 runs a forward that counts nothing
    empty = validation_batches(one, 4, 2, 1, 2)[0]
    assert len(validation_batches(one, 4, 2, 0, 2)) == 1 and (empty.labels == IGNORE_INDEX).all()


def test_the_report_plots_tokens_and_validation_loss_by_source(straight, tmp_path):
    import shutil

    from harness.report import MIXTURE_PLOT, write_report

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(straight / "metrics.jsonl", run / "metrics.jsonl")
    write_report([str(run)])
    assert (run / "report" / MIXTURE_PLOT).stat().st_size > 5 * 1024
    plain = tmp_path / "plain"
    plain.mkdir()
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("tokens_by_source"), r.pop("val_loss_by_source", None)
    (plain / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report([str(plain)])
    assert not (plain / "report" / MIXTURE_PLOT).exists()


def test_plan_and_training_refuse_a_source_too_small_to_validate_in_the_same_words(tmp_path, two_sources):
    """A source whose ``val_fraction`` holds out fewer tokens than one sequence: the plan refused
    nothing, training refused it; now both apply harness.data.check_splits."""
    from harness.config import validate
    from harness.errors import DataError
    from harness.plan import make_plan

    (tmp_path / "tiny.jsonl").write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 20}) + "\n")
    mix = f"data.sources={{big: {{path: '{two_sources[0]}'}}, tiny: {{path: '{tmp_path / 'tiny.jsonl'}'}}}}"
    cfg = to_object(compose(*SMALL, mix))
    with pytest.raises(DataError) as trained:
        build_data(cfg.data, cfg.tokenizer, validate(cfg, 1).global_batch_size, need_val=True)
    with pytest.raises(DataError) as planned:
        make_plan(to_object(compose(*SMALL, mix, "plan.gpus=1", schema="plan")))
    held_out = int(str(trained.value).split("holds out ")[1].split(" ")[0])
    assert 0 < held_out < 33, held_out  # 5 % of a source of 20 to 660 tokens
    assert (
        str(planned.value)
        == str(trained.value)
        == (
            f"data.sources.tiny: data.val_fraction=0.05 holds out {held_out} tokens, fewer than one sequence "
            "of data.seq_len=32 + 1; raise data.val_fraction or set eval.every=0"
        )
    )
