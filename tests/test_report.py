"""``harness.report`` on synthetic ``metrics.jsonl`` files (no training): files written, plots not
blank, HTML self-contained, summary numbers equal to ones computed here from the JSONL, several
runs, resumes, partial lines and the command line."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.errors import DataError
from harness.report import PLOTS, load_metrics, summarize, write_report

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


def make_record(step: int, elapsed: float, *, seed: int = 0, exposed_null: bool = False) -> dict:
    """A deterministic, realistic-looking record for ``step`` (values vary with step and seed)."""
    batch = 8 if step <= 10 else 16
    tokens = batch * 128
    data_s = 0.002 + 0.001 * (step % 3)
    fb_s = 0.25 + 0.01 * batch + 0.02 * math.sin(step + seed)
    opt_s = 0.03 + 0.005 * (step % 2)
    comm_s = 0.08 + 0.01 * math.cos(step)
    step_time = data_s + fb_s + opt_s
    return {
        "step": step,
        "epoch": step / 100,
        "tokens": tokens,
        "tokens_total": tokens * step if step <= 10 else 1280 + tokens * (step - 10),
        "loss": 2.0 + 6.0 / math.sqrt(step) + 0.05 * math.sin(3 * step) + 0.1 * seed,
        "lr": 3e-3 * min(1.0, step / 5) * (0.5 + 0.5 * math.cos(math.pi * step / 40)),
        "grad_norm": 1.0 + 1.0 / step,
        "global_batch_size": batch,
        "gradient_accumulation_steps": batch // 8,
        "step_time_s": step_time,
        "data_s": data_s,
        "forward_backward_s": fb_s,
        "optimizer_s": opt_s,
        "comm_s": comm_s,
        "comm_exposed_s": None if exposed_null else 0.3 * comm_s,
        "comm_bytes": 50_000_000,
        "comm_busbw_gbps": 1.5,
        "comm_bytes_by_op": {"all_gather": 33_000_000, "reduce_scatter": 17_000_000},
        "tokens_per_second": tokens / step_time,
        "mfu": 0.05 if step == 1 else 0.4 + 0.02 * math.sin(step) - 0.01 * seed,
        "max_memory_bytes": int((1.5 + 0.01 * min(step, 20) + 0.2 * seed) * GIB),
        "elapsed_s": elapsed,
        "val_loss": None,
    }


VAL = {10: 4.0, 20: 3.5, 30: 3.7}  # the best (3.5 at step 20) is not the last


def synthetic_run(run_dir: Path, steps: int = 30, *, seed: int = 0) -> Path:
    """``steps`` records, val_loss every 10 steps, ``comm_exposed_s`` null at step 7."""
    run_dir.mkdir(parents=True, exist_ok=True)
    elapsed, lines = 0.0, []
    for step in range(1, steps + 1):
        r = make_record(step, 0.0, seed=seed, exposed_null=step == 7)
        elapsed += r["step_time_s"] + 0.01
        r["elapsed_s"] = elapsed
        if step in VAL:
            r["val_loss"] = VAL[step] + 0.1 * seed
            elapsed += 0.5  # evaluation time shows up in the next step's elapsed_s
        lines.append(json.dumps(r))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected_summary(records: list[dict]) -> dict:
    """The documented definitions, computed independently of harness.report."""
    vals = [(r["val_loss"], r["step"]) for r in records if r.get("val_loss") is not None]
    best_val, best_step = min(vals)
    steady = [r for r in records if r["step"] != 1]
    total_time = sum(r["step_time_s"] for r in records)
    measured = [r for r in records if r["comm_exposed_s"] is not None]
    return {
        "steps": records[-1]["step"],
        "final_loss": records[-1]["loss"],
        "best_val_loss": best_val,
        "best_val_step": best_step,
        "total_tokens": records[-1]["tokens_total"],
        "train_time_s": total_time,
        "mean_mfu": sum(r["mfu"] * r["step_time_s"] for r in steady) / sum(r["step_time_s"] for r in steady),
        "mean_tokens_per_second": sum(r["tokens"] for r in steady) / sum(r["step_time_s"] for r in steady),
        "comm_share": sum(r["comm_s"] for r in records) / total_time,
        "exposed_comm_share": sum(r["comm_exposed_s"] for r in measured)
        / sum(r["step_time_s"] for r in measured),
        "peak_memory_bytes": max(r["max_memory_bytes"] for r in records),
    }


def assert_png_readable(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.stat().st_size > 5 * 1024, f"{path.name} is only {path.stat().st_size} bytes"
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 800, img.shape
    pixels = img.reshape(-1, img.shape[-1])
    assert (pixels != pixels[0]).any(), f"{path.name} is a single uniform colour"
    rgb = (pixels[:, :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    assert len(colours) > 50, f"{path.name} has almost no content ({len(colours)} colours)"
    return img


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("runs") / "run-a")
    html_path = write_report([str(run)])
    return run, Path(html_path)


def test_single_run_writes_every_file_in_the_default_directory(single):
    run, html_path = single
    assert html_path == run / "report" / "report.html"
    for name in (*PLOTS, "summary.json", "report.html"):
        assert (run / "report" / name).is_file(), name
    for png in PLOTS:
        assert_png_readable(run / "report" / png)


def test_html_is_self_contained_and_names_the_run(single):
    run, html_path = single
    text = html_path.read_text()
    assert "<title>Training report: run-a</title>" in text
    assert text.count("data:image/png;base64,") == len(PLOTS)
    for png in PLOTS:
        encoded = base64.b64encode((run / "report" / png).read_bytes()).decode()
        assert f"data:image/png;base64,{encoded}'" in text, png
    lowered = text.lower()
    for external in ("http://", "https://", "<script", "<link", "src='/", 'src="'):
        assert external not in lowered, external
    # the summary table shows the formatted values
    assert "<td>30</td>" in text  # steps
    assert "<td>3.5000</td>" in text and "<td>20</td>" in text  # best val loss and its step


def test_summary_json_equals_values_computed_from_the_jsonl(single):
    run, _ = single
    records = read_jsonl(run / "metrics.jsonl")
    want = expected_summary(records)
    (got,) = json.loads((run / "report" / "summary.json").read_text())
    assert got["run"] == "run-a"
    assert got["steps"] == 30 == want["steps"]
    assert got["final_loss"] == want["final_loss"]
    assert got["best_val_loss"] == want["best_val_loss"] == 3.5
    assert got["best_val_step"] == want["best_val_step"] == 20
    assert got["total_tokens"] == want["total_tokens"] == 1280 + 2048 * 20
    assert got["peak_memory_bytes"] == want["peak_memory_bytes"]
    for key in ("train_time_s", "mean_mfu", "mean_tokens_per_second", "comm_share", "exposed_comm_share"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    # the rule matters: step 1 (warm-up, mfu 0.05) is left out of the mean
    assert got["mean_mfu"] != pytest.approx(sum(r["mfu"] for r in records) / len(records), rel=1e-6)
    # one process: wall time is the last elapsed_s, which includes the evaluation pauses
    assert got["resumes"] == 0
    assert got["wall_time_s"] == records[-1]["elapsed_s"]
    assert got["wall_time_s"] > got["train_time_s"] + 2 * 0.5


def test_exposed_comm_share_ignores_unmeasured_steps_and_is_none_when_never_measured():
    records = [make_record(s, float(s), exposed_null=s == 2) for s in (1, 2, 3)]
    measured = [records[0], records[2]]
    want = sum(r["comm_exposed_s"] for r in measured) / sum(r["step_time_s"] for r in measured)
    assert summarize(records)["exposed_comm_share"] == pytest.approx(want, rel=1e-12)
    for r in records:
        r["comm_exposed_s"] = None
    assert summarize(records)["exposed_comm_share"] is None


def test_resume_keeps_the_last_duplicate_and_sums_wall_time_per_process(tmp_path):
    run = tmp_path / "resumed"
    run.mkdir()
    lines, elapsed = [], 0.0
    for step in range(1, 19):  # first process: steps 1..18
        r = make_record(step, 0.0)
        elapsed += r["step_time_s"]
        r["elapsed_s"] = elapsed
        lines.append(r)
    first_kept_max = lines[14]["elapsed_s"]  # step 15: the checkpoint the resume starts from
    elapsed = 0.0
    for step in range(16, 26):  # second process repeats 16..18 (as if not cut back), then goes on
        r = make_record(step, 0.0, seed=1)
        elapsed += r["step_time_s"] + 0.2
        r["elapsed_s"] = elapsed
        lines.append(r)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    records = load_metrics(str(run))
    assert [r["step"] for r in records] == list(range(1, 26))
    assert records[15]["loss"] == lines[18]["loss"]  # step 16 from the second process
    s = summarize(records)
    assert s["resumes"] == 1
    assert s["wall_time_s"] == pytest.approx(first_kept_max + lines[-1]["elapsed_s"], rel=1e-12)
    assert s["train_time_s"] == pytest.approx(sum(r["step_time_s"] for r in records), rel=1e-12)
    assert s["final_loss"] == lines[-1]["loss"]


def test_partial_last_line_is_skipped_but_a_corrupt_middle_line_is_an_error(tmp_path):
    run = synthetic_run(tmp_path / "live", steps=12)
    full = (run / "metrics.jsonl").read_text()
    partial = json.dumps(make_record(13, 99.0))[:57]
    (run / "metrics.jsonl").write_text(full + partial)
    records = load_metrics(str(run))
    assert [r["step"] for r in records] == list(range(1, 13))
    html_path = write_report([str(run)], str(tmp_path / "out"))
    (got,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert got["steps"] == 12 and got["final_loss"] == json.loads(full.splitlines()[-1])["loss"]
    assert os.path.isfile(html_path)

    lines = full.splitlines()
    lines[4] = lines[4][:30]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:5: not valid JSON"):
        load_metrics(str(run))


def test_missing_keys_are_tolerated(tmp_path):
    run = tmp_path / "sparse"
    run.mkdir()
    keep = ("step", "loss", "tokens_total", "step_time_s", "elapsed_s")
    records = [{k: v for k, v in make_record(s, 0.1 * s).items() if k in keep} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    s = summarize(load_metrics(str(run)))
    assert s["steps"] == 5 and s["final_loss"] == records[-1]["loss"]
    assert s["best_val_loss"] is None and s["best_val_step"] is None
    assert s["mean_mfu"] is None and s["comm_share"] is None and s["peak_memory_bytes"] is None
    write_report([str(run)])
    for png in PLOTS:
        assert (run / "report" / png).stat().st_size > 0


def test_missing_or_empty_metrics_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"empty-dir: no metrics\.jsonl \(is this a run directory\?\)"):
        (tmp_path / "empty-dir").mkdir()
        load_metrics(str(tmp_path / "empty-dir"))
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load_metrics(str(tmp_path / "nowhere"))
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="no complete records"):
        write_report([str(tmp_path / "fresh")])


def test_two_runs_are_compared_in_one_report(tmp_path, single):
    a = synthetic_run(tmp_path / "runs" / "baseline")
    b = synthetic_run(tmp_path / "runs" / "bigger-lr", seed=1)
    html_path = Path(write_report([str(a), str(b)]))
    out = tmp_path / "runs" / "report-compare"
    assert html_path == out / "report.html"

    rows = json.loads((out / "summary.json").read_text())
    assert [r["run"] for r in rows] == ["baseline", "bigger-lr"]
    for row, run in zip(rows, (a, b)):
        want = expected_summary(read_jsonl(run / "metrics.jsonl"))
        assert row["final_loss"] == want["final_loss"]
        assert row["best_val_loss"] == want["best_val_loss"] and row["best_val_step"] == want["best_val_step"]
        assert row["mean_mfu"] == pytest.approx(want["mean_mfu"], rel=1e-12)
        assert row["comm_share"] == pytest.approx(want["comm_share"], rel=1e-12)
    assert rows[1]["best_val_loss"] == pytest.approx(3.6) and rows[0]["best_val_loss"] == 3.5

    text = html_path.read_text()
    assert "Training comparison: baseline, bigger-lr" in text
    assert text.count("<th>baseline</th>") == 1 and text.count("<th>bigger-lr</th>") == 1
    assert text.count("data:image/png;base64,") == len(PLOTS)
    for png in PLOTS:
        assert_png_readable(out / png)
    # one time-breakdown subplot per run: the comparison figure is taller than the single-run one
    from matplotlib.image import imread

    single_run, _ = single
    single_height = imread(str(single_run / "report" / "time_breakdown.png")).shape[0]
    assert imread(str(out / "time_breakdown.png")).shape[0] > single_height


def test_runs_with_the_same_directory_name_get_distinct_names(tmp_path):
    a = synthetic_run(tmp_path / "x" / "run", steps=5)
    b = synthetic_run(tmp_path / "y" / "run", steps=5)
    write_report([str(a), str(b)], str(tmp_path / "cmp"))
    rows = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert [r["run"] for r in rows] == ["x/run", "y/run"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.report", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_the_report_and_prints_a_line_per_run(tmp_path):
    a = synthetic_run(tmp_path / "a")
    b = synthetic_run(tmp_path / "b", seed=1)
    out = tmp_path / "out"
    proc = run_cli(str(a), str(b), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == str(out / "report.html")
    assert len(lines) == 3
    assert lines[1].startswith("a: 30 steps, final loss ") and "best val 3.5000 @ step 20" in lines[1]
    assert lines[2].startswith("b: 30 steps, ") and "best val 3.6000 @ step 20" in lines[2]
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()


def test_cli_without_metrics_exits_2_with_one_error_line(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    proc = run_cli(str(tmp_path / "not-a-run"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert err == [f"error: {tmp_path / 'not-a-run'}: no metrics.jsonl (is this a run directory?)"]

    proc = run_cli(str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
