"""A failure on one rank that every rank of the job leaves on, without waiting on a collective.

When a checkpoint save or load fails on one rank (an ``OSError``, torch.distributed.checkpoint's
``CheckpointException``, a full disk), the other ranks may already be waiting in a collective that
the failing rank will never join. :func:`fail` writes one line (rank, host, path, error) under one
key of the job's key-value store (the first failure wins) and ends the process with
:data:`~harness.exits.EXIT_CHECKPOINT`; every other rank's :class:`FailureWatch` thread polls that
key, and on seeing it ends its own process with the same status (the main thread may be blocked in
a collective). Only the rank whose failure won the key prints the ``error:`` line, so the job's
console shows it once. Cost: two ``check``s per rank per :func:`poll_interval` on the store (this key
and the roll call's, below), about 1,000 per second in all at any world size.

**Lost ranks (a node gone).** When a collective fails because a peer went away (a killed node: the
connection is closed or reset) or the hang watchdog fires (a cut link: nothing arrives), the ranks
still running hold a *roll call* in the job store (:func:`report_lost`): every rank on its way out
appends its rank to one key, and so does every rank's :class:`FailureWatch` thread once a roll call
is open (the main thread may be blocked in a collective with a live rank); the ranks that saw the
peer error wait up to ``max(ROLL_CALL_WAIT_S, 3 x poll_interval)`` for the world to answer, and
the rank that opened the roll call logs one line naming the ranks that did not and their hosts
(``lost: ranks 2-3 (host n2) ...``); the process then exits with
:data:`~harness.exits.EXIT_PEER_LOST`. A rank that cannot reach the store (its host is the one cut
off, or the store's host is down) says so in one line naming the store's host and port. Cost, on a
failure only: one append per rank (the key grows to about 4 bytes per rank) and, for the waiting
ranks, one ``get`` per :func:`poll_interval`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
import time

from harness.exits import EXIT_CHECKPOINT, EXIT_PEER_LOST, report_exit

log = logging.getLogger("harness")
KEY = "harness/failure"
ROLL_CALL_KEY = "harness/roll_call"  # the ranks that answered: "0,1,3,"
ROLL_CALL_OPEN = "harness/roll_call_open"  # set by the first rank that holds one: every watch answers
ROLL_CALL_WAIT_S = 5.0  # at least: how long the ranks that saw a peer error wait for the others
STORE_OP_TIMEOUT_S = 10.0  # one roll-call operation on the store, at most
# What torch's gloo and NCCL backends say when a peer process or its host went away.
PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "No route to host",
    "ncclRemoteError",
    "remote process exited",
    "NCCL communicator was aborted",
)
STORE_POLLS_PER_S = 500.0  # what all ranks' polls of one key may cost the job store, together

_watch: FailureWatch | None = None
_hosts: list[str] = []  # each rank's host name (start): the lost-rank line and the rank stats name hosts


class FailureWatch:
    """Polls the job store for a failure announced by any rank (one per process: :func:`start`)."""

    def __init__(self, store, rank: int, poll_s: float = 0.5):
        self.store, self.rank, self.poll_s = store, rank, poll_s
        self.answered = False  # this rank's roll-call answer is in the store
        self.opened = False  # this rank opened the roll call: it reports the verdict
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="harness-failure-watch", daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.store.check([KEY]):
                    line = self.store.get(KEY).decode()
                    log.warning("leaving: %s", line)
                    leave()
                if not self.answered and self.store.check([ROLL_CALL_OPEN]):
                    answer_roll_call()  # the main thread may be blocked in a collective with a live rank
            except Exception:  # noqa: BLE001  (store gone: the job is ending anyway)
                return

    def close(self) -> None:
        self._stop.set()


def hosts() -> list[str]:
    """The host name of each rank, gathered once at start-up (:func:`start`); empty before it."""
    return list(_hosts)


def poll_interval(world_size: int) -> float:
    """Seconds between one rank's polls of a job-store key: 1 s up to 500 ranks, then growing with the
    world so that the store serves about 500 polls per second at any world size (4,096 ranks: 8.2 s)."""
    return max(1.0, world_size / STORE_POLLS_PER_S)


def start(store, rank: int, world_size: int, hosts: list[str] | None = None) -> None:
    """Start this process's watch on ``store`` (None, or world size 1: :func:`fail` only exits), polling
    every :func:`poll_interval` seconds; ``hosts``: the host name of each rank (for :func:`report_lost`)."""
    global _watch, _hosts
    _hosts = [str(h) for h in hosts or []]
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
        leave()


def fail(line: str, error: BaseException | None = None) -> None:
    """Announce ``line`` to every rank and end this process with :data:`EXIT_CHECKPOINT` (never
    returns). Prints ``error: <line>`` unless another rank's failure was announced first. When
    ``error`` says a peer went away (:func:`is_peer_error`), a roll call names the lost ranks and the
    status is :data:`~harness.exits.EXIT_PEER_LOST` when some are."""
    if error is not None and is_peer_error(error) and report_lost(line):
        leave(EXIT_PEER_LOST)
    won = True
    if _watch is not None:
        try:
            won = _watch.store.compare_set(KEY, "", line).decode() == line
        except Exception:  # noqa: BLE001  (no store: say it here)
            won = True
    if won:
        print(f"error: {line}", file=sys.stderr, flush=True)
        log.error("%s", line)
    leave()


def leave(code: int = EXIT_CHECKPOINT) -> None:
    """Answer the roll call (a leaving rank is not a lost one), record ``code`` and end the process."""
    answer_roll_call()
    rank = int(os.environ.get("RANK", "0"))
    report_exit(rank, code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


# -- lost ranks -------------------------------------------------------------------------------------


def is_peer_error(error: BaseException) -> bool:
    """Whether ``error`` (or a DCP ``CheckpointException``'s per-rank errors, or its cause) says that a
    peer process or its host went away (:data:`PEER_SIGNS`, ``torch.distributed.DistNetworkError``)."""
    import torch.distributed as dist

    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, dist.DistNetworkError) or any(sign in str(e) for sign in PEER_SIGNS):
            return True
        failed = getattr(e, "failures", None)
        if isinstance(failed, dict):
            todo += [v[0] if isinstance(v, tuple) else v for v in failed.values()]
        todo += [e.__cause__, e.__context__]
    return False


def answer_roll_call() -> None:
    """Append this rank to the roll call (once per process; nothing without a store)."""
    w = _watch
    if w is None or w.answered:
        return
    w.answered = True
    try:
        _short_timeout(w.store)
        w.store.append(ROLL_CALL_KEY, f"{w.rank},")
    except Exception:  # noqa: BLE001  (store unreachable: report_lost says so)
        w.answered = False


def _short_timeout(store) -> None:
    import datetime

    store.set_timeout(datetime.timedelta(seconds=STORE_OP_TIMEOUT_S))


def lost_ranks(wait_s: float = ROLL_CALL_WAIT_S) -> list[int] | None:
    """Answer the roll call, wait up to ``wait_s`` for every rank's answer and return the ranks that
    did not answer (sorted; empty: none lost); None when the store cannot be reached."""
    w = _watch
    if w is None:
        return []
    try:
        _short_timeout(w.store)
        opener = w.store.compare_set(ROLL_CALL_OPEN, "", str(w.rank)).decode()
    except Exception:  # noqa: BLE001
        return None
    w.opened = opener == str(w.rank)
    answer_roll_call()
    if not w.answered:
        return None
    world = len(_hosts) or 1
    deadline = time.monotonic() + max(wait_s, 3 * w.poll_s)
    while True:
        try:
            text = w.store.get(ROLL_CALL_KEY).decode()
        except Exception:  # noqa: BLE001
            return None
        answered = {int(r) for r in text.split(",") if r}
        if len(answered) >= world or time.monotonic() > deadline:
            return [r for r in range(world) if r not in answered]
        time.sleep(min(w.poll_s, 1.0))


def _say(line: str) -> None:
    """``error: <line>`` on stderr, and the line in ``train.log`` (the harness logger's own handlers: not
    the console's, which would show it twice)."""
    print(f"error: {line}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (line,), None)
    for handler in log.handlers:
        handler.handle(record)


def report_lost(cause: str, wait_s: float = ROLL_CALL_WAIT_S) -> list[int] | None:
    """Hold the roll call (:func:`lost_ranks`) after ``cause`` (a one-line description of what
    failed) and log one line: by the rank that opened the roll call, the lost ranks and their hosts; by
    the first rank of a host that cannot reach the store, the store's address. Returns the lost ranks
    (empty: none), or None when the store cannot be reached (the likely lost party is this host or
    the store's)."""
    w = _watch
    lost = lost_ranks(wait_s)
    if w is None or lost == []:
        return lost
    host = socket.gethostname()
    cause = _short(cause)
    if lost is None:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            line = (
                f"lost: the job store at {where} does not answer host {host} (rank {w.rank}; ranks here: "
                f"{rank_ranges([r for r, h in enumerate(_hosts) if h == host])}): this host is cut "
                f"off, or the store's host is down; after: {cause}"
            )
            _say(line)
        return None
    if w.opened:  # one line per job: the rank that opened the roll call
        who = describe_ranks(lost, _hosts)
        waited = max(wait_s, 3 * w.poll_s)
        _say(f"lost: {who} did not answer the roll call within {waited:g} s; after: {cause}")
    return lost


def _short(text: str) -> str:
    """One line of at most 300 characters, without gloo's source location and advice."""
    text = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", " ".join(text.split()))
    return text.split(" This is typically caused")[0][:300]


def describe_ranks(ranks: list[int], hosts: list[str]) -> str:
    """``ranks 2-3 (host n2)``, ``ranks 2-3 (host n2), 6 (host n4)``: ranks grouped by host."""
    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(hosts[r] if r < len(hosts) else "?", []).append(r)
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} " + ", ".join(f"{rank_ranges(rs)} (host {h})" for h, rs in by_host.items())


def rank_ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    groups: list[list[int]] = []
    for r in sorted(ranks):
        if groups and r == groups[-1][-1] + 1:
            groups[-1].append(r)
        else:
            groups.append([r])
    return ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups)
