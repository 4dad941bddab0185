"""What a served model expects: its features, its embedding table, and the request limits.

The sparse features share one embedding table; a sign is put in its feature's namespace by
replacing its top `prefix_bits` bits with the feature's number (1-based), as PERSIA does with
`feature_index_prefix_bit`. Why one table, not one per feature: a request then costs one
deduplicated Lookup per shard (2 RPCs with two shards) instead of one per feature and shard
(52), and the training side writes one packet stream. The price is 2**(64 - prefix_bits)
distinct signs per feature, which hashing ids already assumes. `table_signs` is the one
function that does the prefixing; the producer side calls it too when it records signs.

A `ModelSpec` travels inside the .mar as `persia_model.json` (JSON, never pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SPEC_FILE = "persia_model.json"
CONFIG_FILE = "global_config.yaml"  # the embedding servers, shipped in the .mar
CONFIG_ENV = "PERSIA_INC_CONFIG"  # names a config on the TorchServe process instead
DENSE_COLUMN = "dense"


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on one request, checked before anything is allocated from it.

    max_bytes: request body size; max_rows: samples per request; max_signs: sparse ids over
    all features of one request.
    """

    max_bytes: int = 64 * 1024 * 1024
    max_rows: int = 65_536
    max_signs: int = 8_000_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_rows", "max_signs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RequestLimits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A served model's inputs.

    dense_dim: float32 dense features per sample (column `dense`); sparse: the names of the
    list<uint64> sparse-feature columns, in the model's order; table: the embedding table
    they share; dim: its row width; prefix_bits: top bits of a sign that hold the feature's
    number (0: features share one sign space unchanged).
    """

    dense_dim: int = 13
    sparse: tuple[str, ...] = tuple(f"feature{i + 1}" for i in range(26))
    table: str = "embedding"
    dim: int = 16
    prefix_bits: int = 8
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if self.dense_dim < 0 or self.dim <= 0:
            raise ValueError("dense_dim must be >= 0 and dim > 0")
        if not self.sparse or len(set(self.sparse)) != len(self.sparse):
            raise ValueError("sparse must name at least one feature, each once")
        if DENSE_COLUMN in self.sparse:
            raise ValueError(f"{DENSE_COLUMN!r} is the dense column; rename that sparse feature")
        if not 0 <= self.prefix_bits < 32:
            raise ValueError("prefix_bits must be in [0, 32)")
        if self.prefix_bits and len(self.sparse) >= 1 << self.prefix_bits:
            raise ValueError(f"{len(self.sparse)} features do not fit in {self.prefix_bits} prefix bits")

    def table_signs(self, feature: int, signs: np.ndarray) -> np.ndarray:
        """The table's signs for raw `signs` of sparse feature number `feature` (0-based).

        signs: uint64[n] -> uint64[n] (a new array; the input is not changed).
        """
        signs = np.asarray(signs, dtype=np.uint64)
        if not self.prefix_bits:
            return signs.copy()
        shift = np.uint64(64 - self.prefix_bits)
        mask = np.uint64((1 << (64 - self.prefix_bits)) - 1)
        return (signs & mask) | (np.uint64(feature + 1) << shift)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "<spec>") -> ModelSpec:
        """Parse a spec; ValueError naming `where` and the key for anything wrong."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("the top level must be an object")
            raw = dict(raw)
            raw["limits"] = RequestLimits(**raw.get("limits", {}))
            if "sparse" in raw:
                if not isinstance(raw["sparse"], list) or not all(isinstance(s, str) for s in raw["sparse"]):
                    raise TypeError("sparse must be a list of names")
                raw["sparse"] = tuple(raw["sparse"])
            return cls(**raw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad model spec: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), str(path))
