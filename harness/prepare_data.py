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

import hydra

from harness.config import CONFIG_DIR, to_object, validate
from harness.data import load_token_store
from harness.errors import ConfigError, HarnessError

log = logging.getLogger("harness")


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
            "prepare.output_dir is not set: give the directory to write, e.g. prepare.output_dir=data/my_corpus"
        )
    target = os.path.abspath(os.path.expanduser(out))
    if (
        os.path.exists(target)
        and not (os.path.isdir(target) and not os.listdir(target))
        and not cfg.prepare.overwrite
    ):
        raise ConfigError(
            f"prepare.output_dir={out!r} already exists and is not an empty directory; choose a new directory "
            "(or add prepare.overwrite=true to replace a token store)"
        )
    start = time.perf_counter()
    _, store = load_token_store(cfg.data, cfg.tokenizer, output_dir=target)
    seconds = time.perf_counter() - start
    log.info("prepared %s tokens in %d documents into %s (%.1f s, %s tokens/s); train with data.path=%s",
             f"{store.num_tokens:,}", store.meta["num_documents"], store.path, seconds,
             f"{store.num_tokens / seconds:,.0f}", store.path)  # fmt: skip
    return store.path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg) -> None:
    try:
        prepare(cfg)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console-script entry (``harness-prepare-data``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
