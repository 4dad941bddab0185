"""A producer's generation: 1 + the highest generation it has in storage, so a restarted
process always sorts after everything its earlier lives wrote."""

from __future__ import annotations

import logging

from persia_inc.packet_format import MAX_GENERATION, PacketError, parse_packet_path, stream_prefix
from persia_inc.producer.errors import ProducerError
from persia_inc.storage import ObjectStore

log = logging.getLogger(__name__)


class GenerationOverflowError(ProducerError):
    """The producer's next generation does not fit a packet name: a packet (often a stray
    file) already carries the largest generation. Retrying cannot help; `uri` names it."""

    retriable = False

    def __init__(self, uri: str, producer: str, generation: int) -> None:
        self.uri = uri
        super().__init__(
            f"{uri} has generation {generation}, so producer {producer!r} has no newer generation "
            f"to take (the largest is {MAX_GENERATION}); if that file is stray, move it out of "
            "the incremental_dir and restart")


def latest_generation(store: ObjectStore, model: str, producer: str) -> int | None:
    """The highest generation of `producer`'s packets under `model`, over all tables, or None."""
    latest = _latest(store, model, producer)
    return None if latest is None else latest[0]


def _latest(store: ObjectStore, model: str, producer: str) -> tuple[int, str] | None:
    """(highest generation, the key of a packet carrying it) of `producer` under `model`.

    Lists the model's prefix once (tables are not known up front, and a table written only by
    an earlier generation must still count). Storage errors propagate (the caller retries):
    an outage must never read as "no packets yet".
    """
    best: tuple[int, str] | None = None
    for info in store.list(stream_prefix(model)):
        parts = info.key.split("/")
        if len(parts) != 4 or parts[2] != producer:
            continue
        try:
            packet_id = parse_packet_path(info.key)
        except PacketError:
            log.debug("ignoring non-packet object %s", info.key)
            continue
        if best is None or packet_id.generation > best[0]:
            best = (packet_id.generation, info.key)
    return best


def next_generation(store: ObjectStore, model: str, producer: str) -> int:
    """The generation a new process of `producer` takes: 1 + the latest in storage (1 if none).
    GenerationOverflowError, naming the packet, when the latest is already the largest."""
    latest = _latest(store, model, producer)
    if latest is None:
        return 1
    generation, key = latest
    if generation >= MAX_GENERATION:
        raise GenerationOverflowError(store.location(key), producer, generation)
    return generation + 1
