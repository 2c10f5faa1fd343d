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
files are also checked against their SHA-256 (:func:`verify`); a mismatch skips it, with a
warning naming the file, for the previous one. Nothing pickled is loaded before
:func:`scan_pickles` has checked that it refers only to tensor/plain-data types (DCP metadata
and DeepSpeed files included); our own files load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

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


def is_complete(path: str) -> bool:
    """True when ``path`` has a manifest and every file it lists has the listed size (cheap; see
    :func:`verify`)."""
    try:
        return all(
            os.path.getsize(os.path.join(path, n)) == v["size"] for n, v in _manifest_files(path).items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify(path: str) -> str | None:
    """Check every file of checkpoint ``path`` against its manifest (size and SHA-256).

    Returns:
        None when intact, else what is wrong (naming the file).
    """
    try:
        files = _manifest_files(path)
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST}"
    for name, v in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != v.get("size"):
            return f"{name} has {os.path.getsize(full)} bytes, the manifest says {v.get('size')}"
        if "sha256" in v and _sha256(full) != v["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


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


def scan_pickles(path: str) -> None:
    """Refuse a checkpoint whose pickled files name anything but tensors and plain data.

    torch zip files (``*.pt``) are checked with ``torch.serialization.get_unsafe_globals_in_checkpoint``
    (allowing the few DeepSpeed classes its optimizer states hold); DCP ``.metadata`` is unpickled with
    an allow-list. Nothing is executed. Raises:
        CheckpointError: naming the file and the refused global.
    """
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
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


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first; incomplete ones are
    skipped with a warning naming them."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        m = _NAME.match(name)
        if not m:
            continue
        path = os.path.join(root, name)
        if is_complete(path):
            out.append((int(m.group(1)), path))
        elif path not in _warned:
            _warned.add(path)
            log.warning("skipping incomplete checkpoint %s (no manifest or a file of the wrong size)", path)
    return out


_warned: set[str] = set()


def checkpoint_dirs(root: str) -> list[str]:
    """Every ``step_*`` directory under ``root``, complete or not, oldest first."""
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if _NAME.match(n)]


def latest_checkpoint(root: str, check: bool = False) -> str | None:
    """The newest complete checkpoint under ``root``, or None.

    With ``check``, each candidate (newest first) is also :func:`verify`-ed; a damaged one is skipped
    with a warning naming it and the file, and the previous one is taken.
    """
    for _, path in reversed(list_checkpoints(root)):
        problem = verify(path) if check else None
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s; trying the previous one", path, problem)
    return None


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
        a checkpoint directory, or a run directory (its newest checkpoint).

        Raises:
            ConfigError / CheckpointError: ``never`` over existing checkpoints, a path that is not a
                complete checkpoint, a damaged one, or one of another model, corpus or backend format.
        """
        path = self._resume_path(self.cfg.resume)
        if path is None:
            return None
        scan_pickles(path)  # before anything is unpickled
        saved = read_state(path)
        self._check_format(path, saved)
        self._check_identity(path, saved)
        return path

    def _resume_path(self, resume: str) -> str | None:
        if resume == "never":
            existing = list_checkpoints(self.root)
            if existing:
                raise ConfigError(
                    f"checkpoint.resume=never, but {self.root} already holds checkpoints (up to step "
                    f"{existing[-1][0]}); set checkpoint.resume=auto to continue that run, or pick a new "
                    "run_name "
                    "/ hydra.run.dir"
                )
            return None
        if resume == "auto":
            path = latest_checkpoint(self.root, check=True)  # a damaged newest one: the previous
            damaged = checkpoint_dirs(self.root)
            if path is None and damaged:  # never silently start over on top of a run's history
                raise CheckpointError(
                    f"{self.root} holds {len(damaged)} checkpoint(s) (newest "
                    f"{os.path.basename(damaged[-1])}) but "
                    "none is complete and intact (see the warnings); move them away to start over, or set "
                    "checkpoint.resume to a good checkpoint"
                )
            return path
        path = os.path.expanduser(resume)
        if os.path.isdir(os.path.join(path, "checkpoints")):  # a run directory
            path = latest_checkpoint(os.path.join(path, "checkpoints"), check=True) or path
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={resume!r} is not auto, never, or a complete checkpoint directory "
                "(runs/<run_name>/checkpoints/step_NNNNNNNN, or a run directory)"
            )
        problem = verify(path)
        if problem:
            raise CheckpointError(
                f"checkpoint.resume: {path} is damaged ({problem}); choose another checkpoint"
            )
        return path

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

    def restore(self, path: str) -> dict:
        """Load the backend's model/optimizer state and this rank's RNG states; returns
        ``trainer_state.json``.

        Raises:
            CheckpointError: the files cannot be loaded (naming the checkpoint and what to do).
        """
        meta = read_state(path)
        try:
            self.backend.load(path)
        except CheckpointError:
            raise
        except Exception as e:
            raise unreadable(path, e) from e
        rng_path = os.path.join(path, "rng", f"rank_{self.env.rank}.pt")
        if os.path.isfile(rng_path):  # absent when resuming at a larger world size
            set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=True))
        return meta


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
