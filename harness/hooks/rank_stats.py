"""Per-rank timing and stragglers: every ``logging.rank_stats_every`` steps every rank's step timings
are gathered in one small collective (``len(FIELDS)`` float64 per rank) into rank 0, whose record gets
their min / median / max and the slowest ranks (a fixed size at any world size), whose
``<run>/rank_stats.jsonl`` gets the full per-rank vectors every ``logging.rank_stats_full_every``
steps (gathered then too), and a rank that stays slower than the median rank is reported (Megatron-LM's
``--log-straggler`` idea, on the harness's own timers).

A synchronous step ends at about the same time on every rank (the fast ones wait in collectives), so
slowness shows in the *busy* time: ``busy_s = step_time_s - time waiting on peers`` (``comm_exposed_s``
on CPU; on GPU, where that is not measured, ``comm_s``: NCCL kernels spin while a peer is late).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics

import torch

from harness import failures
from harness.failures import rank_ranges
from harness.hooks.base import Hook
from harness.metrics import truncate_metrics

log = logging.getLogger("harness")
FIELDS = ("step_time_s", "busy_s", "data_s", "forward_backward_s", "optimizer_s", "comm_s")
SLOWEST = 3  # the slowest ranks kept in each record
FULL_FILE = "rank_stats.jsonl"  # the full per-rank vectors, every logging.rank_stats_full_every steps


def busy_seconds(record) -> float:
    """``step_time_s`` minus the time this rank waited on its peers (see the module docstring)."""
    waited = record.comm_exposed_s if record.comm_exposed_s is not None else record.comm_s
    return max(record.step_time_s - (waited or 0.0), 0.0)


class StragglerDetector:
    """Counts, per rank, consecutive stats whose busy time exceeds ``factor`` x the median rank's;
    a rank reaching ``window`` is a straggler (reported once per episode)."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.runs: dict[int, int] = {}

    def update(self, busy: list[float]) -> list[int]:
        """Ranks that just became stragglers, given every rank's busy seconds (index = rank)."""
        median = statistics.median(busy)
        new = []
        for rank, b in enumerate(busy):
            slow = median > 0 and b > self.factor * median
            self.runs[rank] = self.runs.get(rank, 0) + 1 if slow else 0
            if self.runs[rank] == self.window:
                new.append(rank)
        return new


def summarize(rows: list[list[float]], k: int = SLOWEST) -> tuple[dict, list[dict]]:
    """The fixed-size summary of one gather for rank 0's record, whatever the world size.

    Args:
        rows: one row per rank (index = rank) of the :data:`FIELDS` values, in seconds.
        k: how many of the slowest ranks to keep.

    Returns:
        ``(rank_stats, slowest_ranks)``: ``rank_stats[field] = {"min", "median", "max"}`` over the
        ranks for every field of :data:`FIELDS` (the median of an even count is the mean of the two
        middle values, :func:`statistics.median`); ``slowest_ranks``: exactly ``k`` entries
        ``{"rank", "busy_s"}``, the ranks with the most ``busy_s`` first (ties: the lower rank first),
        padded with ``{"rank": None, "busy_s": None}`` below ``k`` ranks.
    """
    stats = {}
    for i, field in enumerate(FIELDS):
        column = [row[i] for row in rows]
        stats[field] = {"min": min(column), "median": statistics.median(column), "max": max(column)}
    busy = FIELDS.index("busy_s")
    order = sorted(range(len(rows)), key=lambda r: (-rows[r][busy], r))[:k]
    slowest = [{"rank": r, "busy_s": rows[r][busy]} for r in order]
    return stats, slowest + [{"rank": None, "busy_s": None}] * (k - len(slowest))


class RankStatsHook(Hook):
    """Fills ``rank_stats`` and ``slowest_ranks`` of rank 0's record (:func:`summarize`: a size that
    does not grow with the world), appends the full per-rank vectors to ``<run>/rank_stats.jsonl`` every
    ``full_every`` steps (0: never), and adds a ``straggler`` event with a warning naming the rank and
    host (the detector sees every rank); hostnames are logged once."""

    def __init__(self, every: int, factor: float, window: int, full_every: int, run_dir: str):
        self.every, self.full_every = every, full_every
        self.path = os.path.join(run_dir, FULL_FILE)
        self.file = None  # rank 0's rank_stats.jsonl, opened at the first full gather
        self.failed = False  # a write failed: no more lines
        self.detector = StragglerDetector(factor, window)
        self.hosts: list[str] = []

    @classmethod
    def from_config(cls, logging_cfg, run_dir: str) -> RankStatsHook:
        g = logging_cfg
        return cls(
            g.rank_stats_every, g.straggler_factor, g.straggler_window, g.rank_stats_full_every, run_dir
        )

    def _on(self, trainer) -> bool:
        return bool(self.every) and trainer.env.world_size > 1

    def on_train_start(self, trainer) -> None:
        if trainer.env.is_main:  # a resumed run writes the later steps again
            truncate_metrics(self.path, trainer.state.step)
        if not self._on(trainer):
            return
        self.hosts = failures.hosts()  # gathered once by the trainer at start-up
        if trainer.env.is_main:
            by_host: dict[str, list[int]] = {}
            for rank, host in enumerate(self.hosts):
                by_host.setdefault(host, []).append(rank)
            log.info("ranks by host: %s", "; ".join(f"{h}: {rank_ranges(r)}" for h, r in by_host.items()))

    def on_step_end(self, trainer, record) -> None:
        full = bool(self.full_every) and record.step % self.full_every == 0
        if not self._on(trainer) or (record.step % self.every and not full):
            return
        import torch.distributed as dist

        values = [getattr(record, f) or 0.0 for f in FIELDS if f != "busy_s"]
        mine = torch.tensor([values[0], busy_seconds(record), *values[1:]], dtype=torch.float64)
        mine = mine.to(trainer.env.device)
        rows = torch.empty(trainer.env.world_size * len(FIELDS), dtype=torch.float64, device=mine.device)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(rows, mine)
        if trainer.env.is_main:
            rows = rows.view(trainer.env.world_size, len(FIELDS)).cpu().tolist()
            self.fill(record, rows)
            if full:
                self._write_full(record.step, rows)

    def fill(self, record, rows: list[list[float]]) -> None:
        """Complete rank 0's ``record`` from every rank's ``rows`` (see :func:`summarize`) and run the
        straggler detector on the full ``busy_s`` vector."""
        record.rank_stats, record.slowest_ranks = summarize(rows)
        busy = [row[FIELDS.index("busy_s")] for row in rows]
        for rank in self.detector.update(busy):
            record.events = [*(record.events or []), "straggler"]
            host = self.hosts[rank] if rank < len(self.hosts) else "?"
            log.warning(
                "straggler: rank %d (%s) busy %.3f s per step vs the median rank's %.3f s for %d consecutive "
                "rank stats (logging.straggler_factor=%g)",
                rank,
                host,
                busy[rank],
                statistics.median(busy),
                self.detector.window,
                self.detector.factor,
            )

    def _write_full(self, step: int, rows: list[list[float]]) -> None:
        """One line of ``rank_stats.jsonl``: ``{"step", <field>: [value of rank 0, 1, ...], ...}``. A
        failing write (a full disk) warns once and stops the file; training goes on."""
        if self.failed:
            return
        line = json.dumps({"step": step, **{f: [row[i] for row in rows] for i, f in enumerate(FIELDS)}})
        try:
            if self.file is None:
                self.file = open(self.path, "a", buffering=1)
            self.file.write(line + "\n")
        except OSError as e:
            log.warning("%s: %s; the full per-rank stats stop here (training goes on)", self.path, e)
            self.failed = True  # the gathers go on on every rank: only the file stops
            self.close()

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
