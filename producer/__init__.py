"""Training side: buffer touched signs, snapshot their rows, store packets, announce them.

`IncrementalProducer` is the public face; `producer.torch_hook.IncrementalUpdateHook` wires it
to a PyTorch model and optimizer (imported separately so this package does not need torch).
"""

import logging

from producer.announce import DirectoryAnnouncer, KafkaAnnouncer
from producer.core import DEFAULT_PRODUCER_ID, IncrementalProducer, Reader
from producer.errors import (
    BackpressureError,
    ProducerClosedError,
    ProducerError,
    UnstoredDataError,
    WriterFailedError,
)
from producer.generation import latest_generation, next_generation
from producer.policy import FlushPolicy
from producer.signset import DenseSignBuffer, SignBuffer

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
