"""Typed run configuration: one dataclass per component, strict YAML, dotted overrides.

    schema.py       the sections (ModelConfig, DataConfig, ...) and Config, each field documented
    loading.py      strict YAML, strict types, `section.key=value` overrides -> Config
    validation.py   Config.validate(world_size): consistency checks and derived values
    reference.py    docs/config.md and `--help-config`, read from the schema
    values.py       helpers the others share (ceil_div, parse_split, Llama's MLP width)

`Config.validate(world_size)` computes every derived value (data parallel size, gradient
accumulation, defaults that depend on other keys) so that the resolved config written into the run
directory is complete and loads back equal.
"""

from megalm.config.loading import apply_overrides, config_from_dict, load_config
from megalm.config.reference import describe, describe_markdown
from megalm.config.schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    ZeroConfig,
)
from megalm.config.validation import validate_model
from megalm.config.values import ceil_div, parse_split

__all__ = [
    "SECTIONS", "CheckpointConfig", "Config", "DataConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "ScheduleConfig", "TrainConfig", "ZeroConfig", "apply_overrides", "ceil_div",
    "config_from_dict", "describe", "describe_markdown", "load_config", "parse_split", "validate_model",
]
