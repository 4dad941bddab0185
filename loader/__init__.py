"""Serving side: watch directories, list storage, consume announcements; verify, order and
hot-apply packets to the embedding servers; replay from storage; report status.

The public face is `Loader` (the daemon) and `LoaderSettings`; `persia_inc.loader_from_config`
builds a loader from global_config.yaml. Importing the package is cheap: `Loader` (and with it
grpc) is imported on first use, watchdog and kafka-python only when a source needs them.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from persia_inc.loader.settings import LoaderSettings

if TYPE_CHECKING:
    from persia_inc.loader.daemon import Loader

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name == "Loader":
        return importlib.import_module("persia_inc.loader.daemon").Loader
    raise AttributeError(f"module 'persia_inc.loader' has no attribute {name!r}")


__all__ = ["Loader", "LoaderSettings"]
