"""The foundation every layer above may use and which uses none of them: the retry decision,
the thread base, the Kafka adapter, the prefetch intrinsic and small network helpers.

Importing it loads nothing heavy: each module imports its own library (kafka-python, numba)
only when it is itself imported.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
