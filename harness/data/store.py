"""Token stores: a corpus tokenized once into a flat token file that training memory-maps.

A store is a directory::

    tokens.bin      all documents' token ids, each document followed by EOS (uint16 or uint32)
    tokenizer/      the tokenizer that produced them (``save_pretrained``)
    meta.json       dtype, token and document counts, EOS id, fingerprints -- written last

It is written into a temporary sibling directory and renamed when complete, so a store
that has ``meta.json`` is whole. The tokenization cache and ``python -m harness.prepare_data``
write the same format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

from harness.data.sources import STORE_META
from harness.errors import DataError

FORMAT = "harness-tokens-v1"


@dataclass(frozen=True)
class TokenStore:
    """A read-only view of a token store: ``tokens`` is a 1-D ``np.memmap`` of ``num_tokens`` ids."""

    path: str
    tokens: np.ndarray
    meta: dict

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])


def open_store(path: str) -> TokenStore:
    """Memory-map a complete token store.

    Raises:
        DataError: ``meta.json`` is missing or does not describe ``tokens.bin``.
    """
    meta_path = os.path.join(path, STORE_META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data.path: {path!r} is not a complete token store ({meta_path}: {e})") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"data.path: {meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    bin_path = os.path.join(path, "tokens.bin")
    dtype = np.dtype(meta["dtype"])
    expected = int(meta["num_tokens"]) * dtype.itemsize
    if not os.path.isfile(bin_path) or os.path.getsize(bin_path) != expected:
        raise DataError(f"data.path: {bin_path} is missing or not {expected} bytes as {meta_path} says")
    if meta["num_tokens"] == 0:
        raise DataError(f"data.path: {path!r} holds no tokens")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(int(meta["num_tokens"]),))
    return TokenStore(path, tokens, meta)


def write_store(target: str, dataset, column: str, tokenizer, num_proc: int, extra_meta: dict) -> TokenStore:
    """Tokenize ``dataset[column]`` with ``tokenizer`` into a store at ``target`` (atomically).

    Documents are tokenized without special tokens, joined with EOS, and empty documents
    are skipped. ``num_proc`` worker processes run ``datasets.Dataset.map``.

    Raises:
        DataError: no document yields a token (empty corpus).
    """
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32

    def encode(batch):
        return {"input_ids": tokenizer(batch[column], add_special_tokens=False, verbose=False)["input_ids"]}

    tokenized = dataset.map(
        encode,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=dataset.column_names,
        desc=None,
    )
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        num_tokens = num_docs = 0
        with open(os.path.join(tmp, "tokens.bin"), "wb") as f:
            for batch in tokenized.iter(batch_size=1024):
                parts = []
                for ids in batch["input_ids"]:
                    if ids:
                        parts.append(np.asarray(ids, dtype=dtype))
                        parts.append(np.asarray([eos], dtype=dtype))
                        num_docs += 1
                if parts:
                    arr = np.concatenate(parts)
                    f.write(arr.tobytes())
                    num_tokens += arr.size
        if num_tokens == 0:
            raise DataError(
                f"data.path: every document of {extra_meta.get('source', 'the corpus')} is empty (0 tokens)"
            )
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        meta = {
            "format": FORMAT,
            "dtype": np.dtype(dtype).name,
            "num_tokens": num_tokens,
            "num_documents": num_docs,
            "eos_token_id": eos,
            "vocab_size": vocab,
            **extra_meta,
        }
        with open(os.path.join(tmp, STORE_META), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(target)
