"""Typed run configuration: the schema (dataclasses), YAML loading with includes and overrides."""

from .schema import (ConfigError, DataConfig, EvalConfig, FlowConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig,
                     apply_overrides, from_dict, load_config, reference_markdown)

__all__ = ["ConfigError", "DataConfig", "EvalConfig", "FlowConfig", "ModelConfig", "RunConfig", "TaskConfig",
           "TrainConfig", "apply_overrides", "from_dict", "load_config", "reference_markdown"]
