"""Reading a file or a mapping into a validated `Config`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from persia_inc.config.errors import ConfigError
from persia_inc.config.persia_layouts import PERSIA_SECTIONS, STORAGE_ALIASES, flatten_persia
from persia_inc.config.schema import Config
from persia_inc.config.typed import build_dataclass, unknown_key
from persia_inc.storage import storage_kind


def config_from_mapping(raw: Any, source: str = "<mapping>") -> Config:
    """Build and validate a `Config` from parsed YAML."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "the top level must be a mapping")
    merged: dict[str, Any] = {}
    nested = flatten_persia(raw, source)
    for key, value in raw.items():
        if key in PERSIA_SECTIONS:
            continue
        if key in nested and nested[key] != value:
            raise ConfigError(source, key, "given both at the top level and in PERSIA's sections")
        merged[key] = value
    for key, value in nested.items():
        if key == "PersiaInferConfig" and isinstance(merged.get(key), dict):
            merged[key] = {**value, **merged[key]}
        else:
            merged.setdefault(key, value)

    renamed = dict(merged)
    if "PersiaInferConfig" in renamed:
        renamed["infer"] = renamed.pop("PersiaInferConfig")
    for internal in ("infer", "source"):  # field names a file never writes
        if internal in merged:
            raise unknown_key(Config, internal, "", source)
    if isinstance(renamed.get("storage"), str):
        renamed["storage"] = STORAGE_ALIASES.get(renamed["storage"].lower(), renamed["storage"])
    config: Config = build_dataclass(Config, renamed, "", source)
    config = dataclasses.replace(config, source=source)
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    source = config.source
    try:
        implied = storage_kind(config.incremental_dir)
    except ValueError as exc:
        raise ConfigError(source, "incremental_dir", str(exc)) from exc
    if implied != config.storage:
        raise ConfigError(
            source, "storage",
            f"is {config.storage!r} but incremental_dir {config.incremental_dir!r} is on {implied!r}",
        )
    addresses: list[str] = []
    for i, entry in enumerate(config.infer.servers):
        replicas = (entry,) if isinstance(entry, str) else entry
        if not replicas:
            raise ConfigError(source, f"PersiaInferConfig.servers[{i}]",
                              "expected host:port or a non-empty list of them (replicas)")
        for r, server in enumerate(replicas):
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                where = f"[{i}]" if isinstance(entry, str) else f"[{i}][{r}]"
                raise ConfigError(source, f"PersiaInferConfig.servers{where}",
                                  f"expected host:port, got {server!r}")
        addresses += replicas
    if len(set(addresses)) != len(addresses):
        raise ConfigError(source, "PersiaInferConfig.servers", "lists one address twice")
    producer = config.persia_inc.producer  # checked itself (ProducerSettings.__post_init__)
    limits = config.persia_inc.limits  # what a loader accepts: never produce more
    if producer.max_packet_rows > limits.max_rows:
        raise ConfigError(source, "persia_inc.producer.max_packet_rows",
                          f"is over persia_inc.limits.max_rows ({limits.max_rows}): "
                          "loaders would refuse such packets")
    if producer.max_packet_bytes > limits.max_bytes:
        raise ConfigError(source, "persia_inc.producer.max_packet_bytes",
                          f"is over persia_inc.limits.max_bytes ({limits.max_bytes}): "
                          "loaders would refuse such packets")
    kafka = config.persia_inc.kafka  # checked itself (KafkaSettings.__post_init__)
    if producer.announce == "kafka" and not kafka.bootstrap_servers:
        raise ConfigError(source, "persia_inc.kafka.bootstrap_servers",
                          "announce is 'kafka' but no bootstrap servers are set")


def load_config(path: str | os.PathLike[str], *, need_servers: bool = False) -> Config:
    """Read and validate a YAML configuration file; `need_servers` also requires
    PersiaInferConfig.servers (for the commands that talk to the embedding servers)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(source, "", "no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "", f"cannot read: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
    config = config_from_mapping(raw, source)
    if need_servers and not config.infer.servers:
        raise ConfigError(source, "PersiaInferConfig.servers",
                          "is empty, and this command talks to the embedding servers")
    return config
