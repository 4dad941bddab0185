"""Serving side: watch directories, list storage, consume announcements; verify, order and
hot-apply packets to the embedding servers; replay from storage; report status.

Importing the package is cheap; the daemon pulls in grpc (through the embedding client) and
watchdog / kafka-python only when it starts a source that needs them.
"""

import logging

from persia_inc.loader.fetch import Fetched, Quarantine, VerificationError, fetch_packet
from persia_inc.loader.ordering import Action, Decision, Offer, Ordering

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Action",
    "Decision",
    "Fetched",
    "Offer",
    "Ordering",
    "Quarantine",
    "VerificationError",
    "fetch_packet",
]
