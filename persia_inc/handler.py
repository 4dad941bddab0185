"""The TorchServe handler a .mar names: `inference.handler.PersiaHandler`, reaching the
embedding servers of the deployment's configuration.

The configuration is the one named by `PERSIA_INC_CONFIG` in the TorchServe process's
environment if set (one .mar, many deployments), else `global_config.yaml` shipped in the .mar.
It lives here, on the application layer, because reading YAML is the application's job; the
inference layer only needs a client.
"""

from __future__ import annotations

import os
from pathlib import Path

from persia_inc.config import load_config
from persia_inc.embedding_server.client import EmbeddingClient
from persia_inc.inference.handler import PersiaHandler
from persia_inc.inference.spec import CONFIG_ENV, CONFIG_FILE
from persia_inc.wiring import embedding_client


def config_path(model_dir: str | Path) -> Path:
    """The config the handler reads: `$PERSIA_INC_CONFIG`, else the one in the .mar."""
    named = os.environ.get(CONFIG_ENV)
    return Path(named) if named else Path(model_dir) / CONFIG_FILE


class ConfiguredHandler(PersiaHandler):
    """`PersiaHandler` with the embedding servers of `config_path(model_dir)`."""

    def open_client(self, model_dir: Path) -> tuple[EmbeddingClient, str]:
        path = config_path(model_dir)
        config = load_config(path, need_servers=True)
        return embedding_client(config), f"config {path}"


__all__ = ["ConfiguredHandler", "config_path"]
