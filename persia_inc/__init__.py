"""The persia-inc application: configuration and the `persia-inc` command line."""

import logging

from persia_inc.config import Config, ConfigError, config_from_mapping, load_config

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Config", "ConfigError", "config_from_mapping", "load_config"]
