"""Profiler traces on demand (``profile.*``): ``torch.profiler`` over chosen steps, one Chrome/Perfetto
trace per step and rank at ``<run>/profile/step_<n>/rank_<r>.json.gz``.

Windows: ``profile.steps=[a, b]`` traces steps a..b; ``profile.every=N`` traces ``profile.active`` steps
from every N-th step; ``kill -USR2 <pid of rank 0>`` (any rank works; the request travels in the
per-step stop-flag all-reduce, ``harness/hooks/stop.py``) traces the ``profile.active`` steps after the
next one. Each window starts ``profile.warmup`` untraced profiler steps earlier (the profiler's own
start-up is not in the trace). Activities: CPU, and CUDA on GPU; ``record_shapes`` off by default.
Outside a window no profiler exists, so it costs nothing.

On GPU each traced step's ``comm_exposed_s`` is computed from its trace (``harness.trace.device_comm``:
NCCL kernel time with no compute kernel running) and the record gets a ``profiled`` event; with
``profile.memory_snapshot=true`` the allocator history of the window is written to
``memory_snapshot_rank_<r>.pickle`` in the window's first step directory (open it at
https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import logging
import os

import torch

from harness.hooks.base import Hook

log = logging.getLogger("harness")


class ProfilerHook(Hook):
    """Starts and steps a ``torch.profiler.profile`` for each window (see the module docstring)."""

    def __init__(self, cfg, run_dir: str, rank: int, stop_signal):
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = rank
        self.stop_signal = stop_signal  # carries the SIGUSR2 request, agreed over the ranks
        self.prof = None
        self.first = 0  # first traced step of the running window
        self.record = None  # the record of the step being stepped (filled on GPU)
        self.cuda = False
        self._requested_first: int | None = None

    def _planned(self, step: int) -> int:
        """Steps to trace if a window starts at ``step``, else 0."""
        c = self.cfg
        if self._requested_first == step:
            return c.active
        if c.steps is not None and step == c.steps[0]:
            return c.steps[1] - c.steps[0] + 1
        if c.every and step % c.every == 0:
            return c.active
        return 0

    def on_step_start(self, trainer, info) -> None:
        if self.stop_signal.profile_requested:
            self.stop_signal.profile_requested = False
            if self.prof is None:
                self._requested_first = info.step + self.cfg.warmup
                if trainer.env.is_main:
                    log.info(
                        "SIGUSR2: profiling steps %d-%d",
                        self._requested_first,
                        self._requested_first + self.cfg.active - 1,
                    )
        if self.prof is not None:
            return
        for warm in range(self.cfg.warmup, -1, -1):  # a window right at the start gets less warm-up
            active = self._planned(info.step + warm)
            if active:
                self._start(trainer, info.step + warm, warm, active)
                return

    def _start(self, trainer, first: int, warm: int, active: int) -> None:
        from torch.profiler import ProfilerAction, ProfilerActivity, profile

        def schedule(i: int) -> ProfilerAction:
            if i < warm:
                return ProfilerAction.WARMUP
            return ProfilerAction.RECORD_AND_SAVE if i < warm + active else ProfilerAction.NONE

        self.cuda = trainer.env.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.first, self.last = first, first + active - 1
        if self.cuda and self.cfg.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof = profile(
            activities=activities,
            schedule=schedule,
            on_trace_ready=self._trace_ready,
            record_shapes=self.cfg.record_shapes,
        )
        self.prof.start()

    def on_step_end(self, trainer, record) -> None:
        if self.prof is None:
            return
        self.record = record
        self.prof.step()  # a traced step's trace is written here, before the record is logged
        if record.step >= self.last:
            self._finish()

    def _trace_ready(self, prof) -> None:
        step = self.record.step
        directory = os.path.join(self.run_dir, "profile", f"step_{step:08d}")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank_{self.rank}.json.gz")
        prof.export_chrome_trace(path)
        self.record.events = [*(self.record.events or []), "profiled"]
        if self.cuda:
            from harness.trace import device_comm, load_events

            measured = device_comm(load_events(path))
            if measured is not None:
                self.record.comm_exposed_s = measured[1]

    def _finish(self) -> None:
        self.prof.stop()
        self.prof = None
        self._requested_first = None
        if self.cuda and self.cfg.memory_snapshot:
            directory = os.path.join(self.run_dir, "profile", f"step_{self.first:08d}")
            os.makedirs(directory, exist_ok=True)
            torch.cuda.memory._dump_snapshot(
                os.path.join(directory, f"memory_snapshot_rank_{self.rank}.pickle")
            )
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0 and self.last >= self.first:
            log.info(
                "profiled steps %d-%d: traces in %s",
                self.first,
                self.last,
                os.path.join(self.run_dir, "profile"),
            )

    def close(self) -> None:
        if self.prof is not None:  # the run ended inside the window (e.g. profile.steps past max_steps)
            last = self.record.step if self.record is not None else self.first - 1
            self.last = last
            self._finish()
