"""Checkpoints: atomic save, ``keep_last`` pruning, ``resume=auto`` lookup, and HF export.

Layout of ``<run>/checkpoints/step_00000100/``::

    dcp/                     parallel=none|ddp|fsdp: torch.distributed.checkpoint shards (every rank its
                             part; loading reshards, so any of the three resumes at any world size)
    model.pt, optimizer.pt   parallel=none before it wrote dcp/ (format "torch"): still resumed
    deepspeed/               parallel=deepspeed: DeepSpeed's own format
    rng/rank_<r>.pt          each rank's torch / CUDA RNG states
    tokenizer/               the tokenizer (for ``python -m harness.export``)
    trainer_state.json       step, tokens, data position, LR scheduler, early stopping, model, data, config
    manifest.json            every file with its size, SHA-256 and the rank that wrote (and hashed) it
                             -- written last

A checkpoint is written into ``.tmp-step_...`` (asynchronously: :mod:`harness.saving`) and renamed
when complete, and it counts
only when its manifest exists and every listed file has the listed size, so a crash or
kill mid-save never leaves one that looks complete. Before a resume, the chosen checkpoint's
files are also checked against their SHA-256, shared out over the ranks (each rank its
:func:`share`, at once; one gather makes the verdict every rank's); a mismatch skips it on every
rank, with one warning naming the file, for the previous one. Nothing pickled is loaded before
:func:`scan_pickles` has checked that it refers only to tensor/plain-data types (DCP metadata
and DeepSpeed files included); our own files load with ``torch.load(weights_only=True)``.

Failures at a resume: a problem seen before any model is built (:meth:`CheckpointManager.
find_resume`: incomplete, damaged, refused pickles, another model or format) is a
:class:`CheckpointError` that every rank raises alike (exit status 2); a load that fails on some
rank once the model exists (:meth:`CheckpointManager.restore`) ends every rank with status 74 and
one line naming the rank (:mod:`harness.failures`).
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness import failures
from harness.errors import CheckpointError, ConfigError
from harness.faults import Faults

if TYPE_CHECKING:
    from harness.config import CheckpointConfig

log = logging.getLogger("harness")

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str, step: int, write: dict | Callable[[str], None], state: dict, keep_last: int
) -> str:
    """Write checkpoint ``step`` atomically from one process (tools and tests; a training run saves
    through :mod:`harness.saving`, every rank its part, asynchronously).

    ``write`` is either ``{name: object}`` (each saved with ``torch.save`` as ``name.pt``) or a
    function that writes the files into the directory it is given. Then ``trainer_state.json``
    (``state``) and ``manifest.json`` (every file with its size and SHA-256), fsync, rename into
    place, and prune to ``keep_last``.

    Returns:
        The checkpoint directory.
    Raises:
        CheckpointError: the directory cannot be written (the previous checkpoints stay intact).
    """
    final = os.path.join(root, checkpoint_name(step))
    tmp = os.path.join(root, f".tmp-{checkpoint_name(step)}")
    try:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if callable(write):
            write(tmp)
        else:
            for name, obj in write.items():
                torch.save(obj, os.path.join(tmp, f"{name}.pt"))
        _finish(tmp, final, root, step, state, Faults())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}") from e
    prune(root, keep_last)
    return final


def _finish(tmp: str, final: str, root: str, step: int, state: dict, faults: Faults) -> None:
    """One process: state file, every file hashed and fsynced, then :func:`commit`."""
    with open(os.path.join(tmp, STATE), "w") as f:
        json.dump(state, f, indent=2)
    files = {}
    for dirpath, _, names in os.walk(tmp):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), tmp)
            files[rel] = {**file_entry(tmp, rel), "rank": 0}
    commit(tmp, final, root, step, files, faults)


def file_entry(directory: str, rel: str) -> dict:
    """``{"size", "sha256"}`` of ``<directory>/<rel>``, fsynced first (its manifest entry)."""
    path = os.path.join(directory, rel)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": os.path.getsize(path), "sha256": _sha256(path)}


def commit(tmp: str, final: str, root: str, step: int, files: dict[str, dict], faults: Faults) -> None:
    """Make ``tmp`` the complete checkpoint ``final``: files that ``files`` does not list (left by an
    earlier attempt at the same step) removed, ``manifest.json`` (``{"step", "files"}``) written last
    and fsynced, then renamed into place (replacing ``final`` if it exists). ``files``' own entries
    must already be on disk (fsynced)."""
    for dirpath, _, names in os.walk(tmp):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.relpath(path, tmp) not in files:
                os.remove(path)
    faults.on_checkpoint(step)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"step": step, "files": dict(sorted(files.items()))}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # same step saved again (e.g. a resumed run's final save)
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_files(path: str) -> dict[str, dict]:
    with open(os.path.join(path, MANIFEST)) as f:
        files = json.load(f)["files"]
    return {
        n: (v if isinstance(v, dict) else {"size": v}) for n, v in files.items()
    }  # old manifests: sizes only


def _complete_files(path: str) -> dict[str, dict] | None:
    """The manifest's files when ``path`` is complete (see :func:`is_complete`), else None."""
    try:
        files = _manifest_files(path)
        if all(os.path.getsize(os.path.join(path, n)) == v["size"] for n, v in files.items()):
            return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def is_complete(path: str) -> bool:
    """True when ``path`` has a manifest and every file it lists has the listed size (cheap: one
    ``stat`` per file; see :func:`verify`)."""
    return _complete_files(path) is not None


# What this process hashed in verify / the resume check: (file, bytes), for tests and benchmarks.
HASHED: list[tuple[str, int]] = []


def _check_files(path: str, files: dict[str, dict], names) -> str | None:
    """Size and SHA-256 of ``names`` (manifest entries ``files``) under ``path``: None, or what is wrong."""
    count = total = 0
    for name in names:
        v, full = files[name], os.path.join(path, name)
        try:
            if not os.path.isfile(full):
                return f"{name} is missing"
            size = os.path.getsize(full)
            if size != v.get("size"):
                return f"{name} has {size} bytes, the manifest says {v.get('size')}"
            if "sha256" in v:
                HASHED.append((full, size))
                count, total = count + 1, total + size
                if _sha256(full) != v["sha256"]:
                    return f"{name} does not match its SHA-256 in the manifest"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    log.debug("hashed %d files (%d bytes) of %s", count, total, path)
    return None


def verify(path: str) -> str | None:
    """Check every file of checkpoint ``path`` against its manifest (size and SHA-256), in this process
    (a resume shares the files out over the ranks: :meth:`CheckpointManager.find_resume`).

    Returns:
        None when intact, else what is wrong (naming the file).
    """
    try:
        files = _manifest_files(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no readable {MANIFEST}"
    return _check_files(path, files, files)


def share(files: dict[str, dict], rank: int, world_size: int) -> list[str]:
    """The manifest entries ``files`` that ``rank`` of ``world_size`` checks at a resume, sorted.

    When every entry names its writer (``"rank"``) and the writers are exactly ranks ``0 ..
    world_size-1`` (the checkpoint was written at this world size: every rank writes at least its RNG
    file), a rank checks the files it wrote, the ones it reads back. Otherwise (another world size, a
    manifest without writers) the files are dealt out by size, largest first, each to the rank with
    the fewest bytes so far (lowest rank on a tie): the same answer on every rank. The shares of all
    ranks are disjoint and cover ``files``.
    """
    writers = {v.get("rank") for v in files.values()}
    if writers == set(range(world_size)):
        return sorted(n for n, v in files.items() if v["rank"] == rank)
    loads = [(0, r) for r in range(world_size)]  # a heap of (bytes so far, rank)
    mine = []
    for name in sorted(files, key=lambda n: (-int(files[n].get("size") or 0), n)):
        load, r = heapq.heappop(loads)
        if r == rank:
            mine.append(name)
        heapq.heappush(loads, (load + int(files[name].get("size") or 0), r))
    return sorted(mine)


@dataclass(frozen=True)
class Peers:
    """The ranks that resume together: this rank, their number, and two collectives over all of them
    (:meth:`harness.parallel.base.Backend.gather_object` / ``broadcast_object``). The default is one
    process alone."""

    rank: int = 0
    world_size: int = 1
    gather: Callable[[object], list] = lambda obj: [obj]  # every rank's object, in rank order
    broadcast: Callable[[object], object] = lambda obj: obj  # rank 0's object

    def from_rank0(self, fn: Callable[[], object], what: str):
        """``fn()`` run on rank 0 only, its result on every rank.

        Raises:
            CheckpointError: ``fn`` raised on rank 0 (on every rank, naming ``what``; the others would
                otherwise wait for rank 0 until the process group's timeout).
        """
        out = None
        if self.rank == 0:
            try:
                out = ("ok", fn())
            except Exception as e:  # noqa: BLE001
                out = ("error", f"cannot read {what}: {getattr(e, 'strerror', None) or e}")
        out = self.broadcast(out)
        if out[0] == "error":
            raise CheckpointError(out[1])
        return out[1]


ALONE = Peers()


def _verdict(path: str, files: dict[str, dict], peers: Peers, pickles: bool) -> tuple[str | None, str | None]:
    """This rank's share of checkpoint ``path``: ``(damage, refusal)`` -- what :func:`verify` would say
    about the share, and (with ``pickles``, when intact) :func:`scan_pickles`'s refusal."""
    names = share(files, peers.rank, peers.world_size)
    try:
        damage = _check_files(path, files, names)
        if damage is None and pickles:
            scan_pickles(path, names + (_unlisted(path, files) if peers.rank == 0 else []))
    except CheckpointError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001  (one rank's surprise must not leave the others waiting)
        return f"cannot be checked on rank {peers.rank} ({type(e).__name__}: {e})", None
    return damage, None


def _unlisted(path: str, files: dict[str, dict]) -> list[str]:
    """Files under ``path`` that its manifest does not list (besides the manifest)."""
    walked = (os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns)
    return sorted(n for n in walked if n not in files and n != MANIFEST)


def _agreed(path: str, files: dict[str, dict], peers: Peers, pickles: bool) -> tuple[str | None, str | None]:
    """Every rank checks its :func:`share` of ``path`` at once; one gather makes the verdict every
    rank's: ``(damage, refusal)``, the lowest rank's of each (None when no rank found any)."""
    verdicts = peers.gather(_verdict(path, files, peers, pickles))
    damage = next((d for d, _ in verdicts if d), None)
    refusal = next((r for _, r in verdicts if r), None)
    return damage, refusal


def _newest_intact(found: list, peers: Peers, pickles: bool = False) -> tuple[str | None, str | None]:
    """Of ``found`` (``(step, path, files)``, oldest first) the newest that every rank's share finds
    intact, and :func:`scan_pickles`'s refusal for it (None: none). A damaged one is skipped with one
    warning (rank 0) naming it and the file."""
    for _, path, files in reversed(found):
        damage, refusal = _agreed(path, files, peers, pickles)
        if damage is None:
            return path, refusal
        if peers.rank == 0:
            log.warning("skipping damaged checkpoint %s: %s; trying the previous one", path, damage)
    return None, None


# Globals that checkpoint pickles may name (torch's weights-only set covers our own files).
_DCP_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
}
_DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` refusing any global outside its dataclasses, torch dtypes and paths."""

    def find_class(self, module: str, name: str):
        ok = (module, name) in _DCP_GLOBALS or module == "torch.distributed.checkpoint.metadata"
        if module == "torch" and isinstance(getattr(__import__("torch"), name, None), torch.dtype):
            ok = True
        if not ok:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def scan_pickles(path: str, names=None) -> None:
    """Refuse a checkpoint whose pickled files name anything but tensors and plain data.

    torch zip files (``*.pt``) are checked with ``torch.serialization.get_unsafe_globals_in_checkpoint``
    (allowing the few DeepSpeed classes its optimizer states hold); DCP ``.metadata`` is unpickled with
    an allow-list. Nothing is executed. ``names`` (paths relative to ``path``, e.g. a rank's
    :func:`share` of the manifest) limits the scan to them; default: every file under ``path``.

    Raises:
        CheckpointError: naming the file and the refused global.
    """
    if names is None:
        names = [os.path.relpath(os.path.join(d, n), path) for d, _, ns in os.walk(path) for n in ns]
    for rel in names:
        full, name = os.path.join(path, rel), os.path.basename(rel)
        try:
            if name == ".metadata":
                with open(full, "rb") as f:
                    _MetadataUnpickler(f).load()
            elif name.endswith(".pt") or zipfile.is_zipfile(full) and name.endswith((".pth", ".bin")):
                bad = [
                    g
                    for g in torch.serialization.get_unsafe_globals_in_checkpoint(full)
                    if g not in _DEEPSPEED_GLOBALS
                ]
                if bad:
                    raise pickle.UnpicklingError(f"refusing global {bad[0]}")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
            detail = " ".join(str(e).split())[:160]
            what = (
                "holds pickled objects other than tensors and plain data"
                if "refusing global" in detail
                else "is not a readable checkpoint file"
            )
            raise CheckpointError(
                f"checkpoint {path}: {os.path.relpath(full, path)} {what} ({detail}); it is never "
                "loaded. "
                "Delete it or set checkpoint.resume to another checkpoint"
            ) from e


def _complete(root: str) -> list[tuple[int, str, dict]]:
    """Complete checkpoints under ``root`` as ``(step, path, manifest files)``, oldest first; incomplete
    ones are skipped with a warning naming them."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        m = _NAME.match(name)
        if not m:
            continue
        path = os.path.join(root, name)
        files = _complete_files(path)
        if files is not None:
            out.append((int(m.group(1)), path, files))
        elif path not in _warned:
            _warned.add(path)
            log.warning("skipping incomplete checkpoint %s (no manifest or a file of the wrong size)", path)
    return out


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first; incomplete ones are
    skipped with a warning naming them."""
    return [(step, path) for step, path, _ in _complete(root)]


_warned: set[str] = set()


def checkpoint_dirs(root: str) -> list[str]:
    """Every ``step_*`` directory under ``root``, complete or not, oldest first."""
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if _NAME.match(n)]


def latest_checkpoint(root: str, check: bool = False, peers: Peers = ALONE) -> str | None:
    """The newest complete checkpoint under ``root``, or None.

    Rank 0 of ``peers`` lists and ``stat``-s the checkpoints, the others get its list. With ``check``,
    each candidate (newest first) is also verified (size and SHA-256), every rank its :func:`share` of
    the files at once, and the ranks agree (one gather): a file damaged on any rank's share skips the
    checkpoint on every rank, with one warning naming it and the file, and the previous one is taken.
    """
    found = peers.from_rank0(lambda: _complete(root), f"the checkpoints in {root}")
    if not check:
        return found[-1][1] if found else None
    return _newest_intact(found, peers)[0]


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temporaries."""
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def read_state(path: str) -> dict:
    """The ``trainer_state.json`` of a complete checkpoint."""
    with open(os.path.join(path, STATE)) as f:
        return json.load(f)


def load_checkpoint(path: str, names: tuple[str, ...] = ("model", "optimizer")) -> tuple[dict, dict]:
    """Load a complete checkpoint: ``({name: object}, trainer_state)``.

    Tensors are loaded with ``weights_only=True`` onto the CPU, so no pickled code runs.

    Raises:
        CheckpointError: the checkpoint is incomplete or unreadable.
    """
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint.resume: {path} is not a complete checkpoint (no {MANIFEST} or wrong sizes)"
        )
    try:
        objs = {
            n: torch.load(os.path.join(path, f"{n}.pt"), map_location="cpu", weights_only=True) for n in names
        }
        with open(os.path.join(path, STATE)) as f:
            state = json.load(f)
    except Exception as e:
        raise unreadable(path, e) from e
    return objs, state


def unreadable(path: str, e: Exception) -> CheckpointError:
    """The one-line error for a checkpoint whose files cannot be loaded, with what to do."""
    detail = " ".join(str(e).split())[:200]
    if isinstance(e, pickle.UnpicklingError):  # weights_only refused something that is not tensors/plain data
        detail = "it holds pickled objects other than tensors and plain data, which are never loaded"
    return CheckpointError(
        f"cannot load checkpoint {path} ({type(e).__name__}: {detail}); it may be corrupted: delete it to "
        "resume from the previous one, or set checkpoint.resume to another checkpoint"
    )


def check_export_target(path: str, overwrite: bool) -> str:
    """The normalized export directory (a trailing ``/`` is fine); call before any work.

    Raises:
        CheckpointError: ``path`` is a file, or a non-empty directory without ``overwrite``.
    """
    target = os.path.normpath(os.path.expanduser(path))
    if os.path.isfile(target):
        raise CheckpointError(f"export target {path!r} is a file; give a directory")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise CheckpointError(
            f"export target {path!r} is not empty; choose a new directory or pass --overwrite to replace it"
        )
    return target


def export_hf(model: torch.nn.Module, tokenizer, path: str, overwrite: bool = True) -> str:
    """Save the model and tokenizer with ``save_pretrained`` into ``path`` (atomically replaced).

    The files are written into a sibling temporary directory and renamed into place, so ``path``
    is either the old export or the whole new one. ``path`` may end in ``/`` and may be an empty
    directory; a non-empty one is replaced only with ``overwrite``.
    Reload with ``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        CheckpointError: see :func:`check_export_target`.
    """
    target = check_export_target(path, overwrite)
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = None
    if os.path.exists(target):
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return target


# parallel.name of checkpoints written before the format was recorded -> their format
_LEGACY_FORMATS = {"none": "torch", "ddp": "dcp", "fsdp": "dcp", "deepspeed": "deepspeed"}
_TITLES = {"deepspeed": "DeepSpeed"}


class CheckpointManager:
    """A run's checkpoints: which one to resume from (checked before any model exists), save
    (atomic, every rank its part, RNG states, tokenizer, ``keep_last``), and restore.

    ``identity`` holds what a checkpoint must match to be resumed by this run (``model`` shape,
    ``data`` corpus/tokenizer/seq_len); a mismatch is refused naming the keys, except the
    ``section.key`` names in ``unchecked`` (still written into every checkpoint).
    """

    def __init__(
        self, cfg: CheckpointConfig, run_dir: str, env, backend, identity: dict, faults: Faults, unchecked=()
    ):
        self.cfg, self.run_dir, self.env, self.backend = cfg, run_dir, env, backend
        self.identity, self.faults, self.unchecked = identity, faults, set(unchecked)
        self.root = os.path.join(run_dir, "checkpoints")
        self.peers, self.resume_state = ALONE, None  # set by find_resume
        self._saved: dict[str, dict | None] = {}  # checkpoint -> trainer_state.json, as rank 0 read it
        self.saver = None  # harness.saving.Saver, made at the first save

    @classmethod
    def from_config(
        cls,
        cfg: CheckpointConfig,
        run_dir: str,
        env,
        backend,
        identity: dict,
        faults: Faults | None = None,
        unchecked=(),
    ) -> CheckpointManager:
        return cls(cfg, run_dir, env, backend, identity, faults or Faults(), unchecked)

    # -- choosing the checkpoint to resume from (no model needed) ---------------------------------

    def find_resume(self) -> str | None:
        """The checkpoint to resume from (or None), checked against this run's model, data and backend.

        ``checkpoint.resume`` is ``auto`` (the newest intact checkpoint of this run, if any), ``never``,
        a checkpoint directory, or a run directory (its newest intact checkpoint). Called on every rank
        at once, after the process group exists, before any model: rank 0 lists the checkpoints
        (``stat`` of every file: complete or not) and reads their ``trainer_state.json``, the others
        get that; then every rank hashes and scans (:func:`scan_pickles`) only its :func:`share` of the
        candidate's files, and one gather makes the verdict every rank's (rank 0 also scans files the
        manifest does not list). Every rank returns the same path, or raises the same error; the
        saved state is :attr:`resume_state`.

        Raises:
            ConfigError / CheckpointError (exit status 2, bad input found before any model is built):
                ``never`` over existing checkpoints, a path that is not a complete checkpoint, a damaged
                one (``resume=<path>``), none intact under ``auto``, pickled objects other than tensors,
                an unreadable ``trainer_state.json``, or one of another model, corpus or backend format.
        """
        self.resume_state = None
        path = self._resume_path(self.cfg.resume)
        if path is None:
            return None
        saved = self._saved.get(path)
        if saved is None:
            raise CheckpointError(
                f"checkpoint {path}: {STATE} is not readable JSON; choose another checkpoint"
            )
        self._check_format(path, saved)
        self._check_identity(path, saved)
        self.resume_state = copy.deepcopy(saved)
        return path

    def _peers(self) -> Peers:
        backend = self.backend
        if getattr(self.env, "world_size", 1) == 1 or not hasattr(backend, "gather_object"):
            return ALONE
        return Peers(self.env.rank, self.env.world_size, backend.gather_object, backend.broadcast_object)

    def _scan(self, root: str) -> tuple[list, list[str]]:
        """On rank 0 of every rank: the complete checkpoints under ``root`` (``(step, path, files)``),
        every ``step_*`` directory, and the saved states (kept in ``_saved``)."""

        def scan():
            found = _complete(root)
            return found, checkpoint_dirs(root), {p: _read_state_or_none(p) for _, p, _ in found}

        found, dirs, saved = self.peers.from_rank0(scan, f"the checkpoints in {root}")
        self._saved.update(saved)
        return found, dirs

    def _resume_path(self, resume: str) -> str | None:
        self.peers, self._saved = self._peers(), {}
        if resume == "never":
            existing, _ = self._scan(self.root)
            if existing:
                raise ConfigError(
                    f"checkpoint.resume=never, but {self.root} already holds checkpoints (up to step "
                    f"{existing[-1][0]}); set checkpoint.resume=auto to continue that run, or pick a new "
                    "run_name "
                    "/ hydra.run.dir"
                )
            return None
        if resume == "auto":
            found, dirs = self._scan(self.root)
            path, refusal = _newest_intact(found, self.peers, pickles=True)  # damaged: the previous
            if path is None and dirs:  # never silently start over on top of a run's history
                raise CheckpointError(
                    f"{self.root} holds {len(dirs)} checkpoint(s) (newest "
                    f"{os.path.basename(dirs[-1])}) but "
                    "none is complete and intact (see the warnings); move them away to start over, or set "
                    "checkpoint.resume to a good checkpoint"
                )
            if refusal:
                raise CheckpointError(refusal)
            return path
        path = os.path.expanduser(resume)
        found, files, saved = self.peers.from_rank0(lambda: self._look(path), resume)
        self._saved.update(saved)
        if found:  # a run directory: its newest intact checkpoint
            newest, refusal = _newest_intact(found, self.peers, pickles=True)
            if refusal:
                raise CheckpointError(refusal)
            if newest:
                return newest
        if files is None:
            raise CheckpointError(
                f"checkpoint.resume={resume!r} is not auto, never, or a complete checkpoint directory "
                "(runs/<run_name>/checkpoints/step_NNNNNNNN, or a run directory)"
            )
        damage, refusal = _agreed(path, files, self.peers, pickles=True)
        if damage:
            raise CheckpointError(
                f"checkpoint.resume: {path} is damaged ({damage}); choose another checkpoint"
            )
        if refusal:
            raise CheckpointError(refusal)
        return path

    @staticmethod
    def _look(path: str) -> tuple[list, dict | None, dict]:
        """Rank 0, for ``checkpoint.resume=<path>``: the complete checkpoints of ``path/checkpoints``
        (a run directory; else ``[]``), ``path``'s own manifest files when it is a complete checkpoint
        (else None), and the saved states of all of them."""
        root = os.path.join(path, "checkpoints")
        found = _complete(root) if os.path.isdir(root) else []
        files = _complete_files(path)
        paths = [p for _, p, _ in found] + ([path] if files is not None else [])
        return found, files, {p: _read_state_or_none(p) for p in paths}

    def _check_format(self, path: str, saved: dict) -> None:
        """The checkpoint's weights format must be the one this backend reads (and, for a backend that
        cannot reshard, written at this world size)."""
        was = saved.get("parallel", "none")
        fmt = saved.get("format", _LEGACY_FORMATS.get(was))
        name = self.backend.name
        readable = (self.backend.checkpoint_format, *getattr(self.backend, "legacy_formats", ()))
        if fmt not in readable:
            raise CheckpointError(
                f"checkpoint {path} was written by parallel={was}, which parallel={name} cannot load ({fmt} "
                f"format); for a new run give it a new name (run_name=<new name>, or hydra.run.dir), to "
                f"continue this one resume with parallel={was}, or export it (python -m harness.export "
                f"{path} OUT) and start a new run from it"
            )
        if not self.backend.reshardable and saved.get("world_size") != self.env.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {_TITLES.get(was, 'parallel=' + was)} at world size "
                f"{saved.get('world_size')}, and its checkpoints resume only at that world size (now "
                f"{self.env.world_size}); relaunch with that many "
                "processes, or export it with python -m harness.export"
            )

    def _check_identity(self, path: str, saved: dict) -> None:
        fixes = {
            "model": "the model config that wrote it",
            "data": "the corpus, tokenizer and data.seq_len it was trained on",
        }
        for section, now in self.identity.items():
            before = saved.get(section, {})
            diff = {
                k: (before.get(k), v)
                for k, v in now.items()
                if before.get(k) != v and k != "name" and f"{section}.{k}" not in self.unchecked
            }
            if diff:
                fix = fixes[section]
                if "sources" in diff:
                    fix += " (or data.allow_mixture_change=true to continue with the new sources)"
                shown = ", ".join(
                    f"{section}.{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items())
                )
                raise CheckpointError(
                    f"checkpoint {path} was written with a different {section} ({shown}); use a new run_name "
                    "/ "
                    f"hydra.run.dir, or {fix}"
                )

    # -- save and restore --------------------------------------------------------------------------

    def save(self, step: int, meta: dict, tokenizer) -> str:
        """Write checkpoint ``step`` on every rank: the backend's model/optimizer part, this rank's RNG
        states, the tokenizer (rank 0) and ``meta`` (``trainer_state.json``). Returns its directory,
        complete once :meth:`wait` returns (at once when the save is synchronous); see
        :mod:`harness.saving`. A failure on any rank ends every rank (status 74)."""
        meta = {
            **meta,
            "format": self.backend.checkpoint_format,
            "parallel": self.backend.name,
            "world_size": self.env.world_size,
            "mesh": {d: getattr(self.backend.dims, d) for d in ("dp_replicate", "dp_shard", "tp")},
            **self.identity,
        }
        if self.saver is None:
            from harness.saving import Saver

            self.saver = Saver.from_config(self.cfg, self.root, self.env, self.backend, self.faults)
        return self.saver.save(step, meta, tokenizer)

    def wait(self, timeout_s: float | None = None) -> None:
        """Wait until the save in flight (if any) is complete on every rank (at most ``timeout_s``)."""
        if self.saver is not None:
            self.saver.wait(timeout_s)

    def restore(self, path: str, apply: Callable[[dict], None] | None = None) -> dict:
        """Load the backend's model/optimizer state and this rank's RNG states, then ``apply(state)``
        (the trainer's own state); returns ``trainer_state.json`` (as :meth:`find_resume` read it).

        Every rank calls it with the model built. A failure here on any rank -- ``OSError``,
        torch.distributed.checkpoint's ``CheckpointException`` (a ``BaseException``), an unreadable or
        mismatched file, an error applying the state -- is a load that failed on that rank while the
        others may wait in the backend's collectives: it ends every rank with exit status 74 and one
        ``error:`` line naming the rank, host and path (:func:`harness.failures.fail`; world size 1:
        the same line and status). Nothing here raises.
        """
        meta = copy.deepcopy(self._saved[path]) if path in getattr(self, "_saved", {}) else None
        try:
            if meta is None:
                meta = read_state(path)
            if self.faults is not None:
                self.faults.on_load(int(meta.get("step", -1)))
            self.backend.load(path)
            rng_path = os.path.join(path, "rng", f"rank_{self.env.rank}.pt")
            if os.path.isfile(rng_path):  # absent when resuming at a larger world size
                set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
            if apply is not None:
                apply(meta)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  (CheckpointException derives from BaseException)
            failures.fail(failures.describe(self.env.rank, "checkpoint load", path, e), e)
        return meta


def _read_state_or_none(path: str) -> dict | None:
    """``trainer_state.json`` of ``path``, or None when it cannot be read as a JSON object."""
    try:
        state = read_state(path)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def rng_state() -> dict:
    """This process's torch (and CUDA) RNG states."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
