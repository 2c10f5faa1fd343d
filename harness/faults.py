"""Fault injection for the reliability tests, read once from ``$HARNESS_FAULT``; inert when it is unset.

``HARNESS_FAULT`` is a comma-separated list of ``kind:arg[:rank]``:

- ``raise:S[:R]``          raise ``RuntimeError("injected fault at step S")`` as step S starts (on rank R,
                           default every rank); ``raise_once`` does it only in a job's first attempt
                           (``TORCHELASTIC_RESTART_COUNT`` unset or 0), for torchrun ``--max-restarts``
- ``kill:S[:R]``           the process sends itself SIGKILL as step S starts (on rank R): no cleanup at all
- ``stop:S[:R]``           the process sends itself SIGSTOP as step S starts (on rank R): a rank that can
                           no longer run Python (the hang watchdog tests)
- ``slow_step:T[:R]``      every step's forward/backward takes T seconds longer (on rank R): a straggler
                           whose peers wait for it inside the collectives
- ``slow:T[:R]``           every step sleeps T seconds as it starts (on rank R): a slow rank, a long run
- ``nan_loss:S[:R]``       the first micro-batch's loss of step S is NaN (on rank R)
- ``checkpoint_sleep:T``   rank 0 sleeps T seconds in every checkpoint's finish, after every rank's files
                           are written, before its manifest (a window for kills during a save)
- ``checkpoint_write_sleep:T[:R]``  every checkpoint's background write sleeps T seconds on rank R after its
                           files are written, before they are hashed (training goes on meanwhile)
- ``checkpoint_enospc:S[:R]``  rank R's part of checkpoint S fails with ``OSError(ENOSPC)`` (disk full) once
                           its files are written, in the background thread (default every rank)
- ``kill_staging:S[:R]``   SIGKILL as checkpoint S's staging starts (its ``.tmp-`` directory made, nothing
                           written), in the training thread
- ``kill_writing:S[:R]``   SIGKILL in checkpoint S's background write, once the rank's files are written,
                           before its hashes are published
- ``kill_finishing:S``     SIGKILL of rank 0 once every rank's hashes of checkpoint S arrived, before the
                           manifest
- ``checkpoint_stop:S[:R]`` the process sends itself SIGSTOP as the save of checkpoint S starts, inside
                           the ``checkpoint`` phase (on rank R): a rank that hangs mid-save (the hang
                           watchdog's phase tests)
- ``load_eio:S[:R]``       loading checkpoint S at a resume fails with ``OSError(EIO)`` (on rank R), before
                           the backend reads it: the other ranks wait in its collectives
- ``store_sleep:T``        a token store sleeps T seconds after its shards are written, before its
                           ``meta.json`` (a window for kills during ``prepare_data``)
- ``store_enospc:0[:R]``   writing a token store fails with ``OSError(ENOSPC)`` after its shards, before its
                           ``meta.json`` (on rank R): a full disk under the cache (the argument is unused)
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Faults:
    """The faults of ``$HARNESS_FAULT`` that apply to this rank (parsed once: :meth:`from_env`)."""

    items: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, rank: int | None = None) -> Faults:
        """Parse ``$HARNESS_FAULT`` for ``rank`` (default ``$RANK``), keeping the faults that target it."""
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        items = []
        for item in filter(None, os.environ.get("HARNESS_FAULT", "").split(",")):
            kind, arg, *target = item.split(":")
            if target and int(target[0]) != rank:
                continue
            if kind == "raise_once":
                if not first_attempt:
                    continue
                kind = "raise"
            items.append((kind, float(arg)))
        return cls(tuple(items))

    def on_step(self, step: int) -> None:
        """Called as optimizer step ``step`` starts (``raise`` / ``slow``)."""
        for kind, arg in self.items:
            if kind == "raise" and step == arg:
                raise RuntimeError(f"injected fault at step {step}")
            if kind == "kill" and step == arg:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "stop" and step == arg:
                os.kill(os.getpid(), signal.SIGSTOP)
            if kind == "slow":
                time.sleep(arg)

    def slow_step(self) -> None:
        """Inside the step's forward/backward: sleep the ``slow_step`` seconds (a straggler)."""
        for kind, arg in self.items:
            if kind == "slow_step":
                time.sleep(arg)

    def nan_loss(self, step: int) -> bool:
        """True when the first micro-batch's loss of ``step`` must be NaN on this rank."""
        return any(kind == "nan_loss" and step == arg for kind, arg in self.items)

    def on_save(self, step: int) -> None:
        """Called on every rank as the save of checkpoint ``step`` starts (``checkpoint_stop``)."""
        for kind, arg in self.items:
            if kind == "checkpoint_stop" and step == arg:
                os.kill(os.getpid(), signal.SIGSTOP)

    def on_checkpoint_stage(self, step: int) -> None:
        """Called on every rank as checkpoint ``step``'s staging starts (``kill_staging``)."""
        if any(kind == "kill_staging" and step == arg for kind, arg in self.items):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint_written(self, step: int) -> None:
        """Called in each rank's background thread once its files of checkpoint ``step`` are written,
        before they are hashed (``checkpoint_write_sleep``, ``checkpoint_enospc``, ``kill_writing``).

        Raises:
            OSError: ``ENOSPC`` for ``checkpoint_enospc:step``.
        """
        for kind, arg in self.items:
            if kind == "checkpoint_write_sleep":
                time.sleep(arg)
            if kind == "kill_writing" and step == arg:
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "checkpoint_enospc" and step == arg:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def on_checkpoint(self, step: int) -> None:
        """Called on rank 0 once every rank's files of checkpoint ``step`` are written and hashed, before
        its manifest (``checkpoint_sleep``, ``kill_finishing``)."""
        for kind, arg in self.items:
            if kind == "checkpoint_sleep":
                time.sleep(arg)
            if kind == "kill_finishing" and step == arg:
                os.kill(os.getpid(), signal.SIGKILL)

    def on_load(self, step: int) -> None:
        """Called on every rank as checkpoint ``step`` starts loading (``load_eio``)."""
        for kind, arg in self.items:
            if kind == "load_eio" and step == arg:
                raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected)")

    def on_store_written(self) -> None:
        """Called after a token store's shards are written, before its ``meta.json``."""
        for kind, arg in self.items:
            if kind == "store_sleep":
                time.sleep(arg)
            if kind == "store_enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
