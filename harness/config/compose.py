"""Hydra composition: the schemas in the ConfigStore, the YAML resolvers, and one-line errors.

``configs/train.yaml`` names its schema through the ``schema`` group (``schema: train`` =
:class:`~harness.config.schema.JobConfig`); a command line with sections of its own (``harness.plan``,
``harness.cluster.slurm``, ``harness.prepare_data``) registers a subclass with those sections and
composes with ``schema=<its name>``. Each ``parallel=<name>`` option extends its backend's schema.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sysconfig
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from harness.config.schema import PARALLEL_SCHEMAS, JobConfig
from harness.errors import ConfigError

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


def default_cache_dir() -> str:
    """Directory for tokenizers and tokenized corpora: ``$HARNESS_CACHE_DIR`` or ``~/.cache/harness``."""
    return os.environ.get("HARNESS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "harness")


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory (the default corpus lives there)."""
    return sysconfig.get_paths()["stdlib"]


OmegaConf.register_new_resolver("stdlib", stdlib_dir, replace=True)
OmegaConf.register_new_resolver("harness_cache", default_cache_dir, replace=True)


def register_schema(name: str, node: type) -> None:
    """Store ``node`` (:class:`JobConfig` or a subclass) as ``schema/<name>`` in Hydra's ConfigStore."""
    ConfigStore.instance().store(group="schema", name=name, node=node, package="_global_")


register_schema("train", JobConfig)
for _name, _node in PARALLEL_SCHEMAS.items():
    ConfigStore.instance().store(group="parallel", name=f"{_name}_schema", node=_node)


def composition_error(e: Exception) -> str:
    """Hydra's multi-line composition error (unknown key, wrong type, bad override) as one line."""
    lines = [" ".join(str(x).split()) for x in (e, e.__cause__) if x is not None and str(x).strip()]
    text = " -- ".join(dict.fromkeys(lines))
    text = text.split(" Config search path:")[0].split(" See https://hydra.cc")[0]
    text = re.sub(r" To append to your config use \+\S+", "", text)
    return text.replace(" full_key:", "; full_key:").split(" object_type=")[0].split(" reference_type=")[0]


def unparsable_override(overrides: list[str]) -> str | None:
    """The error line for the first override Hydra's grammar cannot parse (None when all parse): a
    value with characters the grammar reserves (``<|endoftext|>``: ``<``, ``|``, ``>``) must be quoted
    for Hydra inside the shell's quotes, which the raw ``LexerNoViableAltException`` does not say."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception as e:  # hydra.errors.OverrideParseException and the lexer's errors
            key, _, value = override.partition("=")
            return (
                f"cannot parse the override {override!r} ({' '.join(str(e).split())}); quote a value with "
                f"special characters for Hydra inside the shell's quotes: '{key}=\"{value}\"'"
            )
    return None


def compose_checked(overrides: list[str], schema: str = "train"):
    """Compose ``configs/train.yaml`` with ``overrides`` as the command lines do (Hydra config
    included) onto ``schema/<schema>``, reporting bad input as one :class:`ConfigError` line
    instead of Hydra's multi-line report.

    Raises:
        ConfigError: a composition error (unknown key, wrong type, missing option), a key the
            schema lacks (added with ``+``), or a ``hydra.run.dir`` that is a file.
    """
    from hydra import compose, initialize_config_dir

    extra = [] if schema == "train" else [f"schema={schema}"]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*extra, *overrides], return_hydra_config=True)
            run_dir = str(cfg.hydra.run.dir)
    except Exception as e:  # ConfigCompositionException, OverrideParseException, ValidationError, ...
        raise ConfigError(unparsable_override(overrides) or composition_error(e)) from e
    check_run_dir(run_dir)
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a config key (added with '+'?); see harness/config/schema.py")
    return cfg


def check_run_dir(run_dir: str) -> None:
    """Raises :class:`ConfigError` when the run directory exists as a file."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(
            f"hydra.run.dir={run_dir!r} is a file, not a directory; choose another run directory"
        )


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its dataclass schema does not declare (a ``+key=value`` override
    adds them; Hydra accepts that, the trainer would silently ignore them)."""
    out = []
    schema = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in cfg:
        if key == "hydra":
            continue
        if fields is not None and key not in fields:
            out.append(f"{prefix}{key}")
            continue
        node = cfg._get_node(key)
        if OmegaConf.is_dict(node) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
            out += unknown_keys(node, f"{prefix}{key}.")
    return out


def to_object(cfg: Any) -> JobConfig:
    """A composed DictConfig as its schema's dataclass instance (interpolations resolved)."""
    if isinstance(cfg, JobConfig):
        return cfg
    return OmegaConf.to_object(cfg)
