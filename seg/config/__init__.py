"""Typed run configuration: what it is (:mod:`seg.config.schema`) and how it is read and written
(:mod:`seg.config.files`). Everything a caller needs is importable from ``seg.config``."""

from seg.config.files import apply_overrides, config_from_dict, config_to_dict, load_config, save_config
from seg.config.schema import (CONFIG_VERSION, MODEL_KEYS, Config, ConfigError, DataConfig, EvalConfig, ModelConfig,
                               OptimConfig, TrainConfig, available_cpus, eval_window, inference_settings, validate)

__all__ = ["CONFIG_VERSION", "MODEL_KEYS", "Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "apply_overrides", "available_cpus", "config_from_dict", "config_to_dict",
           "eval_window", "inference_settings", "load_config", "save_config", "validate"]
