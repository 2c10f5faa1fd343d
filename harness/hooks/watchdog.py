"""Hang watchdog: a thread per rank that notices when the current phase of training (:mod:`harness.phases`:
start-up, step, checkpoint save, evaluation, export) has lasted longer than that phase's timeout and,
instead of letting every rank wait out the collective timeout with nothing in the log, writes what
each rank was doing and exits.

The timeouts (:data:`~harness.config.HANG_TIMEOUT_KEYS`, seconds, under ``parallel.``), each applied
to the time since its phase began:

- ``startup``     ``hang_timeout_startup_s`` (1800): from the start of training to the end of the
                  first step (the hooks' start, the first step's compile and warm-up)
- ``step``        ``hang_timeout_s``, since the latest step ended (or the phase nested in it: a save,
                  an evaluation); None (default): ``max(300 s, 10 x the median time of the latest
                  100 steps)``
- ``checkpoint``  ``hang_timeout_checkpoint_s`` (1800): one save, however long the step timeout
- ``eval``        ``hang_timeout_eval_s`` (1800): one validation pass
- ``export``      ``hang_timeout_export_s`` (1800): the Hugging Face export

The watchdog thread starts in ``on_train_start`` on every multi-process run; the startup phase is
timed from the start of ``Trainer.train``.

On a hang every rank that can still run Python writes ``<run>/failures/hang_rank_<r>.txt``: the step,
the phase, its timeout key and value, the part of the step or the hook running (``Trainer.phase``),
the latest collective it issued (kind, bytes, mesh dimension, age, finished or not:
``CommTracker.describe_last``) and all threads' stacks (``faulthandler``); and the flight recorder's
record of the process groups' collectives (``fr_trace_rank_<r>.json``; on NCCL it is enabled from the
start with ``TORCH_FR_BUFFER_SIZE`` and dumped also by NCCL itself on a collective timeout,
``TORCH_NCCL_DUMP_ON_TIMEOUT``). The lowest rank that reports waits a few seconds for the others'
dumps, then logs one line naming its phase and timeout key and the ranks that did not report (the
likely culprits: stopped, or stuck outside Python), writes it to ``failures/hang_summary.txt`` and
SIGKILLs the silent ranks of its own host (so the launcher does not wait out its grace period on
them). Before that, a roll call in the job store names the ranks that no longer answer there and
their hosts (a node whose link was cut still writes its dumps to a shared file system, but cannot
reach the store): ``lost: ranks 2-3 (host n2) ...`` (:func:`harness.failures.report_lost`).
Every reporting rank then exits with status :data:`~harness.exits.EXIT_HANG`; the launcher
stops the rest. Checkpoints are safe: a save cut short leaves only its ``.tmp-`` directory
(``harness.checkpoint``).
"""

from __future__ import annotations

import collections
import faulthandler
import json
import logging
import os
import socket
import statistics
import threading
import time

from harness import failures, phases
from harness.config import HANG_TIMEOUT_KEYS
from harness.exits import EXIT_HANG, report_exit
from harness.hooks.base import Hook
from harness.phases import PHASES

log = logging.getLogger("harness")
DEFAULT_MIN_S = 300.0
PEER_WAIT_S = 5.0  # at most, and at most half the timeout
SUMMARY_WAIT_S = 15.0  # a rank that does not write the summary waits for it (the roll call takes 5 s+)


def flight_recorder_env(run_dir: str) -> None:
    """Enable the collectives' flight recorder before the process group exists (NCCL also dumps it
    into ``<run>/failures/`` on a collective timeout); user settings win."""
    if "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:  # the older name; torch 2.13 warns on it
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(run_dir, "failures", "nccl_trace_rank_"))


class HangWatchdog(Hook):
    """The watchdog thread's owner (see the module docstring).

    ``timeouts``: seconds per phase of :data:`~harness.phases.PHASES` (every phase; ``step`` may be
    None: automatic).

    Raises:
        ValueError: a phase without its timeout.
    """

    def __init__(self, timeouts: dict[str, float | None], run_dir: str, poll_s: float = 1.0):
        missing = [name for name in PHASES if name != "step" and timeouts.get(name) is None]
        if missing or "step" not in timeouts:
            raise ValueError(f"no timeout for phase(s) {missing or ['step']}")
        self.timeouts = dict(timeouts)
        self.run_dir = run_dir
        self.poll_s = poll_s
        self.durations: collections.deque[float] = collections.deque(maxlen=100)  # the latest steps
        self.trainer = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, parallel_cfg, run_dir: str) -> HangWatchdog:
        """``parallel.hang_timeout_*`` (:data:`~harness.config.HANG_TIMEOUT_KEYS`)."""
        return cls({name: getattr(parallel_cfg, key) for name, key in HANG_TIMEOUT_KEYS.items()}, run_dir)

    def timeout(self, phase: str) -> float:
        """Seconds that ``phase`` may last before it counts as a hang.

        Raises:
            KeyError: ``phase`` is not one of :data:`~harness.phases.PHASES`.
        """
        value = self.timeouts[phase]
        if value is not None:
            return value
        durations = list(self.durations)  # appended by the training thread
        return max(DEFAULT_MIN_S, 10 * statistics.median(durations)) if durations else DEFAULT_MIN_S

    def overdue(self, now: float | None = None) -> tuple[str, float] | None:
        """``(phase, seconds in it)`` when the current phase has lasted longer than its timeout."""
        name, since = phases.current()
        idle = (time.monotonic() if now is None else now) - since
        return (name, idle) if idle > self.timeout(name) else None

    def on_train_start(self, trainer) -> None:
        if trainer.env.world_size == 1:
            return  # nobody to wait for
        self.trainer = trainer
        if trainer.env.device.type == "cuda":  # where NCCL writes its own dump on a collective timeout
            os.makedirs(os.path.join(self.run_dir, "failures"), exist_ok=True)
        self.started = time.time()  # dumps older than this are a previous invocation's
        import torch.distributed as dist

        self.peers: list = [None] * trainer.env.world_size  # (host, pid) per rank
        dist.all_gather_object(self.peers, (socket.gethostname(), os.getpid()))
        self._thread = threading.Thread(target=self._watch, name="harness-hang-watchdog", daemon=True)
        self._thread.start()

    def on_step_end(self, trainer, record) -> None:
        self.durations.append(record.step_time_s)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.poll_s, self.timeout(phases.current()[0]) / 4)):
            hang = self.overdue()
            if hang is not None:
                self._fire(*hang)
                return

    # -- on a hang ----------------------------------------------------------------------------

    def _fire(self, phase: str, idle: float) -> None:
        """Dump, hold the roll call (:func:`harness.failures.report_lost`), summarize, exit with
        EXIT_HANG (also when a dump fails)."""
        try:
            self._report(phase, idle)
        except Exception as e:  # the exit matters more than the report
            log.error("hang watchdog: the dump failed (%s: %s)", type(e).__name__, e)
        finally:
            report_exit(self.trainer.env.rank, EXIT_HANG)
            os._exit(EXIT_HANG)

    def _report(self, phase: str, idle: float) -> None:
        env = self.trainer.env
        directory = os.path.join(self.run_dir, "failures")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"hang_rank_{env.rank}.txt")
        self._write_dump(path, phase, idle)
        fr = _dump_flight_recorder(os.path.join(directory, f"fr_trace_rank_{env.rank}.json"))
        reported = _wait_for_peers(
            directory, env.world_size, min(PEER_WAIT_S, self.timeout(phase) / 2), self.started
        )
        # before any silent rank is killed below: the launcher would stop this one once it sees that
        failures.report_lost(f"hang: phase {phase} lasted {idle:.1f} s after step {self.trainer.state.step}")
        if env.rank == min(reported):
            missing = [r for r in range(env.world_size) if r not in reported]
            line = (
                f"hang: phase {phase} lasted {idle:.1f} s after step {self.trainer.state.step} "
                f"({self.timeout_setting(phase)}); ranks that did not report (the likely "
                f"culprits): {missing or 'none'}; dumps: {directory}/hang_rank_<r>.txt"
                + (", fr_trace_rank_<r>.json" if fr else "")
            )
            log.error("%s", line)
            with open(os.path.join(directory, "hang_summary.txt"), "w") as f:
                f.write(line + "\n")
            self._kill_local(missing)
        else:  # this rank's exit makes its launcher stop the others: let the reporter write first
            summary = os.path.join(directory, "hang_summary.txt")
            deadline = time.monotonic() + SUMMARY_WAIT_S
            while not os.path.exists(summary) and time.monotonic() < deadline:
                time.sleep(0.1)
        for handler in logging.getLogger("harness").handlers:
            handler.flush()

    def _kill_local(self, ranks: list[int]) -> None:
        """SIGKILL the silent ranks on this host (they cannot run Python: the launcher's SIGTERM would
        wait out its grace period on them); ranks elsewhere are left to their own node's launcher."""
        import signal

        host = socket.gethostname()
        for rank in ranks:
            peer_host, pid = self.peers[rank]
            if peer_host == host:
                log.error("hang: killing rank %d (pid %d on %s), which did not report", rank, pid, host)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def timeout_setting(self, phase: str) -> str:
        """``parallel.<key>=<seconds> s`` of ``phase`` (``=null, automatic: <seconds> s`` for the
        step's default)."""
        key, value = HANG_TIMEOUT_KEYS[phase], self.timeouts[phase]
        if value is None:
            return f"parallel.{key}=null, automatic: {self.timeout(phase):g} s"
        return f"parallel.{key}={value:g} s"

    def _write_dump(self, path: str, phase: str, idle: float) -> None:
        trainer, env = self.trainer, self.trainer.env
        tracker = getattr(trainer.backend, "tracker", None)
        header = {
            "rank": env.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "last_finished_step": trainer.state.step,  # the state is at a step's end as it ends
            "watchdog_phase": phase,
            "timeout": self.timeout_setting(phase),
            "seconds_in_phase": round(idle, 1),
            "phase": trainer.phase,
            "last_collective": tracker.describe_last() if tracker is not None else "not tracked",
        }
        pipeline = getattr(trainer.backend, "pipeline", None)
        if pipeline is not None:  # which stage, which micro-batch
            header["pipeline"] = pipeline.where()
        with open(path + ".tmp", "w") as f:
            for key, value in header.items():
                f.write(f"{key}: {value}\n")
            f.write("\nstacks of all threads (faulthandler):\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        os.replace(path + ".tmp", path)


def _dump_flight_recorder(path: str) -> bool:
    """The flight recorder's JSON (every process group's recent collectives) into ``path``."""
    try:
        import torch

        text = torch._C._distributed_c10d._dump_fr_trace_json(True, True)
    except Exception:
        return False
    try:
        json.loads(text)
    except (TypeError, ValueError):
        return False
    with open(path, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    return True


def _wait_for_peers(directory: str, world_size: int, wait_s: float, since: float) -> list[int]:
    """Ranks whose dumps (written after ``since``) are in ``directory`` after at most ``wait_s``."""

    def fresh(rank: int) -> bool:
        path = os.path.join(directory, f"hang_rank_{rank}.txt")
        return os.path.exists(path) and os.path.getmtime(path) >= since

    deadline = time.monotonic() + wait_s
    while True:
        reported = [r for r in range(world_size) if fresh(r)]
        if len(reported) == world_size or time.monotonic() > deadline:
            return reported
        time.sleep(0.2)
