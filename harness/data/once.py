"""One preparation per job: on a cold cache one process tokenizes (and trains the BPE tokenizer) while
the others wait for it, so the ranks never race to write the same token store.

Who prepares: the first rank (rank 0) when the cache directory is shared between the nodes, the
first rank of each node (local rank 0) otherwise. How it is decided (:meth:`PrepareOnce.begin`, a
cheap probe): rank 0 creates an empty file with a new random name in ``<cache_dir>/.probes/`` and
publishes the name in the job's key-value store (:func:`harness.dist.job_store`); the local rank 0
of every node looks for that file (one ``stat``): seen, the node's ranks wait for rank 0; not seen,
the node's local rank 0 prepares the node's own cache and its node's ranks wait for it. Each local
rank 0 publishes its node's answer under the node's key (``GROUP_RANK`` of torchrun, else
``SLURM_NODEID``, else the host name). Rank 0 removes probes older than a day.

Waiting: a process that finds an item cold (a store or the BPE tokenizer not yet in the cache) and
does not prepare polls its preparer's ``done`` key (every ``poll_s``: 1 s, more above 500 ranks,
:func:`harness.failures.poll_interval`) and, one process per node,
logs ``waiting for rank 0 (host h) to prepare the data cache (N s)`` every ``progress_s`` (30 s).
The preparer sets its ``done`` key when its whole preparation ends: ``ok``, or the one line of its
failure, which every waiter raises as :class:`~harness.errors.DataError`. Waiting longer than
``data.prepare_timeout_s`` raises too, and so does losing the store (its host, rank 0's launcher,
died). A warm cache costs a waiter no store operation.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from harness.errors import DataError, HarnessError

log = logging.getLogger("harness")
KEY = "harness/data"
PROBE_MAX_AGE_S = 86400.0
T = TypeVar("T")


def node_id() -> str:
    """This node's name in the job: torchrun's ``GROUP_RANK``, else ``SLURM_NODEID``, else the host."""
    for name in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(name) not in (None, ""):
            return f"node{os.environ[name]}"
    return socket.gethostname()


def shares_cache(sees_probe: bool, rank: int) -> bool:
    """Whether a node's ranks wait for rank 0 (True) or for their own local rank 0 (False): rank 0's
    node always shares; another node shares when its local rank 0 sees rank 0's probe file."""
    return rank == 0 or sees_probe


@dataclass
class PrepareOnce:
    """Which process of the job prepares the data cache, and the others' waiting.

    Attributes:
        store: the job's key-value store (``set``/``get``/``check``), None in a one-process job (it prepares).
        rank, local_rank: this process's global rank and its rank on the node.
        node: this node's name (:func:`node_id`); host: its host name (in messages).
        timeout_s: ``data.prepare_timeout_s``: the longest a process waits for its preparer (s).
    """

    store: object | None = None
    rank: int = 0
    local_rank: int = 0
    node: str = ""
    host: str = field(default_factory=socket.gethostname)
    timeout_s: float = 7200.0
    poll_s: float = 1.0
    progress_s: float = 30.0
    _preparer: dict | None = None  # who prepares for this process: preparer()
    _doing: str = "prepare the data"

    @classmethod
    def for_job(cls, rank: int, local_rank: int, world_size: int, timeout_s: float) -> PrepareOnce:
        """This process's :class:`PrepareOnce` (its store: :func:`harness.dist.job_store`, which the
        trainer reaches once the process group exists); one that prepares alone in a one-process job
        (or, with no store, in each process, as before this module)."""
        if world_size == 1:
            return cls(timeout_s=timeout_s)
        from harness.dist import job_store
        from harness.failures import poll_interval

        return cls(
            job_store(60.0),
            rank,
            local_rank,
            node_id(),
            timeout_s=timeout_s,
            poll_s=poll_interval(world_size),
        )

    @property
    def prepares(self) -> bool:
        """True on a process that prepares (rank 0; a local rank 0 whose node has its own cache)."""
        if self.store is None or self.rank == 0:
            return True
        return self.local_rank == 0 and self._preparer is not None and not self._preparer["shared"]

    def _who(self) -> str:
        return f"rank {self.rank} (host {self.host})"

    def begin(self, cache_dir: str) -> None:
        """The probe (module docstring): rank 0 writes it, each local rank 0 looks for it and publishes
        its node's preparer. Other ranks do nothing here.

        Raises:
            DataError: rank 0 cannot write into ``cache_dir`` (on rank 0; the others get its line),
                or rank 0's line.
        """
        if self.store is None or self.local_rank != 0:
            return
        if self.rank == 0:
            rank0 = {"file": _write_probe(cache_dir), "who": self._who(), "node": self.node}
            self.store.set(f"{KEY}/probe", json.dumps(rank0))
            sees = True
        else:
            rank0 = json.loads(self._wait(f"{KEY}/probe", "write its probe", "rank 0"))
            # no probe (a read-only cache): every node waits for rank 0, which fails only if it must write
            sees = rank0["file"] is None or os.path.exists(os.path.join(cache_dir, ".probes", rank0["file"]))
        if shares_cache(sees, self.rank):
            mine = {"done": f"{KEY}/done/rank0", "who": rank0["who"], "shared": True, "node": rank0["node"]}
        else:
            mine = {"done": f"{KEY}/done/{self.node}", "who": self._who(), "shared": False, "node": self.node}
        self._preparer = mine
        self.store.set(f"{KEY}/node/{self.node}", json.dumps(mine))

    @contextlib.contextmanager
    def preparing(self, cache_dir: str | None):
        """Around the whole preparation (tokenizer and stores): :meth:`begin` when there is a cache to
        prepare (``cache_dir``), and on a preparer its ``done`` key set at the end: ``ok``, or
        ``error: <line>`` when anything in the block raised (then re-raised)."""
        try:
            if cache_dir is not None:
                self.begin(cache_dir)
            yield self
        except BaseException as e:
            if self.prepares:
                self._publish("error: " + self._failure(e))
            raise
        if self.prepares:
            self._publish("ok")

    def _publish(self, value: str) -> None:
        if self.store is None:
            return
        key = self._preparer["done"] if self._preparer else f"{KEY}/done/rank0"
        with contextlib.suppress(Exception):  # the store gone: the job is ending anyway
            self.store.set(key, value)

    def _failure(self, e: BaseException) -> str:
        detail = str(e) if isinstance(e, HarnessError) else f"{type(e).__name__}: {e}"
        return f"{self._who()} failed to {self._doing}: {' '.join(detail.split())[:500]}"

    def make(self, what: str, done: Callable[[], bool], make: Callable[[], T]) -> T:
        """``make()`` on a preparer (which finds the cache itself when ``done()``); on any other process
        with ``done()`` false, first wait for the preparer (:meth:`wait`), then ``make()`` finds it.

        Args:
            what: the step in words, e.g. ``tokenize data.path (corpus.jsonl)``.
            done: whether the item is complete in the cache (a ``stat``).
            make: returns the item, from the cache or made.
        Raises:
            DataError: the preparer failed (its line), the wait timed out, or the item is still not
                in this process's cache after the preparer finished.
        """
        if self.prepares:
            if not done():
                self._doing = what
                level = logging.INFO if self.rank == 0 else logging.WARNING
                log.log(level, "preparing the cache on %s: %s", self._who(), what)
            return make()
        if not done():
            self.wait(what)
            if not done():
                raise DataError(
                    f"data.cache_dir: {self._preparer['who']} finished preparing, but this process "
                    f"({self._who()}) does not find the result of '{what}' in its cache (do the nodes "
                    "see the same corpus files, with the same sizes and modification times?)"
                )
        return make()

    def preparer(self, what: str = "prepare the data") -> dict:
        """Who prepares for this process: ``{"done": its key, "who": "rank r (host h)", "shared": rank 0's
        cache, "node": its node}``; a process other than a local rank 0 waits for its node's answer.

        Raises:
            DataError: rank 0's failure line, or no answer within ``timeout_s``.
        """
        if self._preparer is None:
            self._preparer = json.loads(self._wait(f"{KEY}/node/{self.node}", what, "local rank 0"))
        return self._preparer

    def wait(self, what: str) -> None:
        """Wait for this process's preparer to finish (its ``done`` key).

        Raises:
            DataError: the preparer's failure line, or no answer within ``timeout_s``.
        """
        preparer = self.preparer(what)
        self._wait(preparer["done"], "prepare the data cache", preparer["who"])

    def _wait(self, key: str, what: str, who: str) -> str:
        start = time.monotonic()
        rank0 = f"{KEY}/done/rank0"
        speaks = self.local_rank == (1 if self._preparer and self._preparer["node"] == self.node else 0)
        next_line = start + self.progress_s
        while True:
            for k in dict.fromkeys([key, rank0]):
                try:
                    value = self.store.get(k).decode() if self.store.check([k]) else None
                except Exception as e:  # noqa: BLE001  (the store's host, rank 0's launcher, is gone)
                    raise DataError(
                        f"{self._who()} lost the job's key-value store ({type(e).__name__}) while waiting "
                        f"for {who} to {what}: that process probably died; see its log"
                    ) from e
                if value is not None and value.startswith("error: "):
                    raise DataError(value.removeprefix("error: "))
                if value is not None and k == key:
                    return value
            waited = time.monotonic() - start
            if waited > self.timeout_s:
                raise DataError(
                    f"data.prepare_timeout_s={self.timeout_s:g}: {self._who()} waited {waited:.0f} s for "
                    f"{who} to {what}; raise data.prepare_timeout_s, or prepare the corpus once with "
                    "python -m harness.prepare_data"
                )
            if speaks and time.monotonic() >= next_line:
                log.warning("%s: waiting for %s to %s (%d s)", self._who(), who, what, waited)
                next_line += self.progress_s
            time.sleep(self.poll_s)


def _write_probe(cache_dir: str) -> str | None:
    """Create ``<cache_dir>/.probes/<random>`` (removing probes older than a day); returns its name, or
    None when ``cache_dir`` is a directory that cannot be written (a prepared, read-only cache: usable
    as long as nothing needs preparing; a store to write then fails with its own error).

    Raises:
        DataError: ``cache_dir`` is not a usable directory (missing and not creatable, or a file).
    """
    probes = os.path.join(cache_dir, ".probes")
    name = f"{uuid.uuid4().hex}"
    try:
        os.makedirs(probes, exist_ok=True)
        now = time.time()
        for entry in os.scandir(probes):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > PROBE_MAX_AGE_S:
                    os.remove(entry.path)
        with open(os.path.join(probes, name), "w"):
            pass
    except OSError as e:
        if os.path.isdir(cache_dir) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise DataError(f"data.cache_dir={cache_dir!r} is not a usable directory: {e.strerror or e}") from e
    return name
