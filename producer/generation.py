"""A producer's generation: 1 + the highest generation it has in storage, so a restarted
process always sorts after everything its earlier lives wrote."""

from __future__ import annotations

import logging

from persia_inc.packet_format import PacketError, parse_packet_path, stream_prefix
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)


def latest_generation(store: ObjectStore, model: str, producer: str) -> int | None:
    """The highest generation of `producer`'s packets under `model`, over all tables, or None.

    Lists the model's prefix once (tables are not known up front, and a table written only by
    an earlier generation must still count). Storage errors propagate (the caller retries):
    an outage must never read as "no packets yet".
    """
    best: int | None = None
    for info in store.list(stream_prefix(model)):
        parts = info.key.split("/")
        if len(parts) != 4 or parts[2] != producer:
            continue
        try:
            packet_id = parse_packet_path(info.key)
        except PacketError:
            log.debug("ignoring non-packet object %s", info.key)
            continue
        if best is None or packet_id.generation > best:
            best = packet_id.generation
    return best


def next_generation(store: ObjectStore, model: str, producer: str) -> int:
    """The generation a new process of `producer` takes: 1 + the latest in storage (1 if none)."""
    latest = latest_generation(store, model, producer)
    return 1 if latest is None else latest + 1
