"""Errors the embedding client raises: one type, carrying the shard and the gRPC status."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("persia_inc.embedding_server.client")  # where the client logged it

# gRPC status names a caller may retry after a backoff (the call did not take effect or may
# be repeated safely: Apply is idempotent by watermark, Lookup has no effect).
RETRIABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"})


class ShardError(RuntimeError):
    """A call to one embedding server failed.

    code: the gRPC status name (e.g. 'NOT_FOUND', 'INVALID_ARGUMENT', 'UNAVAILABLE');
    shard: the shard index; address: its host:port; retriable: whether retrying can help.
    """

    def __init__(self, shard: int, address: str, code: str, details: str) -> None:
        self.shard, self.address, self.code, self.details = shard, address, code, details
        self.retriable = code in RETRIABLE_CODES
        super().__init__(f"shard {shard} ({address}): {code}: {details}")


class ShardIdentityError(ShardError):
    """A server is not the shard the client's server list says it is (the list is in another
    order, or has another length than the servers were started with). Never retriable: only
    fixing the configuration helps.

    expected/reported: (shard index, shard count) by the client's list and by the server.
    """

    def __init__(self, shard: int, address: str, expected: tuple[int, int],
                 reported: tuple[int, int], details: str = "") -> None:
        self.expected, self.reported = expected, reported
        text = (f"shard identity mismatch at {address}: the client's server list makes it shard "
                f"{expected[0]} of {expected[1]}, the server reports shard {reported[0]} of "
                f"{reported[1]}; check the order and length of PersiaInferConfig.servers")
        super().__init__(shard, address, "FAILED_PRECONDITION",
                         f"{text}: {details}" if details else text)
        self.retriable = False


def identity_mismatch(target: Any, replicas: int, num_shards: int, model: str, status: Any
                      ) -> ShardError | None:
    """The error (logged) when a server's Status disagrees with the client's list: `target`
    (a routing.Target) is replica target.replica of `replicas` of shard target.shard of
    `num_shards`, serving `model` ('' : any); None when it agrees."""
    reported = (status.replica, status.num_replicas or 1)  # before replicas: 0, one replica
    if (status.shard, status.num_shards) != (target.shard, num_shards) or reported != (
            target.replica, replicas):
        log.error("%s reports itself as shard %d of %d, replica %d of %d; refusing it",
                  target.address, status.shard, status.num_shards, *reported)
        return ShardIdentityError(
            target.shard, target.address, (target.shard, num_shards),
            (status.shard, status.num_shards), f"our list makes it replica {target.replica} of "
            f"{replicas}, it reports replica {reported[0]} of {reported[1]}")
    if model and status.model and status.model != model:
        log.error("%s serves model %r, not %r; refusing it", target.address, status.model, model)
        return ModelIdentityError(target.shard, target.address, model, status.model)
    return None


class ModelIdentityError(ShardError):
    """A server serves another model's rows than the client is for (`persia_inc.model` of the
    server's configuration and of the client's differ). Never retriable."""

    def __init__(self, shard: int, address: str, expected: str, reported: str) -> None:
        self.expected_model, self.reported_model = expected, reported
        super().__init__(shard, address, "FAILED_PRECONDITION",
                         f"model identity mismatch at {address}: this client is for model {expected!r}, "
                         f"the server serves model {reported!r}; check PersiaInferConfig.servers and "
                         "persia_inc.model")
        self.retriable = False


class WatermarkMovedError(ShardError):
    """A conditional apply was refused: the shard holds another position of the stream than
    the caller expected (it restarted from a checkpoint, or another writer moved it). Nothing
    was written; the caller reads the shard's watermarks again and applies what it lacks.

    held: the (generation, sequence) the shard holds, None for nothing.
    """

    def __init__(self, shard: int, address: str, held: tuple[int, int] | None,
                 details: str = "") -> None:
        self.held = held
        super().__init__(shard, address, "ABORTED", details)
