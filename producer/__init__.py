"""Training side: buffer touched signs, snapshot their rows, store packets, announce them.

`IncrementalProducer` is the public face; `producer.torch_hook.IncrementalUpdateHook` wires it
to a PyTorch model and optimizer (imported separately so this package does not need torch).
"""

import logging

from persia_inc.producer.announce import DirectoryAnnouncer, KafkaAnnouncer
from persia_inc.producer.core import DEFAULT_PRODUCER_ID, IncrementalProducer, Reader
from persia_inc.producer.errors import (
    BackpressureError,
    ProducerClosedError,
    ProducerError,
    UnstoredDataError,
    WriterFailedError,
)
from persia_inc.producer.generation import latest_generation, next_generation
from persia_inc.producer.policy import FlushPolicy
from persia_inc.producer.signset import DenseSignBuffer, SignBuffer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_PRODUCER_ID",
    "BackpressureError",
    "DenseSignBuffer",
    "DirectoryAnnouncer",
    "FlushPolicy",
    "IncrementalProducer",
    "KafkaAnnouncer",
    "ProducerClosedError",
    "ProducerError",
    "Reader",
    "SignBuffer",
    "UnstoredDataError",
    "WriterFailedError",
    "latest_generation",
    "next_generation",
]
