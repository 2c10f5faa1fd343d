"""``python -m harness.prepare_data [hydra overrides] prepare.output_dir=DIR``

Tokenizes the corpus that ``data.*`` / ``tokenizer.*`` name (with ``data.num_proc`` worker
processes) into a token store at ``prepare.output_dir``. Training with ``data.path=DIR``
memory-maps it, so a large corpus is tokenized once, not per run or per rank.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field

from harness.config import JobConfig, compose_checked, register_schema, to_object, validate
from harness.data import load_token_store
from harness.errors import ConfigError, HarnessError

log = logging.getLogger("harness")


@dataclass
class PrepareConfig:
    # python -m harness.prepare_data writes the token store here
    output_dir: str | None = None
    # replace an existing token store at output_dir
    overwrite: bool = False
    # the largest shard file (MiB); a corpus is written as many shards of at most this size
    max_shard_mb: float = 1024.0


@dataclass
class PrepareJobConfig(JobConfig):
    """The corpus and tokenizer sections of a run plus where to write the store (``schema/prepare``)."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)


register_schema("prepare", PrepareJobConfig)


def prepare(cfg) -> str:
    """Write the token store; returns its directory.

    Raises:
        HarnessError: ``prepare.output_dir`` unset, or a data/tokenizer problem.
    """
    cfg = to_object(cfg)
    validate(cfg)
    out = cfg.prepare.output_dir
    if not out:
        raise ConfigError(
            "prepare.output_dir is not set: give the directory to write, e.g. "
            "prepare.output_dir=data/my_corpus"
        )
    target = os.path.abspath(os.path.expanduser(out))
    if (
        os.path.exists(target)
        and not (os.path.isdir(target) and not os.listdir(target))
        and not cfg.prepare.overwrite
    ):
        raise ConfigError(
            f"prepare.output_dir={out!r} already exists and is not an empty directory; choose a new "
            "directory "
            "(or add prepare.overwrite=true to replace a token store)"
        )
    start = time.perf_counter()
    if cfg.data.sources:
        raise ConfigError(
            "prepare_data writes one source (data.path); prepare each source of data.sources on "
            "its own and give the stores as the sources' paths"
        )
    if not cfg.prepare.max_shard_mb >= 0.01:
        raise ConfigError(
            f"prepare.max_shard_mb={cfg.prepare.max_shard_mb} must be >= 0.01 (10 KiB; shards of about 1024 "
            "MB suit file systems best)"
        )
    max_bytes = int(cfg.prepare.max_shard_mb * 2**20)
    _, store = load_token_store(cfg.data, cfg.tokenizer, output_dir=target, max_shard_bytes=max_bytes)
    seconds = time.perf_counter() - start
    log.info(
        "prepared %s tokens in %d documents into %s (%.1f s, %s tokens/s); train with data.path=%s",
        f"{store.num_tokens:,}",
        store.meta["num_documents"],
        store.path,
        seconds,
        f"{store.num_tokens / seconds:,.0f}",
        store.path,
    )
    return store.path


def main(argv: list[str] | None = None) -> int:
    """Console-script entry (``harness-prepare-data``): 0 with the store written, 2 with one ``error:``
    line."""
    from omegaconf import open_dict

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        composed = compose_checked(argv, schema="prepare")
        with open_dict(composed):
            del composed["hydra"]
        prepare(composed)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); no store was written (a rerun starts over)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
