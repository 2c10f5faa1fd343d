"""Data: sources -> tokenizer -> token stores -> packed sequences -> (mixture) -> per-step batches.

Public surface:
    :func:`source_specs` names the sources of ``data`` (``data.sources``, or ``data.path`` alone);
    :func:`load_token_store` tokenizes (or finds cached / prepared) one source;
    :func:`build_data` builds the tokenizer, every source's store and split, and the mixture;
    :class:`StepLoader`, :class:`MicroBatch`, :func:`validation_batches` feed the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from dataclasses import dataclass

from harness.config import DataConfig, SourceConfig, TokenizerConfig, check_sources
from harness.data.loader import (
    IGNORE_INDEX,
    MicroBatch,
    PackedSequences,
    StepLoader,
    build_loader,
    validation_batches,
)
from harness.data.mixture import BlendedSequences, BlendOrder, Segment, normalized
from harness.data.shards import DEFAULT_MAX_SHARD_BYTES
from harness.data.sources import Corpus, is_prepared_dir, load_corpus, resolve_corpus
from harness.data.store import FORMAT, TokenStore, open_store, write_store
from harness.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from harness.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "BlendedSequences",
    "DataBundle",
    "MicroBatch",
    "PackedSequences",
    "SourceSpec",
    "StepLoader",
    "TokenStore",
    "build_data",
    "build_loader",
    "check_splits",
    "load_token_store",
    "source_specs",
    "validation_batches",
]


@dataclass(frozen=True)
class SourceSpec:
    """One source of the corpus: its ``data`` section (path, format, text field, sample_by of the
    source), its weight in the mixture and the key that names it in messages."""

    name: str
    data: DataConfig
    weight: float
    key: str


def source_specs(data: DataConfig) -> list[SourceSpec]:
    """The sources of ``data``: ``data.sources`` (name -> path, weight, and optional format /
    text_field / sample_by over the ``data`` defaults), or ``data.path`` alone.

    Raises:
        ConfigError: a source that is not a mapping of :class:`SourceConfig` keys, without a path, or
            with a weight that is not a number > 0, naming the source (the checks are
            :func:`harness.config.check_sources`, which :func:`harness.config.validate` runs).
    """
    if data.sources is None:
        return [SourceSpec("data", data, 1.0, "data.path")]
    return [_source_spec(name, src, data) for name, src in check_sources(data)]


def _source_spec(name: str, src: SourceConfig, data: DataConfig) -> SourceSpec:
    own = {k: getattr(src, k) for k in ("format", "text_field", "sample_by") if getattr(src, k) is not None}
    spec_data = dataclasses.replace(data, path=src.path, **own)
    return SourceSpec(name, spec_data, float(src.weight), f"data.sources.{name}")


@contextlib.contextmanager
def _naming(spec: SourceSpec):
    """Errors about a source of a mixture name the source (``data.sources.<name>: ...``)."""
    try:
        yield
    except DataError as e:
        if spec.key == "data.path":
            raise
        text = str(e).removeprefix("data.path: ").removeprefix("data.path ")
        raise DataError(f"{spec.key}: {text}") from e


def load_token_store(
    data: DataConfig,
    tok_cfg: TokenizerConfig,
    output_dir: str | None = None,
    tokenizer=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
):
    """Return ``(tokenizer, TokenStore)`` for ``data.path``.

    * A prepared directory is memory-mapped as is (its own tokenizer unless ``tokenizer.path``
      or ``tokenizer`` is given, which must then match the one that prepared it).
    * Otherwise the corpus is tokenized once into ``<cache_dir>/tokens/<key>`` (or into
      ``output_dir`` for ``prepare_data``); the key hashes the files (path, size, mtime),
      the text field, the tokenizer and ``tokenizer.parse_special_tokens``, so a second run starts
      from the cache.
    * With ``tokenizer.path`` null (and no ``tokenizer``) a byte-level BPE of
      ``tokenizer.train_vocab_size`` is trained on the corpus and cached.

    Raises:
        DataError: missing files, unreadable data, missing text column, empty corpus,
            or a tokenizer that does not match a prepared store.
    """
    if is_prepared_dir(data.path):
        return _prepared(data, tok_cfg, tokenizer)
    corpus = resolve_corpus(data.path, data.format, data.hub_name)
    _cache_dir(data)
    reader = _Reader(corpus, data)
    if tokenizer is None:
        tokenizer = _tokenizer(tok_cfg, [reader], data.cache_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    specials = "specials-parsed" if tok_cfg.parse_special_tokens else "specials-as-text"
    key = _short(
        f"{FORMAT}|{corpus.fingerprint()}|{data.text_field}|{data.sample_by}|{fingerprint}|{specials}"
    )
    target = output_dir or os.path.join(data.cache_dir, "tokens", key)
    if output_dir is None and is_prepared_dir(target):
        return tokenizer, open_store(target)
    ds, column = reader.dataset()
    first = corpus.files[0] if corpus.format == "hub" else os.path.abspath(corpus.files[0])
    source = first if len(corpus.files) == 1 else f"{len(corpus.files)} files ({first}, ...)"
    meta = {"source": source, "tokenizer_fingerprint": fingerprint, "text_field": column}
    return tokenizer, write_store(
        target, ds, column, tokenizer, data.num_proc, meta, max_shard_bytes, tok_cfg.parse_special_tokens
    )


def _prepared(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer):
    store = open_store(data.path)
    if tokenizer is None and tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path, tok_cfg.eos_token)
    if tokenizer is None:
        return load_tokenizer(os.path.join(data.path, "tokenizer")), store
    if tokenizer_fingerprint(tokenizer) != store.meta.get("tokenizer_fingerprint"):
        given = f"tokenizer.path={tok_cfg.path!r}" if tok_cfg.path else "the tokenizer of the other sources"
        fix = (
            "drop tokenizer.path to use the store's own tokenizer"
            if tok_cfg.path
            else f"set tokenizer.path={os.path.join(data.path, 'tokenizer')} (sources share one tokenizer)"
        )
        raise DataError(f"{given} is not the tokenizer that prepared {data.path!r}; {fix}")
    return tokenizer, store


def _cache_dir(data: DataConfig) -> None:
    try:
        os.makedirs(data.cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data.cache_dir={data.cache_dir!r} is not a usable directory: {e.strerror or e}"
        ) from e


class _Reader:
    """A corpus read through ``datasets`` once, on first use."""

    def __init__(self, corpus: Corpus, data: DataConfig, spec: SourceSpec | None = None):
        self.corpus, self.data, self.spec, self._ds = corpus, data, spec, None

    def dataset(self):
        if self._ds is None:
            d = self.data
            self._ds = load_corpus(self.corpus, d.text_field, d.sample_by, d.split, d.cache_dir)
        return self._ds

    def texts(self):
        if self.spec is None:
            ds, column = self.dataset()
        else:
            with _naming(self.spec):
                ds, column = self.dataset()
        for batch in ds.iter(batch_size=1000):
            yield from batch[column]

    def key(self) -> str:
        return f"{self.corpus.fingerprint()}-{self.data.text_field}-{self.data.sample_by}"


def _tokenizer(tok_cfg: TokenizerConfig, readers: list[_Reader], cache_dir: str):
    """``tokenizer.path``, or a BPE trained on the texts of every reader (in order) and cached."""
    if tok_cfg.path:
        return load_tokenizer(tok_cfg.path, tok_cfg.eos_token)

    def texts():
        for reader in readers:
            yield from reader.texts()

    key = _short("+".join(r.key() for r in readers)) if len(readers) > 1 else _short(readers[0].key())
    return train_bpe_tokenizer(texts, tok_cfg.train_vocab_size, cache_dir, key)


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side.

    Attributes:
        tokenizer: the shared tokenizer.
        stores: each source's token store, by source name (``data`` for a one-source corpus).
        train: the training sequences: one source's :class:`PackedSequences`, or a mixture's
            :class:`BlendedSequences` (global sample numbers in the blending order).
        val: one source's held-out sequences (None without validation or for a mixture).
        val_by_source: a mixture's held-out sequences by source name (None otherwise).
        weights: a mixture's normalized weights by source name (None otherwise).
    """

    tokenizer: object
    stores: dict[str, TokenStore]
    train: PackedSequences | BlendedSequences
    val: PackedSequences | None
    val_by_source: dict[str, PackedSequences] | None = None
    weights: dict[str, float] | None = None

    @property
    def store(self) -> TokenStore:
        """The first (for a one-source corpus: the only) source's store."""
        return next(iter(self.stores.values()))

    @property
    def is_mixture(self) -> bool:
        return self.weights is not None

    def identity(self, data: DataConfig) -> dict:
        """What a checkpoint of this run must match to be resumed (``mixture`` compared on its own)."""
        key = {
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "seq_len": data.seq_len,
            "val_fraction": data.val_fraction,
        }
        if not self.is_mixture:
            return {"tokens": self.store.num_tokens, **key}
        return {**key, "sources": {n: s.num_tokens for n, s in self.stores.items()}}

    def mixture_state(self) -> dict | None:
        """The mixture's weights and segments, as checkpoints store them."""
        if not self.is_mixture:
            return None
        names = list(self.stores)
        return {
            "weights": dict(self.weights),
            "segments": [s.to_dict(names) for s in self.train.order.segments],
        }


def build_data(
    data: DataConfig, tok_cfg: TokenizerConfig, global_batch_size: int, need_val: bool, seed: int = 0
) -> DataBundle:
    """Tokenize/load every source and split it: the last ``data.val_fraction`` of each source's tokens
    is its validation split; several sources are blended by their weights (:mod:`harness.data.mixture`).

    Raises:
        DataError: a source that cannot be read, an empty source, two sources with the same files, or
            the sizes :func:`check_splits` refuses; a mixture's messages name the source.
    """
    specs = source_specs(data)
    tokenizer, stores = _stores(specs, tok_cfg)
    check_splits(data, specs, {n: s.num_tokens for n, s in stores.items()}, global_batch_size, need_val)
    splits = {s.name: _split(stores[s.name], s, need_val) for s in specs}
    if len(specs) == 1 and not data.sources:
        train, val = splits["data"]
        return DataBundle(tokenizer, stores, train, val)
    names = [s.name for s in specs]
    weights = normalized([s.weight for s in specs])
    order = BlendOrder([Segment(0, weights, tuple(0 for _ in specs))])
    train = BlendedSequences(names, [splits[n][0] for n in names], order, seed)
    val = {n: splits[n][1] for n in names} if need_val else None
    return DataBundle(tokenizer, stores, train, None, val, dict(zip(names, weights)))


def check_splits(
    data: DataConfig, specs: list[SourceSpec], tokens: dict[str, int], global_batch_size: int, need_val: bool
) -> dict[str, int]:
    """The training sequences of each source (by name) of ``tokens`` tokens, the last
    ``data.val_fraction`` held out when ``need_val``: the one check of the sizes, which training
    (:func:`build_data`) and ``harness.plan`` both apply.

    Raises:
        DataError: in this order: a source of a mixture without a training sequence, fewer training
            sequences (of all sources) than ``global_batch_size``, a validation split (needed) without a
            sequence of ``data.seq_len + 1`` tokens; a mixture's messages name the source.
    """
    sequences, held_out = {}, {}
    for spec in specs:
        n, seq_len = tokens[spec.name], spec.data.seq_len
        held_out[spec.name] = int(n * spec.data.val_fraction) if need_val else 0
        sequences[spec.name] = PackedSequences.count(n - held_out[spec.name], seq_len)
        if spec.key != "data.path" and sequences[spec.name] == 0:
            raise DataError(f"{spec.key}: {n:,} tokens hold no training sequence of data.seq_len={seq_len}")
    whole = specs[0] if specs[0].key == "data.path" else SourceSpec("mixture", data, 1.0, "data.sources")
    _check_sizes(whole, sum(sequences.values()), global_batch_size)
    for spec in specs if need_val else []:
        if PackedSequences.count(held_out[spec.name], spec.data.seq_len) == 0:
            where = "" if spec.key == "data.path" else f"{spec.key}: "
            raise DataError(
                f"{where}data.val_fraction={spec.data.val_fraction} holds out {held_out[spec.name]:,} "
                f"tokens, fewer than one sequence of data.seq_len={spec.data.seq_len} + 1; raise "
                "data.val_fraction or set eval.every=0"
            )
    return sequences


def _stores(specs: list[SourceSpec], tok_cfg: TokenizerConfig):
    """The shared tokenizer and every source's store (sources resolved first: same files are an error)."""
    if len(specs) == 1:
        with _naming(specs[0]):
            tokenizer, store = load_token_store(specs[0].data, tok_cfg)
        return tokenizer, {specs[0].name: store}
    readers, seen = {}, {}
    for spec in specs:
        with _naming(spec):
            if is_prepared_dir(spec.data.path):
                files = (os.path.realpath(spec.data.path),)
            else:
                corpus = resolve_corpus(spec.data.path, spec.data.format, spec.data.hub_name)
                files, readers[spec.name] = (
                    tuple(os.path.realpath(f) for f in corpus.files),
                    _Reader(corpus, spec.data, spec),
                )
        ids = {_file_id(f): f for f in files}  # device + inode: symlinks, relative paths and hard links
        for other, other_ids in seen.items():
            if ids.keys() & other_ids.keys():
                shared = sorted(ids[i] for i in ids.keys() & other_ids.keys())[0]
                raise DataError(
                    f"{spec.key} and data.sources.{other} resolve to the same files ({shared}); "
                    "give each source its own files"
                )
        seen[spec.name] = ids
    _cache_dir(specs[0].data)
    prepared = [s.data.path for s in specs if s.name not in readers]
    tokenizer = None
    if tok_cfg.path:
        tokenizer = load_tokenizer(tok_cfg.path, tok_cfg.eos_token)
    elif prepared:  # no tokenizer.path: the first prepared store's, which every other source then uses
        tokenizer = load_tokenizer(os.path.join(prepared[0], "tokenizer"))
    elif readers:
        tokenizer = _tokenizer(tok_cfg, list(readers.values()), specs[0].data.cache_dir)
    stores = {}
    for spec in specs:
        with _naming(spec):
            tokenizer, stores[spec.name] = load_token_store(spec.data, tok_cfg, tokenizer=tokenizer)
    return tokenizer, stores


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _split(store: TokenStore, spec: SourceSpec, need_val: bool):
    """A source's training and validation sequences (the sizes checked by :func:`check_splits`)."""
    data = spec.data
    n = store.num_tokens
    n_val = int(n * data.val_fraction) if need_val else 0
    train = PackedSequences(store.tokens[: n - n_val], data.seq_len)
    val = PackedSequences(store.tokens[n - n_val :], data.seq_len) if n_val else None
    return train, val


def _check_sizes(spec: SourceSpec, sequences: int, global_batch_size: int) -> None:
    if sequences < global_batch_size:
        raise DataError(
            f"{spec.key}: the corpus is too small for one batch: {sequences} training sequences of "
            f"data.seq_len={spec.data.seq_len}, but train.global_batch_size={global_batch_size}; "
            "use a larger corpus or lower data.seq_len / train.global_batch_size"
        )
