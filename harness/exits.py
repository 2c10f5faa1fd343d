"""Exit statuses of the training command and how a node wrapper combines its workers' statuses.

A tiny leaf module (standard library only) shared by ``harness.train`` and
``harness.cluster.node``, so that no training process imports the launcher.

| status | meaning |
|---|---|
| 0   | done (or nothing left to train) |
| 2   | a problem the user can fix: one ``error:`` line on stderr, nothing built, nothing lost |
| 69  | ranks were lost (a node killed): one ``lost:`` line names them and their hosts; requeue |
| 74  | a checkpoint save or load failed on a rank: one ``error:`` line names it (``harness.failures``) |
| 75  | stopped by SIGUSR1/SIGTERM after a complete checkpoint (``EX_TEMPFAIL``): requeue |
| 124 | the hang watchdog fired: a phase outlasted its ``parallel.hang_timeout*_s`` (``failures/``) |
| 130 | stopped by Ctrl-C (SIGINT) after a complete checkpoint; rerun to continue |

torchrun reports any failed worker as status 1 (after its ``ChildFailedError`` report), so
workers also write their status into ``$HARNESS_EXIT_CODE_DIR`` (:func:`report_exit`), and
``harness.cluster.node`` (used by ``launch/torchrun.sh`` and the Slurm script) turns the
launcher's 1 back into 2, 69, 74, 75, 124 or 130 (:func:`combine_exit`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PEER_LOST = 69  # EX_UNAVAILABLE
EXIT_CHECKPOINT = 74  # EX_IOERR
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
EXIT_HANG = 124
EXIT_CODE_DIR_ENV = "HARNESS_EXIT_CODE_DIR"


def report_exit(rank: int, code: int) -> None:
    """Record this training process's exit status for the node wrapper (no-op outside it).

    Written as ``$HARNESS_EXIT_CODE_DIR/rank_<rank>``; called once the outcome is certain (for a
    preempted run: after the checkpoint is complete), so a launcher that kills the remaining workers
    after the first one exits cannot lose it.
    """
    directory = os.environ.get(EXIT_CODE_DIR_ENV)
    if directory and os.path.isdir(directory):
        with open(os.path.join(directory, f"rank_{rank}"), "w") as f:
            f.write(str(code))


@contextlib.contextmanager
def stop_signals_ignored():
    """Ignore SIGTERM and SIGUSR1 inside (main thread only; restored after): for the closing of a
    run whose status is already recorded. Under ``srun --kill-on-bad-exit`` the first node to exit
    (75 after a preemption) makes Slurm send SIGTERM to every other node's processes, which are
    finishing the same way; a SIGTERM must not kill them there (rank 0 writing its summary, a
    launcher turning 75 into 143). Slurm's SIGKILL still follows after ``KillWait``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def combine_exit(launcher_rc: int, worker_codes: list[int]) -> int:
    """The node's exit status from the launcher's and the workers' reported ones.

    When the launcher failed and every reported status is 0 or one of 2 / 69 / 74 / 124 / 75 / 130
    (at least one of them), that status is returned (2 wins over 69 over 74 over 124 over 130 over 75:
    a refused config is the cause, the others stopped because of it); a crash (any other status, or none
    reported) keeps the launcher's status.
    """
    if launcher_rc == 0 or not worker_codes:
        return launcher_rc
    known = (EXIT_USAGE, EXIT_PEER_LOST, EXIT_CHECKPOINT, EXIT_HANG, EXIT_INTERRUPTED, EXIT_PREEMPTED)
    if not set(worker_codes) <= {EXIT_OK, *known}:
        return launcher_rc
    for code in known:
        if code in worker_codes:
            return code
    return launcher_rc


def exit_code(stop_signal: str | None) -> int:
    """The status of a run that ended normally: 75 after a preemption signal (``"preempt"``), 130
    after Ctrl-C (``"interrupt"``), else 0."""
    return {"preempt": EXIT_PREEMPTED, "interrupt": EXIT_INTERRUPTED}.get(stop_signal, EXIT_OK)
