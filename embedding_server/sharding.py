"""Which shard owns a sign: `splitmix64(sign) % num_shards`, the one function used everywhere.

The producer, the loader, the client, checkpoint save and checkpoint load all route with
`shard_of`, so a sign lives on the same shard whoever computes it. Pure numpy (no grpc, no
numba), so any part of the project can import it cheaply.

splitmix64 is Steele, Lea and Flood's finalizer (the one `java.util.SplittableRandom` and
xoshiro seeding use): a bijection on 64-bit integers whose every output bit depends on every
input bit, so sequential or clustered feature ids spread evenly over the shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def splitmix64(signs: np.ndarray) -> np.ndarray:
    """splitmix64 of every sign, with wrapping uint64 arithmetic.

    signs: uint64[n] (other integer dtypes are reinterpreted as uint64) -> uint64[n].
    """
    z = np.asarray(signs)
    if z.dtype != np.uint64:
        z = z.astype(np.uint64)
    z = z + _GOLDEN  # a new array: the caller's is never modified
    z ^= z >> np.uint64(30)
    z *= _MUL1
    z ^= z >> np.uint64(27)
    z *= _MUL2
    z ^= z >> np.uint64(31)
    return z


def shard_of(signs: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard of every sign: `splitmix64(sign) % num_shards`.

    signs: uint64[n]; num_shards >= 1 -> int64[n] in [0, num_shards).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    if num_shards == 1:
        return np.zeros(np.asarray(signs).shape, np.int64)
    return (splitmix64(signs) % np.uint64(num_shards)).astype(np.int64)


def group_by_shard(signs: np.ndarray, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """Order signs by shard, keeping request order within a shard.

    signs: uint64[n] -> (order: int64[n], bounds: int64[num_shards + 1]): the signs of shard
    s are `signs[order[bounds[s]:bounds[s + 1]]]`. A stable sort on a small-integer key
    (numpy radix-sorts 8- and 16-bit keys), so it is cheap next to the RPCs it feeds.
    """
    shards = shard_of(signs, num_shards)
    key = shards.astype(np.uint8 if num_shards <= 256 else np.uint16 if num_shards <= 65536
                        else np.int64)
    order = np.argsort(key, kind="stable")
    bounds = np.zeros(num_shards + 1, np.int64)
    np.cumsum(np.bincount(shards, minlength=num_shards), out=bounds[1:])
    return order, bounds


def replica_sets(servers: Sequence[str | Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """Per shard, the addresses of its replicas: `PersiaInferConfig.servers` entries are one
    host:port (PERSIA's form: one replica) or a list of them (the replicas of that shard,
    each holding the whole shard). A plain list of addresses is one replica per shard."""
    out = []
    for index, entry in enumerate(servers):
        replicas = (entry,) if isinstance(entry, str) else tuple(entry)
        if not replicas or not all(isinstance(a, str) and a for a in replicas):
            raise ValueError(f"servers[{index}] must be host:port or a non-empty list of them, "
                             f"got {entry!r}")
        out.append(replicas)
    return tuple(out)
