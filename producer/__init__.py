"""Training side: buffer touched signs, snapshot their rows, store packets, announce them.

The public face: `IncrementalProducer` with its `ProducerSettings` and the `Reader` it calls,
and the errors it raises. `persia_inc.producer_from_config` builds one from
global_config.yaml; `persia_inc.producer.IncrementalUpdateHook` wires it to a PyTorch model
and optimizer (loaded on first use, so importing this package does not import torch).
"""

import logging
from typing import TYPE_CHECKING, Any

from persia_inc.producer.core import DEFAULT_PRODUCER_ID, IncrementalProducer, Reader
from persia_inc.producer.errors import (
    BackpressureError,
    NonFiniteRowsWarning,
    ProducerClosedError,
    ProducerError,
    UnstoredDataError,
    WriterFailedError,
)
from persia_inc.producer.settings import ProducerSettings

if TYPE_CHECKING:
    from persia_inc.producer.torch_hook import IncrementalUpdateHook

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    """`IncrementalUpdateHook` on first use: its module imports torch."""
    if name == "IncrementalUpdateHook":
        from persia_inc.producer.torch_hook import IncrementalUpdateHook

        return IncrementalUpdateHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_PRODUCER_ID",
    "BackpressureError",
    "IncrementalProducer",
    "IncrementalUpdateHook",
    "NonFiniteRowsWarning",
    "ProducerClosedError",
    "ProducerError",
    "ProducerSettings",
    "Reader",
    "UnstoredDataError",
    "WriterFailedError",
]
