"""Per-rank timing and stragglers: every ``logging.rank_stats_every`` steps every rank's step timings
are gathered in one small collective into rank 0's record, and a rank that stays slower than the
median rank is reported (Megatron-LM's ``--log-straggler`` idea, on the harness's own timers).

A synchronous step ends at about the same time on every rank (the fast ones wait in collectives), so
slowness shows in the *busy* time: ``busy_s = step_time_s - time waiting on peers`` (``comm_exposed_s``
on CPU; on GPU, where that is not measured, ``comm_s``: NCCL kernels spin while a peer is late).
"""

from __future__ import annotations

import logging
import socket
import statistics

import torch

from harness.hooks.base import Hook

log = logging.getLogger("harness")
FIELDS = ("step_time_s", "busy_s", "data_s", "forward_backward_s", "optimizer_s", "comm_s")


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


class RankStatsHook(Hook):
    """Fills ``step_time_s_min/max``, ``slowest_rank`` and ``rank_stats`` of rank 0's record, adds a
    ``straggler`` event with a warning naming the rank and host; hostnames are logged once."""

    def __init__(self, every: int, factor: float, window: int):
        self.every = every
        self.detector = StragglerDetector(factor, window)
        self.hosts: list[str] = []

    @classmethod
    def from_config(cls, logging_cfg) -> RankStatsHook:
        return cls(logging_cfg.rank_stats_every, logging_cfg.straggler_factor, logging_cfg.straggler_window)

    def _on(self, trainer) -> bool:
        return bool(self.every) and trainer.env.world_size > 1

    def on_train_start(self, trainer) -> None:
        if not self._on(trainer):
            return
        import torch.distributed as dist

        hosts: list[str | None] = [None] * trainer.env.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        self.hosts = [str(h) for h in hosts]
        if trainer.env.is_main:
            by_host: dict[str, list[int]] = {}
            for rank, host in enumerate(self.hosts):
                by_host.setdefault(host, []).append(rank)
            log.info("ranks by host: %s", "; ".join(f"{h}: {_ranges(r)}" for h, r in by_host.items()))

    def on_step_end(self, trainer, record) -> None:
        if not self._on(trainer) or record.step % self.every:
            return
        import torch.distributed as dist

        values = [getattr(record, f) or 0.0 for f in FIELDS if f != "busy_s"]
        mine = torch.tensor([values[0], busy_seconds(record), *values[1:]], dtype=torch.float64)
        mine = mine.to(trainer.env.device)
        rows = torch.empty(trainer.env.world_size * len(FIELDS), dtype=torch.float64, device=mine.device)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(rows, mine)
        if trainer.env.is_main:
            self._fill(record, rows.view(trainer.env.world_size, len(FIELDS)).cpu().tolist())

    def _fill(self, record, rows: list[list[float]]) -> None:
        stats = [dict(zip(FIELDS, row)) for row in rows]
        steps = [s["step_time_s"] for s in stats]
        busy = [s["busy_s"] for s in stats]
        record.rank_stats = stats
        record.step_time_s_min, record.step_time_s_max = min(steps), max(steps)
        record.slowest_rank = max(range(len(busy)), key=busy.__getitem__)
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


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    groups: list[list[int]] = []
    for r in ranks:
        if groups and r == groups[-1][-1] + 1:
            groups[-1].append(r)
        else:
            groups.append([r])
    return ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups)
