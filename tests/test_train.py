"""End-to-end training in-process: per-step log values, checkpoints, exact resume, HF export."""

import math
import os

import pytest
import torch
from conftest import SMALL, checkpoint_state, checkpoints, compose, read_metrics, train_small

from harness import checkpoint as ckpt
from harness.config import to_object
from harness.errors import CheckpointError, ConfigError
from harness.hooks import EvalHook
from harness.schedule import BatchRamp, LRSchedule
from harness.trainer import TrainState

REQUIRED = {
    "step",
    "epoch",
    "tokens",
    "tokens_total",
    "loss",
    "lr",
    "grad_norm",
    "global_batch_size",
    "gradient_accumulation_steps",
    "step_time_s",
    "data_s",
    "forward_backward_s",
    "optimizer_s",
    "comm_s",
    "comm_exposed_s",
    "comm_bytes",
    "comm_busbw_gbps",
    "tokens_per_second",
    "mfu",
    "max_memory_bytes",
    "val_loss",
}
TIMING = {
    "step_time_s",
    "data_s",
    "forward_backward_s",
    "optimizer_s",
    "tokens_per_second",
    "mfu",
    "max_memory_bytes",
    "elapsed_s",
}


def _values(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def run12(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("run12")
    state = train_small(run_dir, small_corpus, "train.max_steps=12")
    return run_dir, state


def test_every_step_is_logged_with_exact_values(run12):
    run_dir, state = run12
    recs = read_metrics(run_dir)
    assert [r["step"] for r in recs] == list(range(1, 13)) and state.step == 12
    assert REQUIRED <= set(recs[0])
    ramp = BatchRamp(full=8, increment=2, start=4, steps=4)
    sched = LRSchedule("cosine", lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=12)
    total = 0
    for r in recs:
        s = r["step"]
        assert r["global_batch_size"] == ramp.at(s)
        assert r["gradient_accumulation_steps"] == ramp.at(s) // 2
        assert r["tokens"] == ramp.at(s) * 32
        total += r["tokens"]
        assert r["tokens_total"] == total
        assert r["lr"] == pytest.approx(sched(s), rel=1e-12)
        assert r["comm_s"] == 0 and r["comm_bytes"] == 0
        assert r["step_time_s"] >= r["forward_backward_s"] > 0 and 0 < r["mfu"] < 1
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert [r["global_batch_size"] for r in recs[:6]] == [4, 4, 6, 6, 8, 8]
    assert [r["step"] for r in recs if r["val_loss"] is not None] == [5, 10, 12]
    assert recs[-1]["lr"] == pytest.approx(3e-4)
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
    assert checkpoints(run_dir) == ["step_00000010", "step_00000012"]  # every=5, keep_last=2, plus the end
    assert os.path.isfile(run_dir / ".hydra" / "resolved.yaml")


def test_hf_export_reloads_with_same_logits(run12):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model import build_model

    run_dir, _ = run12
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    cfg = to_object(compose(*SMALL))
    model = build_model(cfg.model, exported.config.vocab_size, seed=0)
    model.load_state_dict(checkpoint_state(run_dir / "checkpoints" / "step_00000012")["model"])
    ids = torch.tensor([tok("def add(a, b):\n    return a + b\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, model(input_ids=ids).logits)
    assert exported.config._attn_implementation == "sdpa"


def test_resume_after_a_crash_is_bitwise_identical(tmp_path, small_corpus, monkeypatch):
    straight = tmp_path / "straight"
    train_small(straight, small_corpus, "train.max_steps=12")

    class Crash(Exception):
        pass

    save = ckpt.CheckpointManager.save

    def save_then_crash(self, step, *args, **kwargs):
        path = save(self, step, *args, **kwargs)
        if step == 5:
            self.wait()  # the asynchronous save complete, then the crash
            raise Crash()
        return path

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(ckpt.CheckpointManager, "save", save_then_crash)
    with pytest.raises(Crash):
        train_small(stopped, small_corpus, "train.max_steps=12")
    monkeypatch.setattr(ckpt.CheckpointManager, "save", save)
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3, 4, 5]
    state = train_small(stopped, small_corpus, "train.max_steps=12", "checkpoint.resume=auto")
    assert state.step == 12
    assert _values(read_metrics(stopped)) == _values(read_metrics(straight))  # losses, lr, grad norms, tokens
    a = checkpoint_state(straight / "checkpoints" / "step_00000012")
    b = checkpoint_state(stopped / "checkpoints" / "step_00000012")
    assert a["model"].keys() == b["model"].keys() and all(
        torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
    )
    oa, ob = a["optim"]["state"], b["optim"]["state"]
    assert len(oa) == 20 and all(torch.equal(oa[n]["exp_avg_sq"], ob[n]["exp_avg_sq"]) for n in oa)


def test_resume_from_another_run_directory(tmp_path, small_corpus):
    train_small(tmp_path / "a", small_corpus, "train.max_steps=5", "eval.every=0")
    state = train_small(
        tmp_path / "b",
        small_corpus,
        "train.max_steps=7",
        "eval.every=0",
        f"checkpoint.resume={tmp_path / 'a'}",
    )
    assert state.step == 7 and [r["step"] for r in read_metrics(tmp_path / "b")] == [6, 7]


def test_rerun_with_larger_budget_continues(tmp_path, small_corpus):
    train_small(tmp_path, small_corpus, "train.max_steps=6", "schedule=constant", "schedule.warmup_steps=2")
    first = read_metrics(tmp_path)
    state = train_small(
        tmp_path, small_corpus, "train.max_steps=9", "schedule=constant", "schedule.warmup_steps=2"
    )
    recs = read_metrics(tmp_path)
    assert state.step == 9 and [r["step"] for r in recs] == list(range(1, 10))
    assert _values(recs[:6]) == _values(first)
    assert recs[6]["tokens_total"] == recs[5]["tokens_total"] + recs[6]["tokens"]


def test_token_budget_ends_at_the_converted_step(tmp_path, small_corpus):
    # ramp 4,4,6,6 then 8 sequences of 32 tokens: 128,128,192,192,256,... cumulative 640 after 4 steps
    train_small(tmp_path, small_corpus, "train.max_steps=null", "train.max_tokens=1000", "eval.every=0")
    recs = read_metrics(tmp_path)
    assert [r["tokens_total"] for r in recs] == [128, 256, 448, 640, 896, 1152]
    assert recs[-2]["tokens_total"] < 1000 <= recs[-1]["tokens_total"]


def test_guards_against_another_models_checkpoints(tmp_path, small_corpus):
    train_small(tmp_path, small_corpus, "train.max_steps=5", "eval.every=0")
    with pytest.raises(
        CheckpointError, match=r"with a different model \(model.hidden_size: checkpoint 64 vs now 96\)"
    ):
        train_small(tmp_path, small_corpus, "train.max_steps=6", "model.hidden_size=96")
    with pytest.raises(
        CheckpointError, match=r"with a different data \(data.seq_len: checkpoint 32 vs now 16\)"
    ):
        train_small(tmp_path, small_corpus, "train.max_steps=6", "data.seq_len=16")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line for i, line in enumerate(open(small_corpus)) if i % 2 == 0))
    with pytest.raises(CheckpointError, match=r"with a different data \(data.tokenizer: .*data.tokens: "):
        train_small(tmp_path, str(other), "train.max_steps=6")
    with pytest.raises(
        CheckpointError, match=r"checkpoint.resume='atuo' is not auto, never, or a complete checkpoint"
    ):
        train_small(tmp_path, small_corpus, "train.max_steps=6", "checkpoint.resume=atuo")
    with pytest.raises(ConfigError, match="checkpoint.resume=never, but .* already holds checkpoints"):
        train_small(tmp_path, small_corpus, "train.max_steps=6", "checkpoint.resume=never")
    assert checkpoints(tmp_path) == ["step_00000005"] and len(read_metrics(tmp_path)) == 5


def test_early_stopping_counts_evaluations_without_improvement():
    hook = EvalHook(every=1, patience=2, batches=[])
    state = TrainState()
    stops = []
    for loss in (3.0, 2.5, 2.6, 2.4, 2.45, 2.5):
        hook.update(state, loss)
        stops.append(state.stopped_early)
    assert stops == [False, False, False, False, False, True] and state.best_val_loss == 2.4


@pytest.mark.slow
def test_gpt2_style_model_trains(tmp_path, small_corpus):
    train_small(
        tmp_path,
        small_corpus,
        "model=gpt2_tiny",
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.intermediate_size=128",
        "train.max_steps=6",
        "eval.every=0",
    )
    recs = read_metrics(tmp_path)
    assert len(recs) == 6 and recs[-1]["loss"] < recs[0]["loss"]


@pytest.mark.slow
def test_wikitext2_with_the_real_gpt2_tokenizer(tmp_path, shared_data):
    train_small(
        tmp_path,
        str(shared_data / "wikitext2" / "valid.jsonl"),
        f"tokenizer.path={shared_data}/tokenizers/gpt2",
        "train.max_steps=8",
        "eval.every=4",
    )
    recs = read_metrics(tmp_path)
    assert len(recs) == 8
    assert abs(recs[0]["loss"] - math.log(50304)) < 0.3  # vocabulary 50257 padded to a multiple of 64
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3 and recs[-1]["val_loss"] < recs[3]["val_loss"]


@pytest.mark.slow
def test_c4_json_gz_with_the_llama_style_tokenizer(tmp_path, shared_data):
    train_small(
        tmp_path,
        f"{shared_data}/c4_sample/*.json.gz",
        f"tokenizer.path={shared_data}/tokenizers/mistral_v1_spm",
        "train.max_steps=5",
        "eval.every=0",
        "train.global_batch_size=4",
        "schedule.batch_warmup.start_global_batch_size=null",
    )
    recs = read_metrics(tmp_path)
    assert len(recs) == 5 and abs(recs[0]["loss"] - math.log(32000)) < 0.3


def test_export_command_from_a_single_process_checkpoint(run12, tmp_path):
    from transformers import AutoModelForCausalLM

    from harness.export import main as export_main

    run_dir, _ = run12
    export_main([str(run_dir / "checkpoints" / "step_00000012"), str(tmp_path / "out")])
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    with pytest.raises(SystemExit):
        export_main([str(tmp_path), str(tmp_path / "nowhere")])  # not a checkpoint: one error line, exit 2
