"""The command line as users run it: ``python -m harness.train`` with Hydra overrides."""

import hashlib
import os
import subprocess
import sys

import pytest
from conftest import REPO, SMALL, checkpoints, read_metrics

pytestmark = pytest.mark.slow


def harness_train(*args, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_corpus):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    harness_train(*SMALL, f"data.path={small_corpus}", "train.max_steps=6", f"hydra.run.dir={run_dir}")
    return run_dir


def test_cli_run_writes_config_log_checkpoint_and_export(cli_run):
    assert [r["step"] for r in read_metrics(cli_run)] == [1, 2, 3, 4, 5, 6]
    for path in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        ".hydra/resolved.yaml",
        "train.log",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
    ):
        assert (cli_run / path).is_file(), path
    assert checkpoints(cli_run) == ["step_00000005", "step_00000006"]


def _fingerprint(run_dir):
    """Hashes of every file of a run."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.max_stepz=10"], "Key 'max_stepz' not in 'TrainingConfig'"),
        (["train.max_steps=ten"], "Value 'ten' of type 'str' could not be converted to Integer"),
        (
            ["train.global_batch_size=7"],
            "error: train.global_batch_size=7 is not divisible by micro_batch_size=2",
        ),
        (
            ["train.gradient_accumulation_steps=3"],
            "error: train.global_batch_size=8 != micro_batch_size=2 x gradient_accumulation_steps=3",
        ),
        (["data.seq_len=4096"], "error: data.seq_len=4096 exceeds model.max_position_embeddings=1024"),
        (["data.path=/nonexistent/*.jsonl"], "error: data.path: '/nonexistent/*.jsonl' matches no file"),
        (["data.path={notext}"], "error: data.text_field='text': no such column in"),
        (["data.path={tiny}"], "error: data.path: the corpus is too small for one batch"),
        (
            ["model.vocab_size=1000", "tokenizer.path={shared}/tokenizers/gpt2"],
            "error: model.vocab_size=1000 is smaller than the tokenizer's vocabulary (50257 tokens)",
        ),
    ],
)
def test_bad_input_fails_before_the_model_and_keeps_the_run(cli_run, tmp_path, shared_data, args, message):
    (tmp_path / "notext.jsonl").write_text('{"body": "some words"}\n' * 10)
    (tmp_path / "tiny.txt").write_text("only a handful of words\n")
    subs = {"notext": tmp_path / "notext.jsonl", "tiny": tmp_path / "tiny.txt", "shared": shared_data}
    before = _fingerprint(cli_run)
    proc = harness_train(
        *SMALL,
        "train.max_steps=6",
        f"hydra.run.dir={cli_run}",
        *[a.format(**subs) for a in args],
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "model: " not in proc.stdout  # failed before any model was built
    if message.startswith("error: "):
        assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
    assert _fingerprint(cli_run) == before  # .hydra/, train.log, metrics, checkpoints untouched


def test_rejected_new_run_leaves_no_directory(tmp_path):
    proc = harness_train(*SMALL, "train.global_batch_size=7", f"hydra.run.dir={tmp_path}/new", check=False)
    assert proc.returncode == 2 and not (tmp_path / "new").exists()


def test_cli_resume_with_larger_budget(cli_run, small_corpus):
    harness_train(
        *SMALL,
        f"data.path={small_corpus}",
        "train.max_steps=8",
        f"hydra.run.dir={cli_run}",
        "checkpoint.resume=auto",
    )
    recs = read_metrics(cli_run)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert checkpoints(cli_run) == ["step_00000006", "step_00000008"]


def test_stop_signal_checkpoints_and_a_rerun_continues_identically(tmp_path, small_corpus):
    """SIGUSR1 (Slurm's --signal) mid-run: the step finishes, a checkpoint is written, exit status 75;
    the rerun ends exactly as an uninterrupted run."""
    import signal
    import time

    args = [*SMALL, f"data.path={small_corpus}", "train.max_steps=30", "checkpoint.every=0", "eval.every=0"]
    harness_train(*args, f"hydra.run.dir={tmp_path / 'straight'}")
    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.train", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run_dir / "metrics.jsonl").exists()
        and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert 3 <= stopped_at < 30 and checkpoints(run_dir) == [f"step_{stopped_at:08d}"]
    assert not (run_dir / "hf").exists()  # not finished: no export yet
    harness_train(*args, f"hydra.run.dir={run_dir}")
    keep = ("step", "loss", "grad_norm", "lr", "tokens_total")
    assert [{k: r[k] for k in keep} for r in read_metrics(run_dir)] == [
        {k: r[k] for k in keep} for r in read_metrics(tmp_path / "straight")
    ]
