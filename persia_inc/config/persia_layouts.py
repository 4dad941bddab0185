"""PERSIA's own nested layout (`common_config.infer_config`,
`embedding_parameter_server_config`, ...) lifted to the seed document's flat keys, so a PERSIA
user's file loads unchanged."""

from __future__ import annotations

from typing import Any

from persia_inc.config.errors import ConfigError

# PERSIA's documented keys that we accept and ignore, so its files load unchanged.
_PERSIA_IGNORED = {
    "common_config": {"metrics_config", "job_type", "intent", "checkpointing_config"},
    "embedding_parameter_server_config": {
        "capacity", "num_hashmap_internal_shards", "full_amount_manager_buffer_size",
        "incremental_channel_capacity", "num_persistence_workers", "num_signs_per_file",
    },
}
PERSIA_SECTIONS = {
    "common_config", "embedding_parameter_server_config", "shard_server_config",
    "embedding_worker_config", "middleware_config",
}
_INCREMENTAL_KEYS = ("enable_incremental_update", "incremental_buffer_size", "incremental_dir",
                     "storage")
STORAGE_ALIASES = {"ceph": "ceph", "hdfs": "hdfs", "local": "local"}


def flatten_persia(raw: dict, source: str) -> dict:
    """Lift PERSIA's nested keys to the seed-document form; reject unknown nested keys."""
    flat: dict[str, Any] = {}
    infer: dict[str, Any] = {}
    common = raw.get("common_config") or {}
    if not isinstance(common, dict):
        raise ConfigError(source, "common_config", "expected a mapping")
    known_common = _PERSIA_IGNORED["common_config"] | {
        "infer_config", "servers", "initial_sparse_checkpoint"}
    for key in common:
        if key not in known_common:
            raise ConfigError(source, f"common_config.{key}", "unknown key")
    infer_config = common.get("infer_config") or {}
    if not isinstance(infer_config, dict):
        raise ConfigError(source, "common_config.infer_config", "expected a mapping")
    for key, value in infer_config.items():
        if key == "servers":
            infer["servers"] = value
        elif key in ("embedding_checkpoint", "initial_sparse_checkpoint"):
            infer["initial_sparse_checkpoint"] = value
        else:
            raise ConfigError(source, f"common_config.infer_config.{key}", "unknown key")
    for key in ("servers", "initial_sparse_checkpoint"):
        if key in common:
            infer[key] = common[key]
    for section in ("embedding_parameter_server_config", "shard_server_config"):
        body = raw.get(section) or {}
        if not isinstance(body, dict):
            raise ConfigError(source, section, "expected a mapping")
        for key, value in body.items():
            if key in _INCREMENTAL_KEYS:
                flat[key] = value
            elif key not in _PERSIA_IGNORED["embedding_parameter_server_config"]:
                raise ConfigError(source, f"{section}.{key}", "unknown key")
    for section in ("embedding_worker_config", "middleware_config"):
        body = raw.get(section) or {}
        if not isinstance(body, dict) or set(body) - {"forward_buffer_size"}:
            raise ConfigError(source, section, "expected a mapping with forward_buffer_size only")
    if infer:
        flat["PersiaInferConfig"] = infer
    return flat
