"""The run directory's record and its owner: one process at a time, and a history of invocations.

``<run>/`` is written only by rank 0 of the one job that holds its lock:

    .lock              who holds the directory (host, pid, start time), ``flock``-ed for the run
    invocations.jsonl  one ``start`` line per accepted invocation (time, host, pid, command line,
                       overrides, world size, resume step, budget, whether it trains) and one ``end``
                       line with its outcome -- the history of how the run was trained
    .hydra/            config.yaml, overrides.yaml, resolved.yaml of the latest invocation that
                       trained; an invocation with nothing to train leaves it as it was
    train.log          every log line of every invocation (appended)
    failures/          rank_<r>.json: each rank's error when a run fails (rank 0 logs the first)

A second process that asks for the lock while a live one holds it gets a :class:`ConfigError`
naming the holder; a lock file left by a process that died (``flock`` is released with its
holder) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import time
import traceback

from omegaconf import OmegaConf

from harness.errors import ConfigError

log = logging.getLogger("harness")

LOCK = ".lock"
INVOCATIONS = "invocations.jsonl"


class RunDirLock:
    """An exclusive, non-blocking ``flock`` on ``<run>/.lock`` holding this process's identity.

    Raises (from :meth:`acquire`):
        ConfigError: another live process holds the run directory (its host and pid named).
    """

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"run directory {os.path.dirname(self.path)} is in use by pid {holder.get('pid', '?')} on "
                "host "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); wait for it to end, or "
                "choose "
                "another run_name / hydra.run.dir"
            ) from None
        stale = _read_holder(fd)
        if stale.get("pid") and (stale.get("pid"), stale.get("host")) != (os.getpid(), socket.gethostname()):
            log.warning(
                "taking over the lock of %s left by pid %s on host %s (since %s), which is gone",
                self.path,
                stale.get("pid"),
                stale.get("host"),
                stale.get("since"),
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and unlock it (the file stays: removing it would race a new holder)."""
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_hydra_dir(run_dir: str, composed, resolved: dict, overrides: list[str]) -> None:
    """Write ``.hydra/{config,overrides,resolved}.yaml`` (the invocation that trains)."""
    hydra_dir = os.path.join(run_dir, ".hydra")
    os.makedirs(hydra_dir, exist_ok=True)
    for name, node in (("config", composed), ("overrides", list(overrides)), ("resolved", resolved)):
        with open(os.path.join(hydra_dir, f"{name}.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(node if OmegaConf.is_config(node) else OmegaConf.create(node)))


def record_invocation(run_dir: str, event: str, **fields) -> None:
    """Append one line to ``invocations.jsonl``: ``event`` (``start`` | ``end``), the time, host, pid
    and ``fields`` (for ``start`` the command line is added)."""
    record = {"event": event, "time": _now(), "host": socket.gethostname(), "pid": os.getpid(), **fields}
    if event == "start":
        record["argv"] = list(sys.argv)
    with open(os.path.join(run_dir, INVOCATIONS), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def open_log_file(run_dir: str, *loggers: logging.Logger) -> logging.Handler:
    """Append every line of ``loggers`` to ``<run>/train.log``; returns the handler (remove it when done)."""
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    for logger in loggers:
        logger.addHandler(handler)
    return handler


class RunDir:
    """The run directory as one part: the lock (rank 0, agreed by every rank), ``train.log``, the
    invocation history, ``.hydra/`` and failure reports. Open it with :meth:`open` once every
    check has passed; :meth:`close` records the outcome and releases the lock."""

    def __init__(self, path: str, env, lock: RunDirLock | None, log_file: logging.Handler | None):
        self.path, self.env, self._lock, self._log_file = path, env, lock, log_file

    @classmethod
    def open(cls, path: str, env, agree, invocation: dict, hydra: tuple | None, loggers: tuple) -> RunDir:
        """Take the lock on rank 0 (``agree(flag)`` sums a flag over the ranks so that all of them
        raise together), open ``train.log`` for ``loggers``, record the ``start`` of ``invocation``, and
        write ``.hydra/`` from ``hydra = (composed, resolved, overrides)`` when it is given.

        Raises:
            ConfigError: another live process holds the run directory (every rank raises).
        """
        lock, error = None, None
        if env.is_main:
            try:
                lock = RunDirLock(path).acquire()
            except ConfigError as e:
                error = e
        if env.world_size > 1 and agree(float(error is not None)) > 0 and error is None:
            error = ConfigError(f"rank 0 could not lock the run directory {path} (see its error)")
        if error is not None:
            raise error
        log_file = None
        if env.is_main:
            log_file = open_log_file(path, *loggers)
            record_invocation(path, "start", **invocation)
            if hydra is not None:
                write_hydra_dir(path, *hydra)
        return cls(path, env, lock, log_file)

    def close(self, outcome: str, loggers: tuple) -> None:
        """Record the ``end`` of the invocation, release the lock, detach ``train.log``."""
        if self._lock is not None:
            record_invocation(self.path, "end", outcome=outcome)
            self._lock.release()
            self._lock = None
        if self._log_file is not None:
            for logger in loggers:
                logger.removeHandler(self._log_file)
            self._log_file.close()
            self._log_file = None

    def report_failure(self, e: BaseException, wait_s: float) -> None:
        """Every rank records its error in ``failures/rank_<r>.json``; rank 0 then logs the first one
        (by time) once in ``train.log``, so the root cause of a multi-rank failure is in one place
        (the other ranks usually fail afterwards in a collective with the dead one). Rank 0 waits up
        to ``wait_s`` for the others' reports; a :class:`HarnessError` of its own is left to the CLI's
        one ``error:`` line."""
        from harness.errors import HarnessError

        directory = os.path.join(self.path, "failures")
        record = {
            "rank": self.env.rank,
            "time": time.time(),
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        with contextlib.suppress(OSError):
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"rank_{self.env.rank}.json"), "w") as f:
                json.dump(record, f)
        if not self.env.is_main:
            return
        records = _gather_reports(directory, record, self.env.world_size, time.time() + wait_s)
        first = min(records, key=lambda r: r["time"])
        if isinstance(e, HarnessError) and first["rank"] == self.env.rank:
            return
        log.error(
            "training failed: rank %d raised first: %s\n%s", first["rank"], first["error"], first["traceback"]
        )
        if first["rank"] != self.env.rank:
            log.error(
                "rank %d stopped because of it: %s", self.env.rank, " ".join(record["error"].split())[:300]
            )


def _gather_reports(directory: str, own: dict, world_size: int, deadline: float) -> list[dict]:
    records = [own]
    while world_size > 1 and time.time() < deadline:  # give the others a moment to report theirs
        with contextlib.suppress(OSError, ValueError):
            records = [json.load(open(os.path.join(directory, n))) for n in os.listdir(directory)]
        if len(records) >= world_size:
            break
        time.sleep(0.2)
    return records
