"""The data build in one pass, each step a function of the previous step's result::

    specs = source_specs(data)                                  # the config's sources
    sources = resolve_sources(specs)                            # their files found (nothing read)
    tokenizer = build_tokenizer(sources, tok_cfg, once)         # tokenizer.path, a store's, or a BPE
    stores = build_stores(sources, tokenizer, tok_cfg, once)    # every source's token store
    bundle = split_stores(data, specs, tokenizer, stores, ...)  # train / validation splits, mixture

:func:`build_data` runs them; on a cold cache ``once`` (:class:`~harness.data.once.PrepareOnce`) lets
one process of the job train the tokenizer and write the stores while the others wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from dataclasses import dataclass

from harness.config import DataConfig, SourceConfig, TokenizerConfig, check_sources
from harness.data.loader import PackedSequences
from harness.data.mixture import BlendedSequences, BlendOrder, Segment, normalized
from harness.data.once import PrepareOnce
from harness.data.shards import DEFAULT_MAX_SHARD_BYTES
from harness.data.sources import Corpus, is_prepared_dir, load_corpus, resolve_corpus
from harness.data.store import FORMAT, TokenStore, open_store, write_store
from harness.data.tokenizer import bpe_cache_dir, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from harness.errors import DataError


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
def naming(spec: SourceSpec):
    """Errors about a source of a mixture name the source (``data.sources.<name>: ...``)."""
    try:
        yield
    except DataError as e:
        if spec.key == "data.path":
            raise
        text = str(e).removeprefix("data.path: ").removeprefix("data.path ")
        raise DataError(f"{spec.key}: {text}") from e


class Source:
    """A source resolved: its files (``corpus``), or a prepared store (``corpus`` None); the corpus is
    read through ``datasets`` once, on first use."""

    def __init__(self, spec: SourceSpec, corpus: Corpus | None):
        self.spec, self.corpus, self._ds, self._fingerprint = spec, corpus, None, None

    def fingerprint(self) -> str:
        """The corpus's files (path, size, mtime) hashed: one ``stat`` per file, once."""
        if self._fingerprint is None:
            self._fingerprint = self.corpus.fingerprint()
        return self._fingerprint

    def dataset(self):
        """``(datasets.Dataset, text column)``; errors name the source."""
        if self._ds is None:
            d = self.spec.data
            with naming(self.spec):
                self._ds = load_corpus(self.corpus, d.text_field, d.sample_by, d.split, d.cache_dir)
        return self._ds

    def texts(self):
        ds, column = self.dataset()
        for batch in ds.iter(batch_size=1000):
            yield from batch[column]

    def key(self) -> str:
        """The corpus part of the BPE tokenizer's cache key."""
        d = self.spec.data
        return f"{self.fingerprint()}-{d.text_field}-{d.sample_by}"

    def describe(self) -> str:
        """The first file, or ``N files (first, ...)``."""
        files = self.corpus.files
        first = files[0] if self.corpus.format == "hub" else os.path.abspath(files[0])
        return first if len(files) == 1 else f"{len(files)} files ({first}, ...)"


def resolve_sources(specs: list[SourceSpec]) -> list[Source]:
    """Every source's files (globs and directories expanded; prepared stores as they are) and the
    cache directory made when a source is to be tokenized. Nothing is read.

    Raises:
        DataError: a source without files or of unknown format (naming the source), two sources with
            the same files (device and inode: symlinks and hard links too), an unusable ``data.cache_dir``.
    """
    sources, seen = [], {}
    for spec in specs:
        with naming(spec):
            prepared = is_prepared_dir(spec.data.path)
            corpus = (
                None if prepared else resolve_corpus(spec.data.path, spec.data.format, spec.data.hub_name)
            )
            sources.append(Source(spec, corpus))
        if len(specs) > 1:
            files = (spec.data.path,) if prepared else corpus.files
            ids = {_file_id(os.path.realpath(f)): os.path.realpath(f) for f in files}
            for other, other_ids in seen.items():
                if ids.keys() & other_ids.keys():
                    shared = sorted(ids[i] for i in ids.keys() & other_ids.keys())[0]
                    raise DataError(
                        f"{spec.key} and data.sources.{other} resolve to the same files ({shared}); "
                        "give each source its own files"
                    )
            seen[spec.name] = ids
    if len(specs) > 1 or sources[0].corpus is not None:
        _cache_dir(specs[0].data)
    return sources


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _cache_dir(data: DataConfig) -> None:
    try:
        os.makedirs(data.cache_dir, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data.cache_dir={data.cache_dir!r} is not a usable directory: {e.strerror or e}"
        ) from e


def build_tokenizer(sources: list[Source], tok_cfg: TokenizerConfig, once: PrepareOnce | None = None):
    """The one tokenizer of every source: ``tokenizer.path``; else the first prepared store's own; else
    a byte-level BPE of ``tokenizer.train_vocab_size`` trained on the texts of every source (in order)
    and cached under ``<cache_dir>/tokenizers/`` (trained by one process of the job: ``once``).

    Raises:
        DataError: an unloadable tokenizer, an unreadable source, or the preparer's failure.
    """
    if tok_cfg.path:
        return load_tokenizer(tok_cfg.path, tok_cfg.eos_token)
    prepared = [s for s in sources if s.corpus is None]
    if prepared:
        return load_tokenizer(os.path.join(prepared[0].spec.data.path, "tokenizer"))
    key = _short("+".join(s.key() for s in sources))
    cache_dir, vocab = sources[0].spec.data.cache_dir, tok_cfg.train_vocab_size

    def texts():
        for source in sources:
            yield from source.texts()

    target = bpe_cache_dir(cache_dir, key, vocab)
    return (once or PrepareOnce()).make(
        f"train the BPE tokenizer ({vocab} tokens) of {', '.join(s.spec.key for s in sources)}",
        lambda: os.path.isfile(os.path.join(target, "tokenizer.json")),
        lambda: train_bpe_tokenizer(texts, vocab, cache_dir, key),
    )


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_stores(
    sources: list[Source],
    tokenizer,
    tok_cfg: TokenizerConfig,
    once: PrepareOnce | None = None,
    output_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, TokenStore]:
    """Every source's token store, by source name:

    * a prepared directory is memory-mapped as is (its tokenizer must be ``tokenizer`` unless that is
      the store's own);
    * otherwise the corpus is tokenized once into ``<cache_dir>/tokens/<key>`` (or into
      ``output_dir`` for ``prepare_data``); the key hashes the files (path, size, mtime), the text
      field, sample_by, the tokenizer and ``tokenizer.parse_special_tokens``, so a second run starts
      from the cache. On a cold cache one process of the job writes it (``once``).

    Raises:
        DataError: unreadable data, a missing text column, an empty corpus, a store that cannot be
            written (``OSError``: full disk), a tokenizer that does not match a prepared store, or the
            preparer's failure; a mixture's messages name the source.
    """
    once = once or PrepareOnce()
    stores = {}
    for source in sources:
        with naming(source.spec):
            if source.corpus is None:
                stores[source.spec.name] = _prepared(source, tokenizer, tok_cfg, sources)
            else:
                stores[source.spec.name] = _cached(
                    source, tokenizer, tok_cfg, once, output_dir, max_shard_bytes
                )
    return stores


def _prepared(source: Source, tokenizer, tok_cfg: TokenizerConfig, sources: list[Source]) -> TokenStore:
    """A prepared store; its tokenizer checked unless ``tokenizer`` is its own (:func:`build_tokenizer`)."""
    path = source.spec.data.path
    store = open_store(path)
    own = not tok_cfg.path and source is next(s for s in sources if s.corpus is None)
    if not own and tokenizer_fingerprint(tokenizer) != store.meta.get("tokenizer_fingerprint"):
        given = f"tokenizer.path={tok_cfg.path!r}" if tok_cfg.path else "the tokenizer of the other sources"
        fix = (
            "drop tokenizer.path to use the store's own tokenizer"
            if tok_cfg.path
            else f"set tokenizer.path={os.path.join(path, 'tokenizer')} (sources share one tokenizer)"
        )
        raise DataError(f"{given} is not the tokenizer that prepared {path!r}; {fix}")
    return store


def _cached(source: Source, tokenizer, tok_cfg, once: PrepareOnce, output_dir, max_shard_bytes) -> TokenStore:
    """The source's store from the cache, or tokenized into it (into ``output_dir``: always written)."""
    data, fingerprint = source.spec.data, tokenizer_fingerprint(tokenizer)
    specials = "specials-parsed" if tok_cfg.parse_special_tokens else "specials-as-text"
    key = _short(
        f"{FORMAT}|{source.fingerprint()}|{data.text_field}|{data.sample_by}|{fingerprint}|{specials}"
    )
    target = output_dir or os.path.join(data.cache_dir, "tokens", key)

    def write() -> TokenStore:
        if output_dir is None and is_prepared_dir(target):
            return open_store(target)
        ds, column = source.dataset()
        meta = {"source": source.describe(), "tokenizer_fingerprint": fingerprint, "text_field": column}
        try:
            return write_store(
                target,
                ds,
                column,
                tokenizer,
                data.num_proc,
                meta,
                max_shard_bytes,
                tok_cfg.parse_special_tokens,
            )
        except OSError as e:  # a full or read-only disk: one line naming the key, on every rank
            key = "prepare.output_dir" if output_dir else "data.cache_dir"
            raise DataError(f"{key}: writing the token store {target} failed: {e.strerror or e}") from e

    done = (lambda: False) if output_dir else (lambda: is_prepared_dir(target))
    return once.make(f"tokenize {source.spec.key} ({source.describe()}) into {target}", done, write)


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


def split_stores(
    data: DataConfig,
    specs: list[SourceSpec],
    tokenizer,
    stores: dict[str, TokenStore],
    global_batch_size: int,
    need_val: bool,
    seed: int = 0,
) -> DataBundle:
    """The sizes checked (:func:`check_splits`), each store split (the last ``data.val_fraction`` of its
    tokens held out when ``need_val``), several sources blended by their weights
    (:mod:`harness.data.mixture`, ``seed``).

    Raises:
        DataError: the sizes :func:`check_splits` refuses.
    """
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


def token_stores(
    specs: list[SourceSpec], tok_cfg: TokenizerConfig, once: PrepareOnce | None = None
) -> tuple[object, dict[str, TokenStore]]:
    """``(tokenizer, stores by source name)``: sources -> tokenizer -> stores, as one preparation
    (on a cold cache one process of the job prepares, ``once``; the others wait).

    Raises:
        DataError: what :func:`resolve_sources`, :func:`build_tokenizer` and :func:`build_stores` raise.
    """
    once = once or PrepareOnce()
    sources = resolve_sources(specs)
    to_tokenize = any(s.corpus is not None for s in sources)
    with once.preparing(specs[0].data.cache_dir if to_tokenize else None):
        tokenizer = build_tokenizer(sources, tok_cfg, once)
        return tokenizer, build_stores(sources, tokenizer, tok_cfg, once)


def build_data(
    data: DataConfig,
    tok_cfg: TokenizerConfig,
    global_batch_size: int,
    need_val: bool,
    seed: int = 0,
    once: PrepareOnce | None = None,
) -> DataBundle:
    """Tokenize/load every source and split it: the last ``data.val_fraction`` of each source's tokens
    is its validation split; several sources are blended by their weights (:mod:`harness.data.mixture`).
    On a cold cache one process of the job prepares the cache while the others wait (``once``:
    :class:`~harness.data.once.PrepareOnce`; None: this process alone).

    Raises:
        DataError: a source that cannot be read, an empty source, two sources with the same files, the
            sizes :func:`check_splits` refuses, or the preparer's failure; a mixture's messages name
            the source.
    """
    specs = source_specs(data)
    tokenizer, stores = token_stores(specs, tok_cfg, once)
    return split_stores(data, specs, tokenizer, stores, global_batch_size, need_val, seed)


def load_token_store(
    data: DataConfig,
    tok_cfg: TokenizerConfig,
    output_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
):
    """``(tokenizer, TokenStore)`` of ``data.path`` alone, in this process: the steps of
    :func:`build_data` for one source (``output_dir``: write the store there, as ``prepare_data``
    does, instead of the cache).

    * With ``tokenizer.path`` null (and no ``tokenizer``) a byte-level BPE of
      ``tokenizer.train_vocab_size`` is trained on the corpus and cached.

    Raises:
        DataError: missing files, unreadable data, missing text column, empty corpus,
            or a tokenizer that does not match a prepared store.
    """
    (source,) = resolve_sources([SourceSpec("data", data, 1.0, "data.path")])
    tokenizer = build_tokenizer([source], tok_cfg)
    stores = build_stores(
        [source], tokenizer, tok_cfg, output_dir=output_dir, max_shard_bytes=max_shard_bytes
    )
    return tokenizer, stores["data"]
