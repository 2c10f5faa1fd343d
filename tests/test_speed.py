"""Speed switches keep the numbers: prefetching loader workers, layer-selective activation
checkpointing and per-block torch.compile give the losses of the plain run."""

import pytest
from conftest import SMALL, compose, read_metrics, train_small

from harness.config import to_object
from harness.model import build_model
from harness.parallel.base import apply_activation_checkpointing, transformer_blocks

KEEP = ("step", "loss", "grad_norm", "lr", "tokens_total", "global_batch_size")
BASE = ["train.max_steps=12", "checkpoint.every=0", "checkpoint.export_hf=false", "model.num_layers=4"]


def _rows(run_dir):
    return [{k: r[k] for k in KEEP} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    train_small(run_dir, small_corpus, *BASE)
    return _rows(run_dir)


def test_prefetching_loader_workers_change_nothing_and_resume(tmp_path, small_corpus, plain):
    train_small(tmp_path / "w2", small_corpus, *BASE, "data.loader_workers=2")
    assert _rows(tmp_path / "w2") == plain
    # stop after step 5 and resume, both with workers: the resumed stream starts at step 6
    train_small(tmp_path / "r", small_corpus, *BASE, "data.loader_workers=3", "train.stop_at_step=5")
    train_small(tmp_path / "r", small_corpus, *BASE, "data.loader_workers=3")
    assert _rows(tmp_path / "r") == plain


def test_selective_activation_checkpointing(tmp_path, small_corpus, plain):
    cfg = to_object(compose(*SMALL, "model.num_layers=4"))
    model = build_model(cfg.model, 320, 0)
    apply_activation_checkpointing(model, every=2)
    assert [b.gradient_checkpointing for b in transformer_blocks(model)] == [True, False, True, False]
    train_small(
        tmp_path / "ac",
        small_corpus,
        *BASE,
        "parallel.activation_checkpointing=true",
        "parallel.activation_checkpointing_every=2",
    )
    assert _rows(tmp_path / "ac") == plain  # recomputation is exact on CPU


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path, small_corpus, plain):
    train_small(tmp_path / "c", small_corpus, *BASE, "train.compile=true")
    got = _rows(tmp_path / "c")
    assert [r["step"] for r in got] == [r["step"] for r in plain]
    for a, b in zip(got, plain):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_no_call_of_transformers_apis_deprecated_for_v6():
    """``gradient_checkpointing_enable`` / ``_disable`` / ``is_gradient_checkpointing`` are removed in
    transformers v6; only the fallback for transformers without ``activation_checkpointing_enable``
    (harness/parallel/base.py) may call one, and the harness's own path warns nothing."""
    import re
    import warnings

    from conftest import REPO

    calls = re.compile(r"\.(gradient_checkpointing_(enable|disable)|is_gradient_checkpointing)\(")
    found = [
        f"{p.relative_to(REPO)}:{n}"
        for d in ("harness", "bench", "tests")
        for p in sorted((REPO / d).rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if calls.search(line)
    ]
    import inspect

    lines, start = inspect.getsourcelines(apply_activation_checkpointing)  # the fallback, wherever it moves
    fallback = start + next(i for i, line in enumerate(lines) if calls.search(line))
    assert found == [f"harness/parallel/base.py:{fallback}"], found
    cfg = to_object(compose(*SMALL))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_activation_checkpointing(build_model(cfg.model, 320, 0))
