"""Sharded token stores: many bounded files plus an index, written by worker processes, atomically.

A store (format ``harness-tokens-v2``) is a directory::

    shards/tokens_PPP_KKKKK.bin   token ids of worker P's K-th shard, each document followed by EOS,
                                  at most ``max_shard_bytes`` each (uint16 when the vocabulary fits,
                                  else uint32)
    documents.npy                 int64 token offset of every document's first token, in store order
    tokenizer/                    the tokenizer that produced them (``save_pretrained``)
    meta.json                     format, dtype, token and document counts, EOS id, tokenizer fingerprint,
                                  the shard list with their token counts -- written last

The corpus is split into ``num_proc`` contiguous parts; worker ``P`` tokenizes part ``P`` and writes
its own shards, so the store's token order is the corpus order whatever ``num_proc`` is. Everything
is written into ``.tmp-<name>-<pid>`` beside the target and renamed when complete; a store without
``meta.json`` is never opened, and a rerun removes the temporaries of dead writers. Training
memory-maps the shards (:class:`ShardedTokens`): resident memory does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np

from harness.data.tokenizer import encode_documents

FORMAT_V2 = "harness-tokens-v2"
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # 1 GiB


class ShardedTokens:
    """The concatenation of memory-mapped shards as one read-only 1-D token array (a view may start
    and end anywhere). Supports ``len``, ``[i]``, ``[a:b]`` (a view) and integer-array indexing."""

    def __init__(self, maps: list[np.ndarray], start: int = 0, stop: int | None = None):
        self.maps = maps
        self.bounds = np.cumsum([0] + [len(m) for m in maps]).astype(np.int64)
        self.start = start
        self.stop = int(self.bounds[-1]) if stop is None else stop
        self.dtype = maps[0].dtype if maps else np.dtype(np.uint16)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise ValueError("ShardedTokens slices take step 1")
            return ShardedTokens(self.maps, self.start + a, self.start + max(a, b))
        idx = np.asarray(key, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        flat = idx.reshape(-1) + self.start
        if flat.size and (flat.min() < self.start or flat.max() >= self.stop):
            raise IndexError("token index out of range")
        shard = np.searchsorted(self.bounds, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard):
            mine = shard == s
            out[mine] = self.maps[s][flat[mine] - self.bounds[s]]
        return out.reshape(idx.shape) if idx.ndim else out.reshape(())[()]

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out.astype(dtype) if dtype is not None else out


def open_shards(path: str, meta: dict) -> ShardedTokens:
    """Memory-map the shards that ``meta`` lists (sizes checked against it).

    Raises:
        ValueError: a shard is missing or has another size than the index says.
    """
    dtype = np.dtype(meta["dtype"])
    maps = []
    for shard in meta["shards"]:
        file = os.path.join(path, shard["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != shard["tokens"] * dtype.itemsize:
            raise ValueError(
                f"{file} is missing or not {shard['tokens'] * dtype.itemsize} bytes as meta.json says"
            )
        if shard["tokens"]:
            maps.append(np.memmap(file, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return ShardedTokens(maps)


@dataclass(frozen=True)
class _Part:
    """What one worker tokenizes and writes."""

    index: int
    num_parts: int
    directory: str
    column: str
    dtype: str
    eos: int
    max_shard_tokens: int
    parse_special_tokens: bool = False


def _write_part(dataset, tokenizer, part: _Part) -> tuple[list[dict], np.ndarray]:
    """Tokenize part ``part.index`` of ``dataset`` into shard files of at most
    ``part.max_shard_tokens`` tokens (a document may span two); returns the shards (file, tokens)
    and the documents' start offsets within the part."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    shard_ds = dataset.shard(num_shards=part.num_parts, index=part.index, contiguous=True)
    dtype = np.dtype(part.dtype)
    shards, starts, offset = [], [], 0
    buf: list[np.ndarray] = []
    buffered = 0

    def flush() -> None:
        nonlocal buf, buffered
        name = f"shards/tokens_{part.index:03d}_{len(shards):05d}.bin"
        with open(os.path.join(part.directory, name), "wb") as f:
            for arr in buf:
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        shards.append({"file": name, "tokens": buffered})
        buf, buffered = [], 0

    for batch in shard_ds.iter(batch_size=256):
        ids = encode_documents(tokenizer, batch[part.column], part.parse_special_tokens)
        for doc in ids:
            if not doc:
                continue
            arr = np.asarray([*doc, part.eos], dtype=dtype)
            starts.append(offset)
            offset += len(arr)
            while len(arr):  # a document longer than the room left continues in the next shard
                room = part.max_shard_tokens - buffered
                buf.append(arr[:room])
                buffered += min(room, len(arr))
                arr = arr[room:]
                if buffered == part.max_shard_tokens:
                    flush()
    if buffered:
        flush()
    return shards, np.asarray(starts, dtype=np.int64)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent (which removes the temporary store), so no worker tracebacks."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_part(args):
    return _write_part(*args)


def write_parts(
    tmp: str,
    dataset,
    column: str,
    tokenizer,
    num_proc: int,
    dtype: str,
    max_shard_bytes: int,
    parse_special_tokens: bool = False,
) -> tuple[list[dict], np.ndarray]:
    """Tokenize ``dataset[column]`` into ``tmp/shards/`` with ``num_proc`` workers (special-token text
    in a document is text unless ``parse_special_tokens``: :func:`encode_documents`); returns the shard
    list in store order and the documents' global start offsets."""
    os.makedirs(os.path.join(tmp, "shards"), exist_ok=True)
    n = max(1, min(num_proc, len(dataset)))
    max_tokens = max(1, max_shard_bytes // np.dtype(dtype).itemsize)
    parts = [
        (
            dataset,
            tokenizer,
            _Part(i, n, tmp, column, dtype, tokenizer.eos_token_id, max_tokens, parse_special_tokens),
        )
        for i in range(n)
    ]
    if n == 1:
        results = [_run_part(parts[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(n, initializer=_ignore_sigint) as pool:
            results = pool.map(_run_part, parts)
    shards, starts, offset = [], [], 0
    for part_shards, part_starts in results:
        shards += part_shards
        starts.append(part_starts + offset)
        offset += sum(s["tokens"] for s in part_shards)
    return shards, (np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64))


def temp_dir(target: str) -> str:
    """A fresh ``.tmp-<name>-<pid>`` beside ``target``, after removing those of dead writers."""
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    pattern = re.compile(rf"^\.tmp-{re.escape(name)}-(\d+)$")
    for entry in os.listdir(parent):
        m = pattern.match(entry)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = os.path.join(parent, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    os.chmod(tmp, 0o755)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish(tmp: str, target: str, meta: dict) -> None:
    """Write ``meta.json`` last, fsync, and rename ``tmp`` into place (replacing an old store)."""
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(target):
        old = f"{target}.old-{os.getpid()}"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
