"""Typed run configuration: the schema (dataclasses), YAML loading with includes and overrides, the reference."""

from .loading import apply_overrides, from_dict, load_config, parse_override
from .reference import reference_markdown
from .schema import (
                     ATTENTION_BACKENDS,
                     TASKS,
                     ConfigError,
                     DataConfig,
                     EvalConfig,
                     FlowConfig,
                     ModelConfig,
                     RunConfig,
                     TaskConfig,
                     TrainConfig,
)

__all__ = ["ATTENTION_BACKENDS", "TASKS", "ConfigError", "DataConfig", "EvalConfig", "FlowConfig", "ModelConfig",
           "RunConfig", "TaskConfig", "TrainConfig", "apply_overrides", "from_dict", "load_config", "parse_override",
           "reference_markdown"]
