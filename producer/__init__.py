"""Training side: buffer touched signs, snapshot their rows, store packets, announce them.

The public face: `IncrementalProducer` with its `ProducerSettings` and the `Reader` it calls,
and the errors it raises. `persia_inc.producer_from_config` builds one from
global_config.yaml; `persia_inc.producer.torch_hook.IncrementalUpdateHook` wires it to a
PyTorch model and optimizer (imported separately so this package does not need torch).
"""

import logging

from persia_inc.producer.core import DEFAULT_PRODUCER_ID, IncrementalProducer, Reader
from persia_inc.producer.errors import (
    BackpressureError,
    ProducerClosedError,
    ProducerError,
    UnstoredDataError,
    WriterFailedError,
)
from persia_inc.producer.settings import ProducerSettings

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_PRODUCER_ID",
    "BackpressureError",
    "IncrementalProducer",
    "ProducerClosedError",
    "ProducerError",
    "ProducerSettings",
    "Reader",
    "UnstoredDataError",
    "WriterFailedError",
]
