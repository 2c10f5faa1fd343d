"""Training report: summary numbers, PNG plots and a self-contained HTML page from ``metrics.jsonl``.

Usage::

    python -m harness.report RUN_DIR [RUN_DIR ...] [--out DIR]

For each run directory this reads ``metrics.jsonl`` (one JSON object per optimizer step, see
:class:`harness.metrics.StepMetrics`) and writes, into the output directory:

- ``loss.png``: train and validation loss (nats) vs step and vs tokens seen;
- ``lr_batch.png``: learning rate and global batch size (sequences) vs step;
- ``throughput.png``: tokens per second and MFU (%) vs step;
- ``time_breakdown.png``: seconds per step split into data, compute, exposed communication and
  optimizer, with total communication time drawn as a line (it overlaps compute);
- ``memory.png``: peak memory (GiB: CUDA max allocated, or peak RSS on CPU) vs step;
- ``ranks.png`` (runs with a ``rank_stats.jsonl``, the full per-rank vectors of every
  ``logging.rank_stats_full_every`` steps): rank x step heat maps of step time and busy time (step time
  minus the time spent waiting on peers: a straggler is a bright row), and in ``report.html`` a table
  of the ``straggler`` events (from the records' ``rank_stats`` and ``slowest_ranks``);
- ``summary.json``: one ``{"run": name, **summarize(records)}`` object per run;
- ``report.html``: a title, the summary table (one column per run) and the plots, embedded as
  ``data:image/png`` URIs, so the file can be mailed or archived on its own.

Units throughout: times in seconds, token counts in tokens, memory in bytes (GiB in plots),
loss in nats, MFU and shares as fractions 0..1 (percent in plots and the HTML table).

The file may still be being written: an unparsable *last* line is skipped. After a resume the
log was cut back to the checkpoint step and then appended; if a step ever appears twice, the
last record for it wins. Missing keys are tolerated (the value counts as absent).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from collections.abc import Sequence

from harness.errors import DataError, HarnessError

METRICS_FILE = "metrics.jsonl"
RANK_STATS_FILE = "rank_stats.jsonl"  # harness.hooks.rank_stats.FULL_FILE
PLOTS = ("loss.png", "lr_batch.png", "throughput.png", "time_breakdown.png", "memory.png")
MIXTURE_PLOT = "mixture.png"  # only for runs on a mixture (records with tokens_by_source)
RANKS_PLOT = (
    "ranks.png"  # only for runs with a rank_stats.jsonl (several ranks, logging.rank_stats_full_every)
)
GIB = 1024**3


# ----------------------------------------------------------------------------- loading


def _metrics_path(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise DataError(f"{run_dir}: no such directory (expected a run directory holding {METRICS_FILE})")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{run_dir}: no {METRICS_FILE} (is this a run directory?)")
    return path


def load_metrics(run_dir: str) -> list[dict]:
    """Read ``<run_dir>/metrics.jsonl`` into a list of per-step records, sorted by step.

    Blank lines are ignored; an
    unparsable last line (a record still being written) is skipped; when a step occurs more than
    once (a resume), the last record for it is kept; lines without an integer ``step`` are
    ignored. Values are returned as logged (times in seconds, tokens, bytes).

    Raises:
        DataError: the directory or ``metrics.jsonl`` does not exist, or a line other than the
            last is not a JSON object (a corrupt file), naming the file and line.
    """
    return _load_jsonl(_metrics_path(run_dir))


def load_rank_stats(run_dir: str) -> list[dict]:
    """Read ``<run_dir>/rank_stats.jsonl`` (the full per-rank vectors that rank 0 writes every
    ``logging.rank_stats_full_every`` steps: ``{"step", <field>: [value of rank 0, 1, ...], ...}``)
    like :func:`load_metrics`; ``[]`` when the run has no such file.

    Raises:
        DataError: a line other than the last is not a JSON object, naming the file and line.
    """
    path = os.path.join(run_dir, RANK_STATS_FILE)
    return _load_jsonl(path) if os.path.isfile(path) else []


def _load_jsonl(path: str) -> list[dict]:
    """The records of one JSON-lines file by step (the rules of :func:`load_metrics`)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    by_step: dict[int, dict] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # the writer is mid-line: skip the partial record
            raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg}); the file is corrupt") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{i + 1}: expected a JSON object per line, got {type(record).__name__}")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step):
            continue
        record["step"] = int(step)
        by_step[int(step)] = record  # a later duplicate replaces an earlier one
    return [by_step[s] for s in sorted(by_step)]


# ----------------------------------------------------------------------------- summary


def _num(value) -> float | None:
    """A logged number as float; None for absent/null/unparsable. ``"inf"`` strings (how
    :mod:`harness.metrics` writes non-finite values) become ``float('inf')``."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            return None
        return None if math.isnan(v) else v
    return None


def _values(records: Sequence[dict], key: str) -> list[float]:
    return [v for v in (_num(r.get(key)) for r in records) if v is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _steady(records: Sequence[dict]) -> list[dict]:
    """The records used for means: all but step 1 (warm-up, compilation) when there are others."""
    rest = [r for r in records if r.get("step") != 1]
    return rest if rest else list(records)


def _segments(records: Sequence[dict]) -> list[list[dict]]:
    """Split records into one list per training process: a new one starts where ``elapsed_s``
    goes down (it restarts from about 0 after a resume). Records without ``elapsed_s`` are left out."""
    segments: list[list[dict]] = []
    prev = None
    for r in records:
        t = _num(r.get("elapsed_s"))
        if t is None:
            continue
        if prev is None or t < prev:
            segments.append([])
        segments[-1].append(r)
        prev = t
    return segments


def _ratio(records: list[dict], num: str, den: str) -> float | None:
    pairs = [(_num(r.get(num)), _num(r.get(den))) for r in records]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    total = sum(b for _, b in pairs)
    return sum(a for a, _ in pairs) / total if pairs and total > 0 else None


def _weighted(records: list[dict], key: str) -> float | None:
    pairs = [(_num(r.get(key)), _num(r.get("step_time_s"))) for r in records]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None and math.isfinite(a)]
    total = sum(b for _, b in pairs)
    return sum(a * b for a, b in pairs) / total if pairs and total > 0 else None


def summarize(records: Sequence[dict]) -> dict:
    """Summary numbers of one run's records (as returned by :func:`load_metrics`).

    Keys (``None`` where the log holds no value for it):

    - ``steps``: the last logged step; ``final_loss``: its train loss (nats);
    - ``best_val_loss`` / ``best_val_step``: the lowest finite ``val_loss`` and its (first) step;
    - ``total_tokens``: the last ``tokens_total`` (tokens);
    - ``train_time_s``: the sum of ``step_time_s`` (seconds inside optimizer steps);
    - ``wall_time_s``: training wall time of the logged steps (seconds): the largest
      ``elapsed_s`` of each training process, summed over processes (a new process is
      recognised where ``elapsed_s`` goes down). It includes evaluation and checkpointing
      between steps but not start-up, nor steps a resume discarded;
    - ``resumes``: the number of times ``elapsed_s`` restarted (processes minus one);
    - ``mean_tokens_per_second`` (tokens/s): tokens / step time summed over all steps **except
      step 1** (warm-up and compilation) when more than one step is logged, and ``mean_mfu``
      (fraction 0..1) the step-time-weighted mean of ``mfu`` over the same steps (= achieved
      FLOP/s over peak, not a mean of per-step ratios);
    - ``wall_tokens_per_second``: ``total_tokens`` / ``wall_time_s`` (evaluation, checkpoints included);
    - ``comm_share``: sum of ``comm_s`` / sum of ``step_time_s`` over all steps (0..1);
      communication overlaps compute, so this is not a part of a sum to 1;
    - ``exposed_comm_share``: sum of ``comm_exposed_s`` / sum of ``step_time_s`` over the steps
      where ``comm_exposed_s`` was measured (not null); ``None`` if it never was;
    - ``peak_memory_bytes``: the largest ``max_memory_bytes`` (bytes).

    Raises:
        DataError: ``records`` is empty.
    """
    if not records:
        raise DataError("no complete records in metrics.jsonl yet")
    last = records[-1]

    best_val, best_step = None, None
    for r in records:
        v = _num(r.get("val_loss"))
        if v is not None and math.isfinite(v) and (best_val is None or v < best_val):
            best_val, best_step = v, r["step"]

    step_times = _values(records, "step_time_s")
    total_step_time = sum(step_times)
    comm = _values(records, "comm_s")
    exposed_pairs = [
        (e, t)
        for e, t in ((_num(r.get("comm_exposed_s")), _num(r.get("step_time_s"))) for r in records)
        if e is not None and t is not None
    ]
    exposed_time = sum(t for _, t in exposed_pairs)

    segments = _segments(records)
    wall = sum(max(_values(seg, "elapsed_s")) for seg in segments) if segments else None
    peak = _values(records, "max_memory_bytes")
    total_tokens = _num(last.get("tokens_total"))
    steady = _steady(records)

    return {
        "steps": last["step"],
        "final_loss": _num(last.get("loss")),
        "best_val_loss": best_val,
        "best_val_step": best_step,
        "total_tokens": int(total_tokens) if total_tokens is not None else None,
        "train_time_s": total_step_time if step_times else None,
        "wall_time_s": wall,
        "resumes": max(len(segments) - 1, 0),
        "mean_mfu": _weighted(steady, "mfu"),
        "mean_tokens_per_second": _ratio(steady, "tokens", "step_time_s"),
        "wall_tokens_per_second": total_tokens / wall if total_tokens and wall else None,
        "comm_share": sum(comm) / total_step_time if comm and total_step_time > 0 else None,
        "exposed_comm_share": (
            sum(e for e, _ in exposed_pairs) / exposed_time if exposed_pairs and exposed_time > 0 else None
        ),
        "peak_memory_bytes": int(max(peak)) if peak else None,
        "straggler_events": straggler_events(records),
    }


# ----------------------------------------------------------------------------- plots


def _series(records: Sequence[dict], x_key: str, y_key: str, scale: float = 1.0):
    xs, ys = [], []
    for r in records:
        x, y = _num(r.get(x_key)), _num(r.get(y_key))
        if x is not None and y is not None and math.isfinite(y):
            xs.append(x)
            ys.append(y * scale)
    return xs, ys


def _color(i: int) -> str:
    return f"C{i % 10}"


def _new_figure(nrows: int, title: str, height_per_row: float = 3.2, sharex: bool = True):
    from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

    fig = Figure(figsize=(10, 1.0 + height_per_row * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=sharex, squeeze=False)[:, 0]
    fig.suptitle(title, fontsize=14, fontweight="bold")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def _title(base: str, names: list[str]) -> str:
    return f"{base}: {names[0]}" if len(names) == 1 else f"{base}: {', '.join(names)}"


def _legend(ax) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="best", fontsize=9, framealpha=0.85)


def _label(name: str, names: list[str], what: str = "") -> str | None:
    if len(names) == 1:
        return what or None
    return f"{name} {what}".strip()


def _plot_loss(runs: dict[str, list[dict]], path: str) -> None:
    from matplotlib.ticker import EngFormatter

    names = list(runs)
    fig, axes = _new_figure(2, _title("Loss", names), sharex=False)
    for i, (name, recs) in enumerate(runs.items()):
        for ax, x_key in zip(axes, ("step", "tokens_total")):
            xs, ys = _series(recs, x_key, "loss")
            ax.plot(xs, ys, color=_color(i), lw=1.2, alpha=0.8, label=_label(name, names, "train"))
            xs, ys = _series(recs, x_key, "val_loss")
            if xs:
                ax.plot(
                    xs,
                    ys,
                    color=_color(i),
                    lw=1.8,
                    ls="--",
                    marker="o",
                    ms=5,
                    label=_label(name, names, "validation"),
                )
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("tokens seen (tokens)")
    axes[1].xaxis.set_major_formatter(EngFormatter(sep=" "))
    for ax in axes:
        ax.set_ylabel("cross-entropy loss (nats)")
        _legend(ax)
    axes[0].set_title("vs step", fontsize=11)
    axes[1].set_title("vs tokens seen", fontsize=11)
    fig.savefig(path)


def _plot_lr_batch(runs: dict[str, list[dict]], path: str) -> None:
    names = list(runs)
    fig, axes = _new_figure(2, _title("Learning rate and batch size", names))
    for i, (name, recs) in enumerate(runs.items()):
        axes[0].plot(*_series(recs, "step", "lr"), color=_color(i), lw=1.5, label=_label(name, names))
        axes[1].step(
            *_series(recs, "step", "global_batch_size"),
            where="post",
            color=_color(i),
            lw=1.5,
            label=_label(name, names),
        )
    axes[0].set_ylabel("learning rate")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylabel("global batch size (sequences)")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        _legend(ax)
    fig.savefig(path)


def _plot_throughput(runs: dict[str, list[dict]], path: str) -> None:
    from matplotlib.ticker import EngFormatter

    names = list(runs)
    fig, axes = _new_figure(2, _title("Throughput", names))
    for i, (name, recs) in enumerate(runs.items()):
        axes[0].plot(
            *_series(recs, "step", "tokens_per_second"), color=_color(i), lw=1.2, label=_label(name, names)
        )
        axes[1].plot(
            *_series(recs, "step", "mfu", scale=100.0), color=_color(i), lw=1.2, label=_label(name, names)
        )
    axes[0].set_ylabel("throughput (tokens/s, all ranks)")
    axes[0].yaxis.set_major_formatter(EngFormatter(sep=" "))
    axes[1].set_ylabel("MFU (% of peak FLOP/s)")
    axes[1].set_xlabel("optimizer step")
    for ax in axes:
        ax.set_ylim(bottom=0)
        _legend(ax)
    fig.savefig(path)


def _time_parts(recs: Sequence[dict]):
    """Per step: step, data, compute without exposed comm, exposed comm, optimizer, comm (seconds)."""
    rows = []
    for r in recs:
        data = _num(r.get("data_s")) or 0.0
        fb = _num(r.get("forward_backward_s")) or 0.0
        exposed = _num(r.get("comm_exposed_s")) or 0.0
        opt = _num(r.get("optimizer_s")) or 0.0
        comm = _num(r.get("comm_s")) or 0.0
        rows.append((r["step"], data, max(fb - exposed, 0.0), exposed, opt, comm))
    return rows


def _plot_time_breakdown(runs: dict[str, list[dict]], path: str) -> None:
    names = list(runs)
    fig, axes = _new_figure(
        len(runs), _title("Time per step", names), sharex=False, height_per_row=4.0 if len(runs) == 1 else 3.0
    )
    labels = ("data loading", "forward + backward (excl. exposed comm)", "exposed communication", "optimizer")
    colors = ("#8c8c8c", "#4c72b0", "#dd4444", "#55a868")
    for ax, (name, recs) in zip(axes, runs.items()):
        rows = _time_parts(recs)
        if not rows:
            continue
        steps = [row[0] for row in rows]
        stacks = [[row[k] for row in rows] for k in range(1, 5)]
        comm = [row[5] for row in rows]
        if len(steps) == 1:  # a single step: bars, as an area of width 0 is invisible
            bottom = 0.0
            for vals, lab, col in zip(stacks, labels, colors):
                ax.bar(steps, vals, bottom=bottom, color=col, label=lab, width=0.6)
                bottom += vals[0]
        else:
            ax.stackplot(steps, *stacks, labels=labels, colors=colors, alpha=0.85, step="mid")
        ax.plot(
            steps,
            comm,
            color="black",
            lw=1.3,
            ls="-",
            drawstyle="steps-mid",
            label="communication (total, overlaps compute)",
        )
        totals = [sum(s[j] for s in stacks) for j in range(len(steps))]
        _clip_first_outlier(ax, steps, totals, comm)
        ax.set_ylabel("time per step (s)")
        ax.set_xlabel("optimizer step")
        if len(runs) > 1:
            ax.set_title(name, fontsize=11)
    handles, legend_labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, legend_labels, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    fig.savefig(path)


def _clip_first_outlier(ax, steps: list, totals: list[float], comm: list[float]) -> None:
    """Keep a slow first step (compilation) from flattening the rest: cap the y axis and say so."""
    if len(totals) < 3:
        ax.set_ylim(bottom=0)
        return
    rest = sorted(totals[1:])
    median = rest[len(rest) // 2]
    top = max(max(totals[1:]), max(comm[1:]))
    if median > 0 and totals[0] > 3 * median and totals[0] > 1.3 * top:
        ax.set_ylim(0, top * 1.35)
        ax.annotate(
            f"step {steps[0]:g}: {totals[0]:.3g} s (off scale)",
            xy=(0.01, 0.97),
            xycoords="axes fraction",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.85},
        )
    else:
        ax.set_ylim(bottom=0)


def _plot_memory(runs: dict[str, list[dict]], path: str) -> None:
    names = list(runs)
    fig, axes = _new_figure(1, _title("Peak memory", names), height_per_row=4.5)
    ax = axes[0]
    for i, (name, recs) in enumerate(runs.items()):
        ax.plot(
            *_series(recs, "step", "max_memory_bytes", scale=1 / GIB),
            color=_color(i),
            lw=1.5,
            label=_label(name, names),
        )
    ax.set_ylabel("peak memory (GiB)\nCUDA max allocated; on CPU, peak RSS")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(bottom=0)
    _legend(ax)
    fig.savefig(path)


def _plot_mixture(runs: dict[str, list[dict]], path: str) -> bool:
    """Cumulative tokens and validation loss by source; False (nothing written) without a mixture."""
    if not any(r.get("tokens_by_source") for recs in runs.values() for r in recs):
        return False
    names = list(runs)
    fig, axes = _new_figure(2, _title("Data mixture", names))
    k = 0
    for name, recs in runs.items():
        sources = sorted({s for r in recs for s in (r.get("tokens_by_source") or {})})
        for src in sources:
            total, xs, ys = 0, [], []
            for r in recs:
                total += (r.get("tokens_by_source") or {}).get(src, 0)
                xs.append(r["step"])
                ys.append(total)
            axes[0].plot(xs, ys, color=_color(k), lw=1.5, label=_label(name, names, src) or src)
            vx = [r["step"] for r in recs if (r.get("val_loss_by_source") or {}).get(src) is not None]
            vy = [
                r["val_loss_by_source"][src]
                for r in recs
                if (r.get("val_loss_by_source") or {}).get(src) is not None
            ]
            if vx:
                axes[1].plot(
                    vx, vy, color=_color(k), lw=1.5, marker="o", ms=4, label=_label(name, names, src) or src
                )
            k += 1
    axes[0].set_ylabel("cumulative tokens by source")
    axes[1].set_ylabel("validation loss by source (nats)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        _legend(ax)
    fig.savefig(path)
    return True


def _plot_ranks(run_dirs: dict[str, str], path: str) -> bool:
    """Rank x step heat maps (step time, busy time) per run with a ``rank_stats.jsonl``; False without
    any."""
    with_stats = {n: load_rank_stats(d) for n, d in run_dirs.items()}
    with_stats = {n: recs for n, recs in with_stats.items() if recs}
    if not with_stats:
        return False
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        2 * len(with_stats), 1, figsize=(10, 2.6 * 2 * len(with_stats)), squeeze=False, layout="constrained"
    )
    for i, (name, recs) in enumerate(with_stats.items()):
        steps = [r["step"] for r in recs]
        half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
        for j, key in enumerate(("step_time_s", "busy_s")):
            ax = axes[2 * i + j][0]
            grid = [[v or 0.0 for v in r.get(key) or []] for r in recs]  # step x rank
            ranks = max(len(row) for row in grid)
            grid = [row + [0.0] * (ranks - len(row)) for row in grid]  # a resume on fewer ranks
            image = ax.imshow(
                list(map(list, zip(*grid))),
                aspect="auto",
                interpolation="nearest",
                extent=(steps[0] - half, steps[-1] + half, ranks - 0.5, -0.5),
            )
            fig.colorbar(image, ax=ax, label="seconds")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("rank")
            ax.set_xlabel("optimizer step")
            what = "step time" if key == "step_time_s" else "busy time (step time - waiting on peers)"
            ax.set_title(f"{name}: {what} per rank and step")
    fig.savefig(path)
    plt.close(fig)
    return True


def straggler_events(records: Sequence[dict]) -> list[dict]:
    """``{step, rank, busy_s, median_busy_s}`` of every record with a ``straggler`` event: the rank is
    the step's slowest (``slowest_ranks[0]``), the median the ranks' median ``busy_s``."""
    out = []
    for r in records:
        stats, slowest = r.get("rank_stats"), r.get("slowest_ranks")
        if "straggler" in (r.get("events") or []) and isinstance(stats, dict) and slowest:
            top = slowest[0]
            median = stats["busy_s"]["median"]
            out.append(
                {"step": r["step"], "rank": top["rank"], "busy_s": top["busy_s"], "median_busy_s": median}
            )
    return out


# ----------------------------------------------------------------------------- HTML


def _fmt_duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _fmt(key: str, v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if key in ("steps", "best_val_step", "total_tokens", "resumes"):
        return f"{int(v):,}"
    if key in ("final_loss", "best_val_loss"):
        return f"{v:.4f}"
    if key.endswith("_time_s"):
        return _fmt_duration(v)
    if key in ("mean_mfu", "comm_share", "exposed_comm_share"):
        return f"{100 * v:.1f}%"
    if key in ("mean_tokens_per_second", "wall_tokens_per_second"):
        return f"{v:,.0f}"
    if key == "peak_memory_bytes":
        return f"{v / GIB:.2f} GiB"
    return html.escape(str(v))


ROWS = (
    ("steps", "steps", "last logged optimizer step"),
    ("final_loss", "final train loss (nats)", "loss of the last step"),
    ("best_val_loss", "best validation loss (nats)", "lowest val_loss"),
    ("best_val_step", "best validation step", "step of the lowest val_loss"),
    ("total_tokens", "tokens seen", "tokens_total of the last step"),
    ("train_time_s", "time in steps", "sum of step_time_s"),
    ("wall_time_s", "training wall time", "largest elapsed_s per process, summed (incl. eval, checkpoints)"),
    ("resumes", "resumes", "times elapsed_s restarted"),
    ("mean_mfu", "mean MFU", "step-time-weighted, step 1 excluded"),
    ("mean_tokens_per_second", "throughput (tokens/s)", "tokens / step time, step 1 excluded"),
    ("wall_tokens_per_second", "wall throughput (tokens/s)", "total tokens / wall time"),
    ("comm_share", "communication share", "sum comm_s / sum step_time_s (overlaps compute)"),
    (
        "exposed_comm_share",
        "exposed communication share",
        "sum comm_exposed_s / sum step_time_s, measured steps",
    ),
    ("peak_memory_bytes", "peak memory", "largest max_memory_bytes"),
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child, td.note { text-align: left; }
td.note { color: #666; font-size: 0.85em; } thead th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; }
.src { color: #666; font-size: 0.85em; }
"""


def _html(names: list[str], paths: list[str], summaries: list[dict], out_dir: str) -> str:
    esc = html.escape
    title = f"Training report: {names[0]}" if len(names) == 1 else f"Training comparison: {', '.join(names)}"
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    body = []
    for key, label, note in ROWS:
        cells = "".join(f"<td>{_fmt(key, s.get(key))}</td>" for s in summaries)
        body.append(f"<tr><th>{esc(label)}</th>{cells}<td class='note'>{esc(note)}</td></tr>")
    sources = "".join(
        f"<li>{esc(n)}: <code>{esc(os.path.abspath(p))}</code></li>" for n, p in zip(names, paths)
    )
    figures = []
    extra = tuple(p for p in (MIXTURE_PLOT, RANKS_PLOT) if os.path.isfile(os.path.join(out_dir, p)))
    for png in (*PLOTS, *extra):
        with open(os.path.join(out_dir, png), "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        alt = png.removesuffix(".png").replace("_", " ")
        figures.append(f"<h2>{esc(alt)}</h2>\n<img alt='{esc(alt)}' src='data:image/png;base64,{data}'>")
    events = [(n, e) for n, s in zip(names, summaries) for e in s.get("straggler_events") or []]
    if events:
        rows = "".join(
            f"<tr><td>{esc(n)}</td><td>{e['step']}</td><td>{e['rank']}</td><td>{e['busy_s']:.3f}</td>"
            f"<td>{e['median_busy_s']:.3f}</td></tr>"
            for n, e in events
        )
        figures.append(
            "<h2>straggler events</h2>\n<table><thead><tr><th>run</th><th>step</th><th>rank</th>"
            f"<th>busy s</th><th>median rank busy s</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n<ul class='src'>{sources}</ul>\n"
        "<h2>summary</h2>\n<table>\n"
        f"<thead><tr><th>metric</th>{head}<th>definition</th></tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>\n"
        + "\n".join(figures)
        + "\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- report


def _run_names(run_dirs: Sequence[str]) -> list[str]:
    """Directory names, made unique with parent directories (or an index) where they clash."""
    parts = [os.path.normpath(os.path.abspath(d)).split(os.sep) for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    names = [parts_[-1] for parts_ in parts]
    return [f"{n} #{i + 1}" for i, n in enumerate(names)]


def _default_out_dir(run_dirs: Sequence[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "report")
    return os.path.join(os.path.commonpath([os.path.abspath(d) for d in run_dirs]), "report-compare")


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # as harness.metrics writes them: "inf" / "-inf"
    return v


def write_report(run_dirs: Sequence[str], out_dir: str | None = None) -> str:
    """Write the plots, ``summary.json`` and ``report.html`` for one or more runs; return the
    path of ``report.html``.

    Args:
        run_dirs: run directories, each holding ``metrics.jsonl``; runs are named by directory
            name (with parent directories added where two names clash).
        out_dir: where to write; default ``<run_dir>/report`` for one run and
            ``<common parent of the runs>/report-compare`` for several. Created if needed.

    Raises:
        DataError: a run directory or its ``metrics.jsonl`` is missing, corrupt or empty.
        HarnessError: matplotlib is not installed.
    """
    return _write(run_dirs, out_dir)[0]


def _write(run_dirs: Sequence[str], out_dir: str | None) -> tuple[str, list[str], list[dict]]:
    if isinstance(run_dirs, str):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise DataError("no run directories given")
    names = _run_names(run_dirs)
    runs: dict[str, list[dict]] = {}
    summaries = []
    for name, run_dir in zip(names, run_dirs):
        records = load_metrics(run_dir)
        if not records:
            raise DataError(f"{_metrics_path(run_dir)}: no complete records yet")
        runs[name] = records
        summaries.append(summarize(records))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise HarnessError("the report needs matplotlib: pip install matplotlib") from None

    out_dir = out_dir or _default_out_dir(run_dirs)
    os.makedirs(out_dir, exist_ok=True)
    plots = (_plot_loss, _plot_lr_batch, _plot_throughput, _plot_time_breakdown, _plot_memory)
    for png, plot in zip(PLOTS, plots):
        plot(runs, os.path.join(out_dir, png))
    mixture_png = os.path.join(out_dir, MIXTURE_PLOT)
    if not _plot_mixture(runs, mixture_png) and os.path.isfile(mixture_png):
        os.remove(mixture_png)
    ranks_png = os.path.join(out_dir, RANKS_PLOT)
    if not _plot_ranks(dict(zip(names, run_dirs)), ranks_png) and os.path.isfile(ranks_png):
        os.remove(ranks_png)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        rows = [{"run": n, **{k: _json_value(v) for k, v in s.items()}} for n, s in zip(names, summaries)]
        json.dump(rows, f, indent=2)
        f.write("\n")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(_html(names, list(run_dirs), summaries, out_dir))
    return html_path, names, summaries


def _one_line(name: str, s: dict) -> str:
    parts = [f"{s['steps']:,} steps", f"final loss {_fmt('final_loss', s['final_loss'])}"]
    if s["best_val_loss"] is not None:
        parts.append(f"best val {s['best_val_loss']:.4f} @ step {s['best_val_step']}")
    parts += [
        f"{_fmt('total_tokens', s['total_tokens'])} tokens",
        f"wall {_fmt('wall_time_s', s['wall_time_s'])}",
        f"MFU {_fmt('mean_mfu', s['mean_mfu'])}",
        f"{_fmt('mean_tokens_per_second', s['mean_tokens_per_second'])} tokens/s",
        f"comm {_fmt('comm_share', s['comm_share'])}",
        f"peak mem {_fmt('peak_memory_bytes', s['peak_memory_bytes'])}",
    ]
    return f"{name}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Command line: write the report, print the path of ``report.html`` and one summary line per
    run; return 0, or 2 after one ``error: ...`` line on stderr for a missing or unusable run."""
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: RUN_DIR/report for one run, <common parent>/report-compare for "
        "several)",
    )
    args = parser.parse_args(argv)
    try:
        html_path, names, summaries = _write(args.run_dirs, args.out)
    except (HarnessError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(html_path)
    for name, summary in zip(names, summaries):
        print(_one_line(name, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
