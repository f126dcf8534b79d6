"""Typed run configuration: the schema (dataclasses), YAML loading with includes and overrides, the reference."""

from .loading import apply_overrides, from_dict, load_config, parse_override, resolve_config, shipped_names
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
           "reference_markdown", "resolve_config", "shipped_names"]
