"""Configuration: ``atoll.toml`` plus ``ATOLL__SECTION__KEY`` environment overrides."""

from atoll.config._load import ENV_PREFIX, ConfigError, LoadedConfig, load_config
from atoll.config._model import AtollConfig, ServiceSection, SystemSection

__all__ = [
    "ENV_PREFIX",
    "AtollConfig",
    "ConfigError",
    "LoadedConfig",
    "ServiceSection",
    "SystemSection",
    "load_config",
]
