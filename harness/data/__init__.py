"""Data: corpus files -> tokenizer -> cached token store -> packed train/val sequences.

Public surface:
    :func:`load_token_store` tokenizes (or finds cached / prepared) the corpus;
    :func:`build_data` also splits train/validation and checks sizes;
    :class:`StepLoader`, :class:`MicroBatch`, :func:`validation_batches` feed the loop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from harness.config import DataConfig, TokenizerConfig
from harness.data.loader import (
    IGNORE_INDEX,
    MicroBatch,
    PackedSequences,
    StepLoader,
    build_loader,
    validation_batches,
)
from harness.data.sources import is_prepared_dir, load_corpus, resolve_corpus
from harness.data.store import FORMAT, TokenStore, open_store, write_store
from harness.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from harness.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "DataBundle",
    "MicroBatch",
    "PackedSequences",
    "StepLoader",
    "TokenStore",
    "build_data",
    "build_loader",
    "load_token_store",
    "validation_batches",
]


def load_token_store(data: DataConfig, tok_cfg: TokenizerConfig, output_dir: str | None = None):
    """Return ``(tokenizer, TokenStore)`` for ``data.path``.

    * A prepared directory is memory-mapped as is (its own tokenizer unless ``tokenizer.path``
      is given, which must then match the one that prepared it).
    * Otherwise the corpus is tokenized once into ``<cache_dir>/tokens/<key>`` (or into
      ``output_dir`` for ``prepare_data``); the key hashes the files (path, size, mtime),
      the text field and the tokenizer, so a second run starts from the cache.
    * With ``tokenizer.path`` null a byte-level BPE of ``tokenizer.train_vocab_size`` is
      trained on the corpus and cached.

    Raises:
        DataError: missing files, unreadable data, missing text column, empty corpus,
            or a tokenizer that does not match a prepared store.
    """
    if is_prepared_dir(data.path):
        store = open_store(data.path)
        if tok_cfg.path:
            tokenizer = load_tokenizer(tok_cfg.path)
            if tokenizer_fingerprint(tokenizer) != store.meta.get("tokenizer_fingerprint"):
                raise DataError(
                    f"tokenizer.path={tok_cfg.path!r} is not the tokenizer that prepared {data.path!r}; "
                    "drop tokenizer.path to use the store's own tokenizer"
                )
        else:
            tokenizer = load_tokenizer(os.path.join(data.path, "tokenizer"))
        return tokenizer, store

    corpus = resolve_corpus(data.path, data.format, data.hub_name)
    try:
        os.makedirs(data.cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data.cache_dir={data.cache_dir!r} is not a usable directory: {e.strerror or e}"
        ) from e
    raw = {}

    def dataset():
        if "ds" not in raw:
            raw["ds"], raw["column"] = load_corpus(
                corpus, data.text_field, data.sample_by, data.split, data.cache_dir
            )
        return raw["ds"], raw["column"]

    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path)
    else:

        def texts():
            ds, column = dataset()
            for batch in ds.iter(batch_size=1000):
                yield from batch[column]

        key = f"{corpus.fingerprint()}-{data.text_field}-{data.sample_by}"
        tokenizer = train_bpe_tokenizer(texts, tok_cfg.train_vocab_size, data.cache_dir, _short(key))
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = _short(f"{FORMAT}|{corpus.fingerprint()}|{data.text_field}|{data.sample_by}|{fingerprint}")
    target = output_dir or os.path.join(data.cache_dir, "tokens", key)
    if output_dir is None and is_prepared_dir(target):
        return tokenizer, open_store(target)
    ds, column = dataset()
    first = corpus.files[0] if corpus.format == "hub" else os.path.abspath(corpus.files[0])
    source = first if len(corpus.files) == 1 else f"{len(corpus.files)} files ({first}, ...)"
    store = write_store(
        target,
        ds,
        column,
        tokenizer,
        data.num_proc,
        {"source": source, "tokenizer_fingerprint": fingerprint, "text_field": column},
    )
    return tokenizer, store


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side."""

    tokenizer: object
    store: TokenStore
    train: PackedSequences
    val: PackedSequences | None


def build_data(
    data: DataConfig, tok_cfg: TokenizerConfig, global_batch_size: int, need_val: bool
) -> DataBundle:
    """Tokenize/load the corpus and split it: the last ``data.val_fraction`` of tokens is validation.

    Raises:
        DataError: the training split has fewer sequences than one global batch, or
            validation is requested but the held-out split holds no sequence.
    """
    tokenizer, store = load_token_store(data, tok_cfg)
    n = store.num_tokens
    n_val = int(n * data.val_fraction) if need_val else 0
    train = PackedSequences(store.tokens[: n - n_val], data.seq_len)
    val = PackedSequences(store.tokens[n - n_val :], data.seq_len) if n_val else None
    if len(train) < global_batch_size:
        raise DataError(
            f"data.path: the corpus is too small for one batch: {n - n_val:,} training tokens make "
            f"{len(train)} "
            f"sequences of data.seq_len={data.seq_len}, but train.global_batch_size={global_batch_size}; "
            "use a larger corpus or lower data.seq_len / train.global_batch_size"
        )
    if need_val and (val is None or len(val) == 0):
        raise DataError(
            f"data.val_fraction={data.val_fraction} holds out {n_val:,} tokens, fewer than one sequence of "
            f"data.seq_len={data.seq_len} + 1; raise data.val_fraction or set eval.every=0"
        )
    return DataBundle(tokenizer, store, train, val)
