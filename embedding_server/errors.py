"""Errors the embedding client raises: one type, carrying the shard and the gRPC status."""

from __future__ import annotations

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
