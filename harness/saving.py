"""Checkpoint saves that block training only while the state is copied, completed without a collective.

One save of step N, the ``n``-th of this process (:meth:`Saver.save`, on every rank, in the training
thread, inside ``phases.phase("checkpoint")``):

1. wait for the save in flight, if any: at most one (its ``complete`` key, below);
2. make ``<root>/.tmp-step_N/``, remove what an earlier attempt at the same step left of this rank's
   files, take this rank's RNG states (rank 0 also ``trainer_state.json``, as text);
3. stage: with ``checkpoint.async_save`` and a backend that supports it (DCP: ``parallel=none|ddp|
   fsdp``), ``Backend.save_async`` copies this rank's model and optimizer state into CPU memory and
   hands the write to DCP's background thread -- training resumes here; otherwise (``async_save=false``,
   DeepSpeed) ``Backend.save`` writes the files now;
4. this rank's background thread waits for the write, writes ``rng/rank_<r>.pt`` (rank 0 also the
   tokenizer), then fsyncs and hashes (SHA-256) exactly the files this rank wrote, publishes
   ``{relpath: {size, sha256}}`` under ``harness/ckpt/<n>/rank_<r>`` in the job store and counts itself
   in ``harness/ckpt/<n>/written``; the rank whose count makes ``world_size`` sets ``harness/ckpt/<n>/all``;
5. rank 0's thread waits for ``all`` (polling; it gives up when ``harness.failures``' key appears),
   reads every rank's entries in one ``multi_get``, writes ``trainer_state.json``, merges the manifest
   (each entry with the ``rank`` that wrote it), writes it last, fsyncs, renames the directory into
   place, prunes to ``keep_last`` and sets ``harness/ckpt/<n>/complete``.

A synchronous save waits for ``complete`` before it returns; a stop, a preemption and the end of the
run wait for the save in flight (:meth:`Saver.wait`). Any failure of a rank's part (``OSError``, DCP's
``CheckpointException``, a full disk), in either thread, is :func:`harness.failures.fail`: every rank
exits with status 74, one ``error:`` line names the failing rank, its host and the checkpoint, and the
``.tmp-`` directory is never renamed (the previous checkpoint stays the newest complete one).

Store operations per save: each rank ``set``, ``add``, one ``wait`` per ``poll_s`` until ``complete``
and ``delete_key`` of its entry (rank 0 waits in its own thread instead); rank 0 also one
``multi_get`` of ``world_size`` keys, ``set`` of ``complete`` and three ``delete_key`` (the
``written``/``all`` counters and the previous save's ``complete``), plus a ``wait`` and a ``check`` per
``poll_s`` while the slowest rank writes (``poll_s``: :func:`harness.failures.poll_interval`, 1 s up to
500 ranks). The count does not grow with the world size; the ``multi_get``'s bytes do (one entry per
file).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import threading
import time

import torch
from torch.distributed.checkpoint.api import CheckpointException

from harness import failures, phases
from harness.checkpoint import (
    MANIFEST,
    STATE,
    checkpoint_name,
    commit,
    file_entry,
    prune,
    rng_state,
)

log = logging.getLogger("harness")
ANNOUNCE_WAIT_S = 30.0  # for the line of a rank that DCP says failed, before naming it ourselves


def _store(env, timeout_s: float):
    """The job's key-value store (every rank reaches it), or an in-process one for one process."""
    import torch.distributed as dist

    from harness.dist import job_store

    if env.world_size == 1:
        return dist.HashStore()
    store = job_store(timeout_s)
    if store is None:
        raise RuntimeError("no job store: checkpoints of several processes need torchrun or a process group")
    return store


def _wait_key(store, key: str, poll_s: float) -> bool:
    """Wait up to ``poll_s`` for ``key`` (the store answers as soon as it is set); True when it is there."""
    try:
        store.wait([key], datetime.timedelta(seconds=poll_s))
        return True
    except RuntimeError:  # DistStoreError: not yet
        return False


class Saver:
    """A run's checkpoint saves (see the module docstring); one per process, made at the first save."""

    def __init__(self, root: str, env, backend, faults, keep_last: int, async_save: bool, store=None):
        self.root, self.env, self.backend, self.faults, self.keep_last = root, env, backend, faults, keep_last
        self.use_async = async_save and backend.async_save
        self.store = store if store is not None else _store(env, backend.cfg.timeout_s)
        self.poll_s = failures.poll_interval(env.world_size)  # between checks for a failed rank, waiting
        self.n = 0  # saves made by this process: the same sequence on every rank
        self.inflight: _Save | None = None
        self.stalls: list[tuple[int, float]] = []  # (step, seconds the training thread was blocked)

    @classmethod
    def from_config(cls, cfg, root: str, env, backend, faults) -> Saver:
        """``checkpoint.keep_last`` and ``checkpoint.async_save`` (ignored, with one line, where the
        backend saves synchronously: DeepSpeed)."""
        if cfg.async_save and not backend.async_save and env.is_main:
            log.info("checkpoint.async_save: parallel=%s saves synchronously (training waits)", backend.name)
        return cls(root, env, backend, faults, cfg.keep_last, cfg.async_save)

    def save(self, step: int, state: dict, tokenizer) -> str:
        """Start checkpoint ``step`` (every rank); returns its final directory. Asynchronous: returns
        once the state is staged; synchronous: once the checkpoint is complete."""
        with phases.phase("checkpoint"):
            t0 = time.perf_counter()
            self.wait()
            job = _Save(self, self.n, step, json.dumps(state, indent=2), tokenizer)
            job.waited_s = time.perf_counter() - t0
            self.n += 1
            try:
                job.stage()
            except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
                self.fail(job, e)
            job.stall_s = time.perf_counter() - t0
            job.start()
            self.inflight = job
            if not self.use_async:
                self.wait()
                job.stall_s = time.perf_counter() - t0
                log.info("checkpoint: %s (training blocked %.3f s)", job.final, job.stall_s)
            self.stalls.append((step, job.stall_s))
        return job.final

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait until the save in flight (if any) is complete on every rank (its ``complete`` key).
        With ``timeout_s`` (a run ending on an error) give up after that long, with a warning: the
        save stays unfinished and the previous checkpoint the newest complete one."""
        job, self.inflight = self.inflight, None
        if job is None:
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with phases.phase("checkpoint"):
            job.thread.join(timeout_s)
            while self.env.rank != 0 and not _wait_key(self.store, f"{job.key}/complete", self.poll_s):
                failures.leave_if_announced()
                if deadline is not None and time.monotonic() > deadline:
                    break
            if job.thread.is_alive() or not (job.completed or self.store.check([f"{job.key}/complete"])):
                failures.leave_if_announced()  # the finisher gave up: a rank announced a failure
                log.warning(
                    "checkpoint %s was not completed (the previous checkpoint stays the newest)", job.final
                )
                return
            self.store.delete_key(f"{job.key}/rank_{self.env.rank}")

    def fail(self, job: _Save, e: BaseException) -> None:
        """End every rank on this rank's failure (never returns). A DCP ``CheckpointException`` that
        names only other ranks is theirs to announce (with their host and error): wait for that."""
        rank, error = self.env.rank, e
        failed = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failed, dict) and failed:
            if rank not in failed:
                deadline = time.monotonic() + ANNOUNCE_WAIT_S
                while time.monotonic() < deadline:
                    failures.leave_if_announced()
                    time.sleep(self.poll_s)
                other = min(failed)
                line = failures.describe(other, "checkpoint save", job.final, _unwrap(failed[other]), "?")
                failures.fail(f"{line} (seen by rank {rank})", e)
            error = _unwrap(failed[rank])
        failures.fail(failures.describe(rank, "checkpoint save", job.final, error), error)


def _unwrap(wrapped) -> BaseException:
    """DCP wraps a rank's exception as ``(exception, traceback)``."""
    return wrapped[0] if isinstance(wrapped, tuple) else wrapped


class _Save:
    """One save on this rank: staged by the training thread, finished by its own thread."""

    def __init__(self, saver: Saver, n: int, step: int, state_json: str, tokenizer):
        self.saver, self.n, self.step, self.state_json, self.tokenizer = saver, n, step, state_json, tokenizer
        self.final = os.path.join(saver.root, checkpoint_name(step))
        self.tmp = os.path.join(saver.root, f".tmp-{checkpoint_name(step)}")
        self.key = f"harness/ckpt/{n}"
        self.rank = saver.env.rank
        self.future = None
        self.thread: threading.Thread | None = None
        self.completed = False
        self.stall_s = self.waited_s = 0.0
        self.started = time.perf_counter()

    def stage(self) -> None:
        """Training thread: directory, stale files, RNG states, then the backend's staging (or write)."""
        os.makedirs(os.path.join(self.tmp, "rng"), exist_ok=True)
        self._remove_stale()
        self.rng = rng_state()
        self.saver.faults.on_checkpoint_stage(self.step)
        if self.saver.use_async:
            self.future = self.saver.backend.save_async(self.tmp)
        else:
            self.saver.backend.save(self.tmp)

    def _remove_stale(self) -> None:
        """What an earlier attempt at this step (killed mid-save) left of this rank's files."""
        try:
            stale = self.saver.backend.written_files(self.tmp)
        except FileNotFoundError:
            stale = []
        stale.append(os.path.join("rng", f"rank_{self.rank}.pt"))
        if self.rank == 0:
            stale += [STATE, MANIFEST]
            shutil.rmtree(os.path.join(self.tmp, "tokenizer"), ignore_errors=True)
        for rel in stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.tmp, rel))

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="harness-checkpoint", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            files = self._write()
            self._publish(files)
            if self.rank == 0:
                self._finish()
        except BaseException as e:  # noqa: BLE001  (CheckpointException derives from BaseException)
            self.saver.fail(self, e)

    def _write(self) -> dict[str, dict]:
        """Background: the rest of this rank's files, then each one's size and SHA-256 (fsynced)."""
        if self.future is not None:
            self.future.result()
        rel = [os.path.join("rng", f"rank_{self.rank}.pt")]
        torch.save(self.rng, os.path.join(self.tmp, rel[0]))
        if self.rank == 0:
            directory = os.path.join(self.tmp, "tokenizer")
            self.tokenizer.save_pretrained(directory)
            for dirpath, _, names in os.walk(directory):
                rel += [os.path.relpath(os.path.join(dirpath, n), self.tmp) for n in names]
        self.saver.faults.on_checkpoint_written(self.step)
        rel += self.saver.backend.written_files(self.tmp)
        return {r: file_entry(self.tmp, r) for r in rel}

    def _publish(self, files: dict[str, dict]) -> None:
        store, world = self.saver.store, self.saver.env.world_size
        store.set(f"{self.key}/rank_{self.rank}", json.dumps(files))
        if store.add(f"{self.key}/written", 1) == world:
            store.set(f"{self.key}/all", "1")

    def _finish(self) -> None:
        """Rank 0's thread: every rank's entries, the state file, the manifest, rename, prune, complete."""
        saver, store = self.saver, self.saver.store
        while not _wait_key(store, f"{self.key}/all", saver.poll_s):
            if store.check([failures.KEY]):
                return  # another rank failed: the failure watch ends this process
        world = saver.env.world_size
        values = store.multi_get([f"{self.key}/rank_{r}" for r in range(world)])
        files = {
            rel: {**entry, "rank": r} for r, v in enumerate(values) for rel, entry in json.loads(v).items()
        }
        with open(os.path.join(self.tmp, STATE), "w") as f:
            f.write(self.state_json)
        files[STATE] = {**file_entry(self.tmp, STATE), "rank": 0}
        commit(self.tmp, self.final, saver.root, self.step, files, saver.faults)
        prune(saver.root, saver.keep_last)
        store.set(f"{self.key}/complete", "1")
        for key in (f"{self.key}/written", f"{self.key}/all", f"harness/ckpt/{self.n - 1}/complete"):
            store.delete_key(key)
        self.completed = True
        if saver.use_async:
            log.info(
                "checkpoint: %s (training blocked %.3f s, %.3f s of it waiting for the previous save; "
                "written in %.2f s in the background)",
                self.final,
                self.stall_s,
                self.waited_s,
                time.perf_counter() - self.started,
            )
