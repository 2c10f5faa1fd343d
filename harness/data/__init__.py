"""Data: sources -> tokenizer -> token stores -> packed sequences -> (mixture) -> per-step batches.

Public surface (the steps live in :mod:`harness.data.build`, in the order they run):
    :func:`source_specs` names the sources of ``data`` (``data.sources``, or ``data.path`` alone);
    :func:`resolve_sources` finds their files; :func:`build_tokenizer` the shared tokenizer;
    :func:`build_stores` every source's token store; :func:`split_stores` the splits and mixture;
    :func:`token_stores` runs the middle three as one preparation (one process per job on a cold
    cache: :class:`PrepareOnce`), :func:`build_data` all of them;
    :func:`load_token_store` tokenizes (or finds cached / prepared) one source in this process;
    :func:`check_splits` is the one check of the sizes (training and ``harness.plan``);
    :class:`StepLoader`, :class:`MicroBatch`, :func:`validation_batches` feed the trainer.
"""

from __future__ import annotations

from harness.data.build import (
    DataBundle,
    Source,
    SourceSpec,
    build_data,
    build_stores,
    build_tokenizer,
    check_splits,
    load_token_store,
    resolve_sources,
    source_specs,
    split_stores,
    token_stores,
)
from harness.data.loader import (
    IGNORE_INDEX,
    MicroBatch,
    PackedSequences,
    StepLoader,
    build_loader,
    validation_batches,
)
from harness.data.mixture import BlendedSequences
from harness.data.once import PrepareOnce
from harness.data.store import TokenStore

__all__ = [
    "IGNORE_INDEX",
    "BlendedSequences",
    "DataBundle",
    "MicroBatch",
    "PackedSequences",
    "PrepareOnce",
    "Source",
    "SourceSpec",
    "StepLoader",
    "TokenStore",
    "build_data",
    "build_loader",
    "build_stores",
    "build_tokenizer",
    "check_splits",
    "load_token_store",
    "resolve_sources",
    "source_specs",
    "split_stores",
    "token_stores",
    "validation_batches",
]
