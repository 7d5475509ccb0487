"""The one config schema and its one loader.

:mod:`avi_scale.config.schema` holds the typed sections (each checks its own keys);
:mod:`avi_scale.config.loading` builds a checked :class:`ExperimentConfig` from the defaults, a YAML file
with its ``base:`` chain and overrides, for every CLI.  See each module's docstring.
"""

from avi_scale.config.loading import (PACKAGED_DIR, RETIRED_KEYS, apply_overrides, from_dict, load_config,
                                      packaged_configs, resolve_config, save_config, to_dict, to_yaml, yaml_layers)
from avi_scale.config.schema import (LIKELIHOODS, NONLOCAL_PLACES, TUNE_METRICS, AttentionConfig, ConfigError,
                                     DataConfig, DeepSpeedConfig, EvalConfig, ExperimentConfig, LoggingConfig, ModelConfig,
                                     OptimConfig, TrainConfig, TuneConfig, require)

__all__ = [
    "LIKELIHOODS", "NONLOCAL_PLACES", "PACKAGED_DIR", "RETIRED_KEYS", "TUNE_METRICS", "AttentionConfig", "ConfigError",
    "DataConfig", "DeepSpeedConfig", "EvalConfig", "ExperimentConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "TrainConfig", "TuneConfig", "apply_overrides", "from_dict", "load_config", "packaged_configs", "require",
    "resolve_config", "save_config",
    "to_dict", "to_yaml", "yaml_layers",
]
