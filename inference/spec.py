"""What a served model expects: its dense width, its sparse features, the embedding table each
feature reads, and the request limits.

Any table layout: one table per feature (the demo's `C1`..`C26`), one table shared by every
feature, or groups of features sharing a table; each table has its own row width. Features
that share a table with `prefix_bits > 0` are put in their own sign namespaces: a sign's top
`prefix_bits` bits are replaced with the feature's number within the table (1-based, in
feature order), as PERSIA does with `feature_index_prefix_bit`. A table with `prefix_bits` 0
takes the raw ids as its signs unchanged (the identity: what the demo's producer records for
its per-feature tables, where row r's sign is r).

`ModelSpec.table_signs` is the one function turning raw ids into table signs; the training
side calls it when it records signs, the server when it decodes a request.
`spec_from_module` derives a spec from a PyTorch model's nn.Embedding / nn.EmbeddingBag
modules, so nobody writes one by hand.

The dense model's input (see `ModelSpec.sparse_shape`): dense float32[b, dense_dim] and the
sum-pooled embeddings, float32[b, n_features, dim] when every feature's table has the same
dim, else float32[b, sum of the features' dims] (feature-major concatenation, feature order).
`sparse.flatten(1)` is the same [b, sum(dims)] matrix in both cases.

A `ModelSpec` travels inside the .mar as `persia_model.json` (JSON, never pickle). Format
version 2 (`version`, `dense_dim`, `tables`, `features`, `limits`); a file without `version`
is version 1 (`sparse`, `table`, `dim`, `prefix_bits`: one shared table) and still loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:
    from torch import nn

SPEC_FILE = "persia_model.json"
SPEC_VERSION = 2
CONFIG_FILE = "global_config.yaml"  # the embedding servers, shipped in the .mar
CONFIG_ENV = "PERSIA_INC_CONFIG"  # names a config on the TorchServe process instead
DENSE_COLUMN = "dense"
DEFAULT_FEATURES = tuple(f"feature{i + 1}" for i in range(26))  # the seed document's names


class SpecError(ValueError):
    """A malformed model spec; `key` names the offending entry (e.g. 'features[3].table')."""

    def __init__(self, key: str, reason: str, where: str = "") -> None:
        self.key, self.reason = key, reason
        message = f"{key}: {reason}" if key else reason
        super().__init__(f"{where}: bad model spec: {message}" if where else message)


def _positive_int(key: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


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
            _positive_int(f"limits.{name}", getattr(self, name))


@dataclass(frozen=True, slots=True)
class TableSpec:
    """An embedding table: its name on the embedding servers, its row width, and the top
    bits of a sign that hold the feature's number (0: ids are signs unchanged)."""

    name: str
    dim: int
    prefix_bits: int = 0


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """A sparse feature: its request column (list<uint64>) and the table it reads."""

    name: str
    table: str


@dataclass(frozen=True)
class ModelSpec:
    """A served model's inputs: dense_dim float32 dense features per sample (column `dense`),
    `features` in the model's order, the `tables` they read, and the request limits.

    The default is the seed document's model: 26 features `feature1`..`feature26` sharing one
    table `embedding` of dim 16 with 8 prefix bits.
    """

    dense_dim: int = 13
    features: tuple[FeatureSpec, ...] = tuple(FeatureSpec(n, "embedding") for n in DEFAULT_FEATURES)
    tables: tuple[TableSpec, ...] = (TableSpec("embedding", 16, 8),)
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if isinstance(self.dense_dim, bool) or not isinstance(self.dense_dim, int) or self.dense_dim < 0:
            raise SpecError("dense_dim", f"must be an integer >= 0, got {self.dense_dim!r}")
        if not self.tables:
            raise SpecError("tables", "must name at least one table")
        names: set[str] = set()
        for i, table in enumerate(self.tables):
            if not isinstance(table.name, str) or not table.name:
                raise SpecError(f"tables[{i}].name", f"must be a non-empty string, got {table.name!r}")
            if table.name in names:
                raise SpecError(f"tables[{i}].name", f"table {table.name!r} is given twice")
            names.add(table.name)
            _positive_int(f"tables[{i}].dim", table.dim)
            if isinstance(table.prefix_bits, bool) or not isinstance(table.prefix_bits, int) \
                    or not 0 <= table.prefix_bits < 32:
                raise SpecError(f"tables[{i}].prefix_bits", f"must be an integer in [0, 32), got "
                                                            f"{table.prefix_bits!r}")
        if not self.features:
            raise SpecError("features", "must name at least one sparse feature")
        seen: set[str] = set()
        for i, feature in enumerate(self.features):
            if not isinstance(feature.name, str) or not feature.name:
                raise SpecError(f"features[{i}].name", f"must be a non-empty string, got {feature.name!r}")
            if feature.name in seen:
                raise SpecError(f"features[{i}].name", f"feature {feature.name!r} is given twice")
            if feature.name == DENSE_COLUMN:
                raise SpecError(f"features[{i}].name", f"{DENSE_COLUMN!r} is the dense column; rename "
                                                       f"that sparse feature")
            seen.add(feature.name)
            if feature.table not in names:
                raise SpecError(f"features[{i}].table", f"no table named {feature.table!r} in tables")
        for i, table in enumerate(self.tables):
            count = len(self.features_of(table.name))
            if not count:
                raise SpecError(f"tables[{i}]", f"table {table.name!r} is read by no feature")
            if table.prefix_bits and count >= 1 << table.prefix_bits:
                raise SpecError(f"tables[{i}].prefix_bits", f"{count} features of table {table.name!r} "
                                                            f"do not fit in {table.prefix_bits} bits")

    # ------------------------------------------------------------------ layouts

    @classmethod
    def shared_table(cls, sparse: Sequence[str] = DEFAULT_FEATURES, *, dense_dim: int = 13,
                     table: str = "embedding", dim: int = 16, prefix_bits: int = 8,
                     limits: RequestLimits | None = None) -> ModelSpec:
        """Every feature in one table, each in its own sign namespace (prefix_bits > 0)."""
        return cls(dense_dim, tuple(FeatureSpec(n, table) for n in sparse),
                   (TableSpec(table, dim, prefix_bits),), limits or RequestLimits())

    @classmethod
    def per_feature(cls, dims: Mapping[str, int], *, dense_dim: int = 13,
                    limits: RequestLimits | None = None) -> ModelSpec:
        """One table per feature, named as the feature; dims: feature -> row width, in order."""
        return cls(dense_dim, tuple(FeatureSpec(n, n) for n in dims),
                   tuple(TableSpec(n, d) for n, d in dims.items()), limits or RequestLimits())

    @cached_property
    def sparse(self) -> tuple[str, ...]:
        """The sparse features' column names, in the model's order."""
        return tuple(f.name for f in self.features)

    @cached_property
    def _tables(self) -> dict[str, TableSpec]:
        return {t.name: t for t in self.tables}

    @cached_property
    def _index(self) -> dict[str, int]:
        return {f.name: i for i, f in enumerate(self.features)}

    def table(self, name: str) -> TableSpec:
        """The table called `name`; KeyError if the spec has none."""
        return self._tables[name]

    def features_of(self, table: str) -> list[int]:
        """Indices (0-based, model order) of the features reading `table`."""
        return [i for i, f in enumerate(self.features) if f.table == table]

    def feature_table(self, feature: int | str) -> TableSpec:
        return self._tables[self.features[self._feature_index(feature)].table]

    @cached_property
    def dims(self) -> tuple[int, ...]:
        """Row width of each feature's table, in feature order."""
        return tuple(self._tables[f.table].dim for f in self.features)

    @property
    def uniform_dim(self) -> int | None:
        """The one dim of every feature's table, None when they differ."""
        return self.dims[0] if len(set(self.dims)) == 1 else None

    def sparse_shape(self, rows: int) -> tuple[int, ...]:
        """Shape of the dense model's pooled sparse input for `rows` samples:
        (rows, n_features, dim) with one dim for all, else (rows, sum(dims))."""
        dim = self.uniform_dim
        return (rows, len(self.features), dim) if dim is not None else (rows, sum(self.dims))

    def _feature_index(self, feature: int | str) -> int:
        if isinstance(feature, str):
            try:
                return self._index[feature]
            except KeyError:
                raise KeyError(f"no sparse feature {feature!r} in the spec") from None
        if not 0 <= feature < len(self.features):
            raise IndexError(f"feature {feature} out of range [0, {len(self.features)})")
        return feature

    def table_signs(self, feature: int | str, ids: np.ndarray) -> np.ndarray:
        """The signs in its table of `ids` of sparse feature `feature` (0-based index or name).

        ids: uint64[n] (or non-negative integers) -> uint64[n], a new array. Identity for a
        table with prefix_bits 0; else the top prefix_bits bits become the feature's 1-based
        number among its table's features.
        """
        index = self._feature_index(feature)
        table = self._tables[self.features[index].table]
        ids = np.asarray(ids)
        if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
            raise ValueError(f"feature {self.features[index].name!r}: negative ids")
        signs = ids.astype(np.uint64, copy=True)
        if not table.prefix_bits:
            return signs
        number = self.features_of(table.name).index(index) + 1
        shift = np.uint64(64 - table.prefix_bits)
        signs &= np.uint64((1 << (64 - table.prefix_bits)) - 1)
        signs |= np.uint64(number) << shift
        return signs

    def signs_by_table(self, ids_by_feature: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """table -> uint64[n] the table signs of `ids_by_feature` (feature name -> ids), the
        features of a table concatenated in model order (for recording updates)."""
        out: dict[str, list[np.ndarray]] = {}
        for name in self.sparse:
            if name in ids_by_feature:
                ids = np.asarray(ids_by_feature[name]).reshape(-1)
                out.setdefault(self.feature_table(name).name, []).append(self.table_signs(name, ids))
        unknown = set(ids_by_feature) - set(self.sparse)
        if unknown:
            raise KeyError(f"no sparse feature(s) {sorted(unknown)} in the spec")
        return {t: np.concatenate(parts) for t, parts in out.items()}

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, "dense_dim": self.dense_dim,
                "tables": [asdict(t) for t in self.tables],
                "features": [asdict(f) for f in self.features],
                "limits": asdict(self.limits)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw: object) -> ModelSpec:
        """A spec from parsed JSON (version 2, or version 1 without `version`); SpecError
        naming the key for anything wrong."""
        if not isinstance(raw, dict):
            raise SpecError("", "the top level must be an object")
        limits = _limits(raw.get("limits", {}))
        if "version" not in raw:
            return _from_v1(raw, limits)
        if raw["version"] != SPEC_VERSION:
            raise SpecError("version", f"unsupported spec version {raw['version']!r} (this reads "
                                       f"1 and {SPEC_VERSION})")
        _no_unknown("", raw, {"version", "dense_dim", "tables", "features", "limits"})
        tables = tuple(TableSpec(**_entry(f"tables[{i}]", t, {"name", "dim"}, {"prefix_bits"}))
                       for i, t in enumerate(_list("tables", raw.get("tables"))))
        features = tuple(FeatureSpec(**_entry(f"features[{i}]", f, {"name", "table"}, set()))
                         for i, f in enumerate(_list("features", raw.get("features"))))
        return cls(raw.get("dense_dim", 0), features, tables, limits)

    @classmethod
    def from_json(cls, text: str, where: str = "<spec>") -> ModelSpec:
        """Parse a spec; ValueError (a SpecError) naming `where` and the key."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise SpecError("", f"not JSON: {exc}", where) from exc
        try:
            return cls.from_dict(raw)
        except SpecError as exc:
            raise SpecError(exc.key, exc.reason, where) from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), str(path))


def _no_unknown(where: str, raw: Mapping[str, object], known: set[str]) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise SpecError(key, f"unknown key (known: {', '.join(sorted(known))})")


def _list(key: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise SpecError(key, f"must be a list, got {type(value).__name__}")
    return value


def _entry(key: str, value: object, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(key, f"must be an object, got {type(value).__name__}")
    _no_unknown(key, value, required | optional)
    for name in sorted(required - set(value)):
        raise SpecError(f"{key}.{name}", "missing")
    return dict(value)


def _limits(value: object) -> RequestLimits:
    if not isinstance(value, dict):
        raise SpecError("limits", f"must be an object, got {type(value).__name__}")
    _no_unknown("limits", value, {"max_bytes", "max_rows", "max_signs"})
    return RequestLimits(**value)


def _from_v1(raw: Mapping[str, Any], limits: RequestLimits) -> ModelSpec:
    """Version 1: every feature in one table (`table`, `dim`, `prefix_bits`)."""
    _no_unknown("", raw, {"dense_dim", "sparse", "table", "dim", "prefix_bits", "limits"})
    sparse = raw.get("sparse", list(DEFAULT_FEATURES))
    if not isinstance(sparse, list) or not all(isinstance(s, str) for s in sparse):
        raise SpecError("sparse", "must be a list of names")
    return ModelSpec.shared_table(sparse, dense_dim=raw.get("dense_dim", 13),
                                  table=raw.get("table", "embedding"), dim=raw.get("dim", 16),
                                  prefix_bits=raw.get("prefix_bits", 8), limits=limits)


def embedding_tables(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Embedding / nn.EmbeddingBag of `model`, by module path, in registration order."""
    from torch import nn

    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Embedding | nn.EmbeddingBag)}


def spec_from_module(model: nn.Module, *, dense_dim: int,
                     feature_order: Iterable[str | tuple[str, str]] | None = None,
                     tables: Mapping[str, nn.Module] | None = None, prefix_bits: int = 8,
                     limits: RequestLimits | None = None) -> ModelSpec:
    """The spec of a PyTorch model, from its embedding modules.

    tables: table name -> nn.Embedding / nn.EmbeddingBag (default: `embedding_tables(model)`,
    named by module path); feature_order: the sparse features in the dense model's order,
    each a table name (a feature named as its table) or a (feature, table) pair (default:
    one feature per table, named as it). A table read by several features gets
    `prefix_bits`; a table of one feature gets 0 (ids are its signs).
    """
    from torch import nn

    modules = dict(tables) if tables is not None else embedding_tables(model)
    for name, module in modules.items():
        if not isinstance(module, nn.Embedding | nn.EmbeddingBag):
            raise SpecError(f"tables.{name}", f"is a {type(module).__name__}, not an nn.Embedding "
                                              f"or nn.EmbeddingBag")
        if isinstance(module, nn.EmbeddingBag) and module.mode != "sum":
            raise SpecError(f"tables.{name}", f"pools with mode {module.mode!r}; serving sum-pools")
    if not modules:
        raise SpecError("tables", f"{type(model).__name__} has no nn.Embedding or nn.EmbeddingBag")
    pairs = [(entry, entry) if isinstance(entry, str) else (str(entry[0]), str(entry[1]))
             for entry in (feature_order if feature_order is not None else modules)]
    used = [table for _, table in pairs]
    specs = tuple(TableSpec(name, cast("nn.Embedding | nn.EmbeddingBag", module).embedding_dim,
                            prefix_bits if used.count(name) > 1 else 0)
                  for name, module in modules.items() if name in used)
    return ModelSpec(dense_dim, tuple(FeatureSpec(f, t) for f, t in pairs), specs,
                     limits or RequestLimits())


__all__ = ["CONFIG_ENV", "CONFIG_FILE", "DENSE_COLUMN", "SPEC_FILE", "SPEC_VERSION", "FeatureSpec",
           "ModelSpec", "RequestLimits", "SpecError", "TableSpec", "embedding_tables", "spec_from_module"]
