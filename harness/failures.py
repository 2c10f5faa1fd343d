"""A failure on one rank that every rank of the job leaves on, without waiting on a collective.

When a checkpoint save or load fails on one rank (an ``OSError``, torch.distributed.checkpoint's
``CheckpointException``, a full disk), the other ranks may already be waiting in a collective that
the failing rank will never join. :func:`fail` writes one line (rank, host, path, error) under one
key of the job's key-value store (the first failure wins) and ends the process with
:data:`~harness.exits.EXIT_CHECKPOINT`; every other rank's :class:`FailureWatch` thread polls that
key, and on seeing it ends its own process with the same status (the main thread may be blocked in
a collective). Only the rank whose failure won the key prints the ``error:`` line, so the job's
console shows it once. Cost: one ``check`` per rank per :func:`poll_interval` on the store, about
500 per second in all at any world size.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

from harness.exits import EXIT_CHECKPOINT, report_exit

log = logging.getLogger("harness")
KEY = "harness/failure"
STORE_POLLS_PER_S = 500.0  # what all ranks' polls of one key may cost the job store, together

_watch: FailureWatch | None = None


class FailureWatch:
    """Polls the job store for a failure announced by any rank (one per process: :func:`start`)."""

    def __init__(self, store, rank: int, poll_s: float = 0.5):
        self.store, self.rank, self.poll_s = store, rank, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="harness-failure-watch", daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.store.check([KEY]):
                    line = self.store.get(KEY).decode()
                    log.warning("leaving: %s", line)
                    _leave()
            except Exception:  # noqa: BLE001  (store gone: the job is ending anyway)
                return

    def close(self) -> None:
        self._stop.set()


def poll_interval(world_size: int) -> float:
    """Seconds between one rank's polls of a job-store key: 1 s up to 500 ranks, then growing with the
    world so that the store serves about 500 polls per second at any world size (4,096 ranks: 8.2 s)."""
    return max(1.0, world_size / STORE_POLLS_PER_S)


def start(store, rank: int, world_size: int) -> None:
    """Start this process's watch on ``store`` (None, or world size 1: :func:`fail` only exits), polling
    every :func:`poll_interval` seconds."""
    global _watch
    poll_s = poll_interval(world_size)
    if _watch is not None:
        _watch.close()
    _watch = FailureWatch(store, rank, poll_s) if store is not None else None
    if _watch is not None:
        _watch._thread.start()


def stop() -> None:
    """Stop polling (at the end of a run) and wait for the thread to end: a daemon thread still inside a
    store call at interpreter exit aborts the process (``terminate called without an active
    exception``) when it takes the GIL back during finalization."""
    global _watch
    if _watch is not None:
        _watch.close()
        if _watch._thread.is_alive():
            _watch._thread.join(timeout=5.0)
        _watch = None


def describe(rank: int, what: str, path: str, error: BaseException, host: str | None = None) -> str:
    """``<what> failed on rank <r> (host <h>): <path>: <error>`` in one line (``host``: this one's)."""
    detail = " ".join(str(getattr(error, "strerror", None) or error).split())[:300]
    host = host or socket.gethostname()
    return f"{what} failed on rank {rank} (host {host}): {path}: {type(error).__name__}: {detail}"


def announced() -> str | None:
    """The failure line a rank announced, or None (none yet, or no watch: world size 1)."""
    if _watch is None:
        return None
    try:
        return _watch.store.get(KEY).decode() if _watch.store.check([KEY]) else None
    except Exception:  # noqa: BLE001  (store gone)
        return None


def leave_if_announced() -> None:
    """End this process as :class:`FailureWatch` would when a failure was announced: called where an
    error in this rank may be the consequence of that failure (a peer that left mid-collective), so
    that the exit status is :data:`EXIT_CHECKPOINT` and not whichever error came first."""
    line = announced()
    if line is not None:
        log.warning("leaving: %s", line)
        _leave()


def fail(line: str) -> None:
    """Announce ``line`` to every rank and end this process with :data:`EXIT_CHECKPOINT` (never
    returns). Prints ``error: <line>`` unless another rank's failure was announced first."""
    won = True
    if _watch is not None:
        try:
            won = _watch.store.compare_set(KEY, "", line).decode() == line
        except Exception:  # noqa: BLE001  (no store: say it here)
            won = True
    if won:
        print(f"error: {line}", file=sys.stderr, flush=True)
        log.error("%s", line)
    _leave()


def _leave() -> None:
    rank = int(os.environ.get("RANK", "0"))
    report_exit(rank, EXIT_CHECKPOINT)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(EXIT_CHECKPOINT)
