"""Build components from a loaded `Config`: the one place that reads the whole configuration
on behalf of the layers below, which take only their typed settings and collaborators."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any

from persia_inc.config import Config, load_config

MAR_HANDLER = "persia_inc.handler.ConfiguredHandler"
"""The handler class a .mar of this application subclasses (`archive_model(handler=...)`): the
inference layer's handler reaching the servers of the deployment's configuration."""

if TYPE_CHECKING:
    from persia_inc.embedding_server.client import EmbeddingClient
    from persia_inc.loader.daemon import Loader
    from persia_inc.producer.core import IncrementalProducer


def _config(config: Config | str | os.PathLike[str]) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def embedding_client(config: Config | str | os.PathLike[str]) -> EmbeddingClient:
    """A client of `PersiaInferConfig.servers` with `persia_inc.embedding_server`'s token, TLS
    roots, deadline and message limit."""
    from persia_inc.embedding_server.client import EmbeddingClient

    config = _config(config)
    return EmbeddingClient.from_settings(config.infer.servers, config.persia_inc.embedding_server,
                                         model=config.persia_inc.model)


def producer_from_config(config: Config | str | os.PathLike[str], **overrides: Any) -> IncrementalProducer:
    """The training side's producer for `config` (a `Config` or a path to global_config.yaml).

    An override named after a `ProducerSettings` field (e.g. producer_id, metrics_port)
    replaces that setting (None keeps it), checked as the same key in YAML is; the others go to
    `IncrementalProducer` (e.g. model, store, generation, clock). Without `store` it opens
    `incremental_dir` and closes it at `close()`.
    """
    from persia_inc.producer.core import IncrementalProducer
    from persia_inc.producer.settings import ProducerSettings

    config = _config(config)
    s = config.persia_inc
    settings = overrides.pop("settings", None) or s.producer
    names = {f.name for f in dataclasses.fields(ProducerSettings)}
    replaced = {k: v for k in list(overrides) if k in names and (v := overrides.pop(k)) is not None}
    if replaced:
        settings = dataclasses.replace(settings, **replaced)  # __post_init__ checks them
    kwargs: dict[str, Any] = {
        "model": s.model, "settings": settings, "buffer_size": config.incremental_buffer_size,
        "enabled": config.enable_incremental_update, "kafka": s.kafka, "retry": s.retry,
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None or k == "store"})
    if kwargs.get("model") is None:
        kwargs["model"] = s.model
    if "store" not in kwargs or kwargs["store"] is None:
        kwargs["store"] = config.open_store() if config.enable_incremental_update else None
        kwargs["owns_store"] = True
    return IncrementalProducer(**kwargs)


def loader_from_config(config: Config | str | os.PathLike[str], client: EmbeddingClient,
                       **overrides: Any) -> Loader:
    """The serving side's loader daemon for `config`, applying through `client` (not closed by
    the loader). overrides go to `Loader` (e.g. store, clock), except `source`, which replaces
    `persia_inc.loader.source` (None: keep it); without `store` it opens `incremental_dir` and
    closes it at `close()`. Announcements are read from Kafka when the producers announce there
    (`persia_inc.producer.announce: kafka`) or the loader's source says so."""
    from persia_inc.loader.daemon import Loader

    config = _config(config)
    s = config.persia_inc
    source = overrides.pop("source", None)
    settings = overrides.pop("settings", None) or s.loader
    if source is not None:
        settings = dataclasses.replace(settings, source=source)
    kafka_wanted = s.producer.announce == "kafka" or settings.source == "kafka"
    kwargs: dict[str, Any] = {
        "model": s.model, "settings": settings, "limits": s.limits,
        "kafka": s.kafka if kafka_wanted else None,
        "clear_token": s.embedding_server.write_token(),
    }
    kwargs.update(overrides)
    dense = settings.dense_sync
    if dense.enabled and kwargs.get("dense_management") is None:
        from persia_inc.dense import management_client

        kwargs["dense_management"] = management_client(dense.management_address, dense.frontend,
                                                       timeout_s=dense.register_timeout_s)
    if dense.enabled and kwargs.get("dense_validator") is None:
        from persia_inc.dense import version_probe

        kwargs["dense_validator"] = version_probe(
            dense.management_address if dense.frontend == "kserve" else dense.inference_address,
            log_dir=dense.log_dir, frontend=dense.frontend)
    if kwargs.get("store") is None:
        kwargs["store"] = config.open_store()
        kwargs["owns_store"] = True
    return Loader(client, **kwargs)


def serve_shard(config: Config, shard_index: int, *, replica: int = 0,
                stop: threading.Event | None = None) -> int:
    """Run replica `replica` of embedding-server shard `shard_index` of `config` until SIGTERM
    (or `stop`)."""
    from persia_inc.embedding_server.server import serve

    s = config.persia_inc
    return serve(config.infer.servers, shard_index, settings=s.embedding_server, limits=s.limits,
                 open_store=config.open_store, initial_checkpoint=config.infer.initial_sparse_checkpoint,
                 stop=stop, replica=replica, model=s.model)


__all__ = ["embedding_client", "loader_from_config", "producer_from_config", "serve_shard"]
