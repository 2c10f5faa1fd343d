"""Stop requests: SIGUSR1/SIGTERM (preemption), SIGINT (Ctrl-C) and ``train.stop_at_step``.

Each makes the run finish the current optimizer step, write a complete checkpoint and return; all
ranks agree on the step (one small all-reduce per step on several processes). The same all-reduce
carries SIGUSR2, the request to profile the next steps (``harness/hooks/profiler.py``).
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from harness.hooks.base import Hook

log = logging.getLogger("harness")


class StopSignal:
    """SIGUSR1 / SIGTERM (Slurm's warning before the time limit, preemption, torchrun forwarding a
    SIGTERM) and SIGINT (Ctrl-C) are recorded; a second Ctrl-C interrupts at once (``KeyboardInterrupt``).

    Use as a context manager; the previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self):
        self.signum: int | None = None
        self.profile = False  # SIGUSR2 arrived here: profile the next steps (not a stop)
        self.profile_requested = False  # SIGUSR2 on some rank, agreed at a step's end
        self._previous: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGUSR2:
            self.profile = True
            return
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def requested(self, backend) -> str | None:
        """``"preempt"`` (SIGUSR1/SIGTERM) or ``"interrupt"`` (SIGINT) when any rank got a signal, else
        None; all ranks agree (a SIGINT anywhere wins)."""
        local = [
            float(self.signum in (signal.SIGUSR1, signal.SIGTERM)),
            float(self.signum == signal.SIGINT),
            float(self.profile),
        ]
        self.profile = False
        flags = local
        if backend.env.world_size > 1:
            flags = backend.all_reduce_sum(
                torch.tensor(local, device=backend.env.device), world=True
            ).tolist()
        self.profile_requested = self.profile_requested or flags[2] > 0  # cleared by the profiler hook
        if flags[1] > 0:
            return "interrupt"
        return "preempt" if flags[0] > 0 else None


_REASONS = {"preempt": "a stop signal (SIGUSR1/SIGTERM)", "interrupt": "Ctrl-C (SIGINT)"}


class StopHook(Hook):
    """Ends the invocation after the step at which a signal arrived (on any rank) or after
    ``train.stop_at_step``; the checkpoint hook then saves, and a rerun continues."""

    def __init__(self, stop_at_step: int | None):
        self.stop_at_step = stop_at_step
        self.signal = StopSignal()
        self.reason: str | None = None

    @classmethod
    def from_config(cls, train) -> StopHook:
        """``train.stop_at_step``."""
        return cls(train.stop_at_step)

    def on_train_start(self, trainer) -> None:
        self.signal.__enter__()

    def on_step_end(self, trainer, record) -> None:
        signalled = self.signal.requested(trainer.backend)
        if signalled is not None:
            trainer.state.stop_signal = signalled
            self.reason = _REASONS[signalled]
        elif record.step == self.stop_at_step:
            self.reason = "train.stop_at_step"
        if self.reason is not None:
            trainer.request_stop(self.reason)

    def on_train_end(self, trainer) -> None:
        if self.reason is not None:
            log.info(
                "stopping after step %d on %s; rerun with checkpoint.resume=auto to continue",
                trainer.state.step,
                self.reason,
            )

    def close(self) -> None:
        self.signal.__exit__()
