"""The sharded embedding store, its gRPC service, and the client that routes signs to shards.

Importing the package is cheap and grpc-free: `shard_of`/`splitmix64` (the one sharding
function) live in `embedding_server.sharding`; the client (`embedding_server.client`), the
server (`embedding_server.server`) and the table (`embedding_server.table`, numba) are imported
where they are used.
"""

import logging

from persia_inc.embedding_server.errors import ShardError, ShardIdentityError, WatermarkMovedError
from persia_inc.embedding_server.sharding import group_by_shard, shard_of, splitmix64

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["ShardError", "ShardIdentityError", "WatermarkMovedError", "group_by_shard", "shard_of",
           "splitmix64"]
