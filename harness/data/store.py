"""Token stores: a corpus tokenized once into memory-mappable shards that training reads.

The current format is ``harness-tokens-v2`` (:mod:`harness.data.shards`: bounded shard files, a
document index, ``meta.json`` written last, written by worker processes, atomically). Stores of
the earlier single-file format ``harness-tokens-v1`` (``tokens.bin``) are still read. The
tokenization cache and ``python -m harness.prepare_data`` write the same format.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from harness.data.shards import DEFAULT_MAX_SHARD_BYTES, FORMAT_V2, finish, open_shards, temp_dir, write_parts
from harness.data.sources import STORE_META
from harness.errors import DataError
from harness.faults import Faults

FORMAT = FORMAT_V2
FORMAT_V1 = "harness-tokens-v1"


@dataclass(frozen=True)
class TokenStore:
    """A read-only view of a token store.

    Attributes:
        path: the store directory.
        tokens: the 1-D token stream (``np.memmap`` for v1, :class:`ShardedTokens` for v2).
        meta: ``meta.json``.
        documents: int64 token offsets of each document's first token (None for v1 stores).
    """

    path: str
    tokens: object
    meta: dict
    documents: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])


def open_store(path: str) -> TokenStore:
    """Memory-map a complete token store (v2 shards or a v1 ``tokens.bin``).

    Raises:
        DataError: ``meta.json`` is missing, or does not describe the files beside it.
    """
    meta_path = os.path.join(path, STORE_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data.path: {path!r} is not a complete token store ({meta_path}: {e})") from e
    if meta.get("num_tokens") == 0:
        raise DataError(f"data.path: {path!r} holds no tokens")
    if meta.get("format") == FORMAT_V2:
        try:
            tokens = open_shards(path, meta)
        except ValueError as e:
            raise DataError(f"data.path: {e}") from e
        documents = np.load(os.path.join(path, "documents.npy"), mmap_mode="r")
        return TokenStore(path, tokens, meta, documents)
    if meta.get("format") != FORMAT_V1:
        raise DataError(f"data.path: {meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    bin_path = os.path.join(path, "tokens.bin")
    dtype = np.dtype(meta["dtype"])
    expected = int(meta["num_tokens"]) * dtype.itemsize
    if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != expected:
        raise DataError(f"data.path: {bin_path} is missing or not {expected} bytes as {meta_path} says")
    return TokenStore(
        path, np.memmap(bin_path, dtype=dtype, mode="r", shape=(int(meta["num_tokens"]),)), meta
    )


def write_store(
    target: str,
    dataset,
    column: str,
    tokenizer,
    num_proc: int,
    extra_meta: dict,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    parse_special_tokens: bool = False,
) -> TokenStore:
    """Tokenize ``dataset[column]`` with ``tokenizer`` into a sharded store at ``target`` (atomically).

    Documents are tokenized without special tokens, each followed by EOS; empty documents are
    skipped; the text of a special token inside a document is text unless ``parse_special_tokens``
    (:func:`harness.data.tokenizer.encode_documents`). ``num_proc`` worker processes each write the
    shards of one contiguous part.

    Raises:
        DataError: no document yields a token (empty corpus).
    """
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32).name
    tmp = temp_dir(target)
    try:
        start = time.perf_counter()
        shards, documents = write_parts(
            tmp, dataset, column, tokenizer, num_proc, dtype, max_shard_bytes, parse_special_tokens
        )
        num_tokens = sum(s["tokens"] for s in shards)
        if num_tokens == 0:
            raise DataError(
                f"data.path: every document of {extra_meta.get('source', 'the corpus')} is empty (0 tokens)"
            )
        np.save(os.path.join(tmp, "documents.npy"), documents)
        Faults.from_env().on_store_written()
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        meta = {
            "format": FORMAT_V2,
            "dtype": dtype,
            "num_tokens": num_tokens,
            "num_documents": len(documents),
            "eos_token_id": tokenizer.eos_token_id,
            "parse_special_tokens": parse_special_tokens,
            "vocab_size": vocab,
            "shards": shards,
            "max_shard_bytes": max_shard_bytes,
            "num_proc": num_proc,
            "write_seconds": round(time.perf_counter() - start, 3),
            **extra_meta,
        }
        finish(tmp, target, meta)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(target)
