"""persia-inc: incremental sparse-embedding updates from a training job to the embedding
servers that serve it.

Everything installs under this one import root: `persia_inc.packet_format`, `.storage`,
`.producer`, `.loader`, `.embedding_server`, `.inference`, and the foundation they stand on,
`.foundation`. This package itself is the application on top: YAML configuration
(`persia_inc.config`), the builders that turn a configuration into components
(`persia_inc.wiring`), the `persia-inc` command and the demo.

Importing `persia_inc` loads nothing else; the names below are imported on first use, so
`import persia_inc.embedding_server.client` does not pull in YAML, boto3 or Kafka.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "Config": "persia_inc.config",
    "ConfigError": "persia_inc.config",
    "config_from_mapping": "persia_inc.config",
    "load_config": "persia_inc.config",
    "embedding_client": "persia_inc.wiring",
    "loader_from_config": "persia_inc.wiring",
    "producer_from_config": "persia_inc.wiring",
}

if TYPE_CHECKING:
    from persia_inc.config import Config, ConfigError, config_from_mapping, load_config
    from persia_inc.wiring import embedding_client, loader_from_config, producer_from_config


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'persia_inc' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "Config",
    "ConfigError",
    "config_from_mapping",
    "embedding_client",
    "load_config",
    "loader_from_config",
    "producer_from_config",
]
