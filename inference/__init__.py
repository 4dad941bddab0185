"""Serving: the request batch format, the TorchServe handler over a plain-Python engine, the
gRPC/HTTP clients, and the helpers that save, archive and register the dense model.

Importing the package is cheap (numpy, pyarrow): torch, TorchServe and grpc are imported by
the modules that need them (`inference.engine`, `inference.handler`, `inference.client`,
`inference.management`, `inference.archive`, `inference.model`).
"""

import logging

from persia_inc.inference.batch import BatchError, DecodedBatch, PersiaBatch, decode_batch
from persia_inc.inference.spec import (
    FeatureSpec,
    ModelSpec,
    RequestLimits,
    SpecError,
    TableSpec,
    spec_from_module,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["BatchError", "DecodedBatch", "FeatureSpec", "ModelSpec", "PersiaBatch", "RequestLimits",
           "SpecError", "TableSpec", "decode_batch", "spec_from_module"]
