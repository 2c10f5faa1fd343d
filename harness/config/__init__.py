"""Configuration: the schema (one dataclass per section), its validation and Hydra composition.

- :mod:`harness.config.schema`    the sections of ``configs/train.yaml`` as dataclasses
- :mod:`harness.config.validate`  each section's checks, then the cross-section ones (:func:`validate`)

The ground floor: nothing here imports another harness module but :mod:`harness.errors`
(tests/test_layers.py); every part imports its section from here.
- :mod:`harness.config.compose`   the ConfigStore, resolvers, :func:`compose_checked`, one-line errors
"""

from harness.config.compose import (
    CONFIG_DIR,
    check_run_dir,
    compose_checked,
    composition_error,
    default_cache_dir,
    register_schema,
    to_object,
    unknown_keys,
)
from harness.config.schema import (
    HANG_TIMEOUT_KEYS,
    PARALLEL_SCHEMAS,
    BatchSizes,
    BatchWarmupConfig,
    CheckpointConfig,
    DataConfig,
    DDPConfig,
    DeepSpeedConfig,
    EvalConfig,
    FSDPConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    NoneParallelConfig,
    OptimConfig,
    ParallelConfig,
    ProfileConfig,
    ScheduleConfig,
    SourceConfig,
    TokenizerConfig,
    TrainingConfig,
    WandbConfig,
)
from harness.config.validate import (
    check_sources,
    check_tensor_parallel,
    intermediate_size,
    mesh_degrees,
    resolve_batch_sizes,
    validate,
)

__all__ = [
    "CONFIG_DIR",
    "HANG_TIMEOUT_KEYS",
    "PARALLEL_SCHEMAS",
    "BatchSizes",
    "BatchWarmupConfig",
    "CheckpointConfig",
    "DDPConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "FSDPConfig",
    "JobConfig",
    "LoggingConfig",
    "ProfileConfig",
    "ModelConfig",
    "NoneParallelConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "SourceConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "WandbConfig",
    "check_run_dir",
    "check_sources",
    "check_tensor_parallel",
    "compose_checked",
    "composition_error",
    "default_cache_dir",
    "intermediate_size",
    "mesh_degrees",
    "register_schema",
    "resolve_batch_sizes",
    "to_object",
    "unknown_keys",
    "validate",
]
