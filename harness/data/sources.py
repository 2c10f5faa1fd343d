"""Find the corpus files a ``data.path`` names and read them through ``datasets``."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from harness.errors import DataError

log = logging.getLogger("harness")

_EXT_FORMAT = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".py": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
STORE_META = "meta.json"  # marks a prepared token-store directory


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: local ``files`` in one ``format``, or a hub dataset name."""

    files: tuple[str, ...]
    format: str  # text | json | parquet | hub
    hub_name: str | None = None

    def fingerprint(self) -> str:
        """Hash of the file list with sizes and modification times (a cache key part)."""
        h = hashlib.sha256(self.format.encode())
        for f in self.files:
            if self.format == "hub":
                h.update(f.encode())
                continue
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        if self.hub_name:
            h.update(self.hub_name.encode())
        return h.hexdigest()[:16]


def infer_format(path: str) -> str | None:
    """Format from a file name (``.gz``/``.bz2``/``.xz``/``.zst`` suffixes are looked through)."""
    name = path.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _EXT_FORMAT.get(os.path.splitext(name)[1])


def is_prepared_dir(path: Any) -> bool:
    """True when ``path`` is a directory written by ``python -m harness.prepare_data``."""
    return isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, STORE_META))


def resolve_corpus(path: Any, fmt: str | None, hub_name: str | None = None) -> Corpus:
    """Expand ``data.path`` (a path, glob, directory or list of them; or a hub name) into a :class:`Corpus`.

    Raises:
        DataError: no file matches, the format cannot be inferred, or formats are mixed.
    """
    if path is None or path == "" or path == []:
        raise DataError("data.path is empty: set it to a file, glob, directory or list of them")
    patterns = [path] if isinstance(path, str) else [str(p) for p in path]
    files: list[str] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            files += _directory_files(pattern, expanded, fmt)
            continue
        matched = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not matched:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            if _looks_like_hub_name(pattern) and len(patterns) == 1 and not offline:
                _check_hub_reachable(pattern)
                return Corpus((pattern,), "hub", hub_name)
            raise DataError(f"data.path: {pattern!r} matches no file (check the path or glob)")
        files += matched
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise DataError(f"data.path: {empty[0]!r} is empty (0 bytes); remove it or narrow data.path")
    if fmt is None:
        formats = {infer_format(f) for f in files}
        if None in formats:
            bad = next(f for f in files if infer_format(f) is None)
            raise DataError(
                f"data.format: cannot infer the format of {bad!r}; set data.format=text|json|parquet"
            )
        if len(formats) > 1:
            raise DataError(
                f"data.path mixes formats {sorted(formats)}; give one format per run (data.format), or one "
                "data.sources entry per format (a mixture)"
            )
        fmt = formats.pop()
    return Corpus(tuple(files), fmt)


def _directory_files(pattern: str, directory: str, fmt: str | None) -> list[str]:
    """The files of a ``data.path`` directory (recursively; ``glob`` leaves hidden files and folders out,
    as ``datasets`` does): with ``data.format`` set every one, else those whose extension names a format.
    Files skipped for their extension are named in one warning (rank 0).

    Raises:
        DataError: no file of the directory can be read, naming it and the files skipped.
    """
    every = sorted(
        f for f in glob.glob(os.path.join(directory, "**", "*"), recursive=True) if os.path.isfile(f)
    )
    if fmt is not None:
        found, skipped = every, []
    else:
        found = [f for f in every if infer_format(f)]
        skipped = [os.path.relpath(f, directory) for f in every if not infer_format(f)]
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    how = "set data.format=text|json|parquet to read every file of the directory in that format"
    if not found:
        also = f" (skipped for their extension: {shown}; {how})" if skipped else ""
        raise DataError(f"data.path: directory {pattern!r} holds no .txt/.json/.jsonl/.parquet file{also}")
    if skipped and os.environ.get("RANK", "0") == "0" and (directory, len(skipped)) not in _WARNED:
        _WARNED.add((directory, len(skipped)))
        log.warning(
            "data.path: directory %r: skipped %d file%s whose extension names no format (%s); %s, "
            "or list the files in data.path",
            pattern,
            len(skipped),
            "" if len(skipped) == 1 else "s",
            shown,
            how,
        )
    return found


_WARNED: set[tuple[str, int]] = set()  # one warning per directory, though a run resolves it more than once


def _check_hub_reachable(name: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before ``datasets`` spends half a minute in retries, when ``name`` (``org/name``,
    no such local file) cannot be a hub dataset: ``org/`` is a local directory (a missing local
    path), or the hub endpoint (``$HF_ENDPOINT``, default huggingface.co) does not answer a TCP
    connection within ``timeout_s``.

    Raises:
        DataError: naming the path and what to check.
    """
    import socket
    from urllib.parse import urlparse

    if os.path.isdir(name.split("/")[0]):
        raise DataError(f"data.path: {name!r} matches no file (check the path or glob)")
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise DataError(
            f"data.path: {name!r} matches no local file, and the Hugging Face hub ({host}:{port}) cannot be "
            f"reached to load it as a hub dataset ({e.strerror or e}); check the path, or set "
            "HF_HUB_OFFLINE=1 "
            "to never try the hub"
        ) from e


def _looks_like_hub_name(pattern: str) -> bool:
    parts = pattern.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not pattern.startswith((".", "~", "/"))
        and not any(c in pattern for c in "*?[")
        and infer_format(pattern) is None
    )


def load_corpus(corpus: Corpus, text_field: str, sample_by: str, split: str, cache_dir: str):
    """Read the corpus as a ``datasets.Dataset`` with a ``text_field`` column.

    Local files load with the ``text``/``json``/``parquet`` builders; a hub name loads
    with ``load_dataset(name, hub_name, split=...)`` (needs the network or a local HF cache).

    Raises:
        DataError: a file cannot be parsed (binary, invalid UTF-8, bad JSON) or has no
            ``text_field`` column; the message names the file or key.
    """
    import datasets

    datasets.disable_progress_bars()
    try:
        with _datasets_logs_held():
            ds = _load(datasets, corpus, sample_by, split, os.path.join(cache_dir, "hf_datasets"))
    except Exception as e:  # datasets wraps parser errors in several types
        raise _read_error(corpus, e) from e
    column = "text" if corpus.format == "text" else text_field
    if column not in ds.column_names:
        raise DataError(
            f"data.text_field={text_field!r}: no such column in {corpus.files[0]!r} "
            f"(columns: {', '.join(ds.column_names)}); set data.text_field"
        )
    return ds, column


@contextlib.contextmanager
def _datasets_logs_held():
    """Hold what ``datasets`` logs while reading: given out when the read succeeds, dropped when it
    fails, so a file it cannot parse is one error line (ours), not its own lines first."""
    lib = logging.getLogger("datasets")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handlers, propagate = lib.handlers[:], lib.propagate
    lib.handlers[:], lib.propagate = [Hold()], False
    try:
        yield
    finally:
        lib.handlers[:], lib.propagate = handlers, propagate
    for record in held:  # reached only when the read succeeded
        lib.handle(record)


def _load(datasets, corpus: Corpus, sample_by: str, split: str, hf_cache: str):
    if corpus.format == "hub":
        return datasets.load_dataset(corpus.files[0], corpus.hub_name, split=split, cache_dir=hf_cache)
    if corpus.format == "text":
        return datasets.load_dataset(
            "text", data_files=list(corpus.files), split="train", sample_by=sample_by, cache_dir=hf_cache
        )
    return datasets.load_dataset(
        corpus.format, data_files=list(corpus.files), split="train", cache_dir=hf_cache
    )


def _read_error(corpus: Corpus, e: Exception) -> DataError:
    """One line naming the file(s), the format and the parser's complaint."""
    cause = e.__cause__ or e
    detail = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    if corpus.format == "hub":
        return DataError(
            f"data.path: {corpus.files[0]!r} is no local file or directory, and loading it as a hub "
            f"dataset failed ({detail}); check the path"
        )
    many = f"{len(corpus.files)} files from {corpus.files[0]!r}"
    where = corpus.files[0] if len(corpus.files) == 1 else many
    hint = {"text": "UTF-8 text", "json": "JSON lines (one object per line)", "parquet": "parquet"}.get(
        corpus.format, corpus.format
    )
    return DataError(
        f"data.path: cannot read {where} as {corpus.format}: {detail}; check that it is {hint}, "
        "or set data.format"
    )
