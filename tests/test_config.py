"""global_config.yaml: both PERSIA shapes, our section, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from persia_inc.config import Config, ConfigError, config_from_mapping, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "global_config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["global_config.yaml", "examples/persia_nested.yaml",
                                  "examples/ceph_kafka.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(REPO / "configs" / name)
    assert config.infer.servers == ("127.0.0.1:8000", "127.0.0.1:8001")
    assert config.enable_incremental_update is True


def test_seed_document_form(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
PersiaInferConfig:
  servers:
    - emb_server_1:8000
    - emb_server_2:8000
  initial_sparse_checkpoint: /your/sparse/model/dir
enable_incremental_update: true
incremental_buffer_size: 1000
incremental_dir: hdfs://nn:9870/persia/inc
storage: hdfs
"""))
    assert config.infer.servers == ("emb_server_1:8000", "emb_server_2:8000")
    assert config.infer.initial_sparse_checkpoint == "/your/sparse/model/dir"
    assert (config.incremental_buffer_size, config.storage) == (1000, "hdfs")
    assert config.persia_inc.producer.flush_interval_s == 30.0  # defaults fill our section


def test_persia_repository_form_is_read_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
common_config:
  metrics_config: {enable_metrics: true, push_interval_sec: 10}
  job_type: Infer
  infer_config:
    servers: [10.0.0.1:8000]
    embedding_checkpoint: s3://persia/ckpt
embedding_parameter_server_config:
  capacity: 1000000
  num_hashmap_internal_shards: 1
  enable_incremental_update: true
  incremental_buffer_size: 5000000
  incremental_channel_capacity: 1000
  incremental_dir: s3://persia/inc
  storage: Ceph
embedding_worker_config:
  forward_buffer_size: 1000
"""))
    assert config.infer.servers == ("10.0.0.1:8000",)
    assert config.infer.initial_sparse_checkpoint == "s3://persia/ckpt"
    assert (config.incremental_buffer_size, config.incremental_dir) == (5000000, "s3://persia/inc")
    assert config.storage == "ceph"


def test_our_section_is_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
incremental_dir: /data/inc
persia_inc:
  model: ctr
  producer: {flush_interval_s: 2, announce: kafka, backpressure: raise}
  kafka: {bootstrap_servers: 127.0.0.1:9092, session_timeout_ms: 2000, heartbeat_interval_ms: 500}
  retry: {max_attempts: 3}
  limits: {max_dim: 128}
"""))
    inc = config.persia_inc
    assert inc.producer.flush_interval_s == 2.0 and isinstance(inc.producer.flush_interval_s, float)
    assert inc.kafka.bootstrap_servers == ("127.0.0.1:9092",)
    assert inc.kafka.topic_for("ctr") == "persia-inc.ctr"
    assert inc.retry.max_attempts == 3 and inc.limits.max_dim == 128


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("incremental_buffer_size: lots", "incremental_buffer_size", "expected an integer"),
    ("enable_incremental_update: 'yes'", "enable_incremental_update", "true or false"),
    ("surprise: 1", "surprise", "unknown key"),
    ("persia_inc: {producer: {flush_every: 3}}", "persia_inc.producer.flush_every", "unknown key"),
    ("persia_inc: {producer: {announce: carrier-pigeon}}", "persia_inc.producer.announce",
     "one of 'dir', 'kafka'"),
    ("PersiaInferConfig: {servers: [a:1, 'no-port']}", "PersiaInferConfig.servers[1]", "host:port"),
    ("PersiaInferConfig: {servers: [a:1, a:1]}", "PersiaInferConfig.servers", "twice"),
    ("PersiaInferConfig: {servers: [1, 2]}", "PersiaInferConfig.servers[0]", "a string"),
    ("incremental_dir: s3://b/inc\nstorage: hdfs", "storage", "'ceph'"),
    ("incremental_dir: /data\nstorage: ceph", "storage", "'local'"),
    ("incremental_dir: gs://b/x", "incremental_dir", "unsupported storage URI"),
    ("storage: tape", "storage", "one of"),
    ("incremental_buffer_size: 0", "incremental_buffer_size", "positive"),
    ("persia_inc: {kafka: {session_timeout_ms: 1000, heartbeat_interval_ms: 2000}}",
     "persia_inc.kafka.heartbeat_interval_ms", "below session_timeout_ms"),
    ("persia_inc: {retry: {max_attempts: 0}}", "persia_inc.retry", "max_attempts"),
    ("persia_inc: {model: 'a/b'}", "persia_inc.model", "must be 1-128"),
    ("persia_inc: {producer: {writer_nice: 20}}", "persia_inc.producer.writer_nice", "[0, 19]"),
    ("embedding_parameter_server_config: {bogus: 1}", "embedding_parameter_server_config.bogus",
     "unknown key"),
    ("common_config: {infer_config: {serverz: []}}", "common_config.infer_config.serverz",
     "unknown key"),
    ("- just\n- a list", "", "top level must be a mapping"),
])
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_the_same_key_in_both_shapes_must_agree() -> None:
    with pytest.raises(ConfigError, match="both at the top level and in PERSIA's sections"):
        config_from_mapping({"incremental_buffer_size": 5,
                             "embedding_parameter_server_config": {"incremental_buffer_size": 6}})


def test_missing_and_unparsable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [unclosed"))


def test_yaml_cannot_construct_python_objects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "incremental_dir: !!python/object/apply:os.system ['true']"))


def test_config_is_frozen_and_defaults_are_not_shared() -> None:
    a, b = Config(), Config()
    with pytest.raises(AttributeError):
        a.storage = "hdfs"  # type: ignore[misc]
    assert a.persia_inc is not b.persia_inc or a.persia_inc == b.persia_inc


def test_credentials_in_config_are_not_in_its_repr(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
incremental_dir: s3://b/inc
storage: ceph
persia_inc: {s3: {access_key_id: AKIASECRETID, secret_access_key: sup3rs3cret}}
"""))
    assert "sup3rs3cret" not in repr(config) and "AKIASECRETID" not in repr(config)


def test_serving_commands_require_servers(tmp_path: Path) -> None:
    path = write(tmp_path, "incremental_dir: /data/inc\n")
    assert load_config(path).infer.servers == ()
    with pytest.raises(ConfigError) as info:
        load_config(path, need_servers=True)
    assert info.value.key == "PersiaInferConfig.servers"


@pytest.mark.parametrize(("key", "value"), [
    ("producer_id", "a/b"), ("producer_id", 7), ("flush_interval_s", "5"),
    ("flush_interval_s", 0), ("writer_nice", 20), ("dtype", "float64"),
    ("max_packet_bytes", 1000), ("metrics_port", 70_000), ("close_on_exit", "yes"),
    ("max_inflight", -1),
])
def test_a_producer_setting_given_in_code_meets_the_yaml_rule_when_given(
        key: str, value: object) -> None:
    """One rule for both doors: the same bad value is refused with the same reason, naming
    the key, whether it comes from YAML (at load) or from code (at construction)."""
    from persia_inc.foundation.fields import FieldError
    from persia_inc.producer import ProducerSettings

    with pytest.raises(ConfigError) as from_yaml:
        config_from_mapping({"persia_inc": {"producer": {key: value}}}, "f.yaml")
    assert from_yaml.value.key == f"persia_inc.producer.{key}"
    with pytest.raises(FieldError) as from_code:
        ProducerSettings(**{key: value})  # type: ignore[arg-type]
    assert from_code.value.key == key
    assert from_code.value.reason == from_yaml.value.reason


def test_producer_arguments_in_code_are_refused_at_construction(tmp_path: Path) -> None:
    """A bad producer_id given in code used to pass until close() ('... were not stored');
    now it is refused before training starts, as the same value in YAML is at load."""
    from persia_inc.foundation.fields import FieldError
    from persia_inc.producer import IncrementalProducer
    from persia_inc.storage import open_store
    from persia_inc.wiring import producer_from_config

    config = config_from_mapping({"enable_incremental_update": True,
                                  "incremental_dir": str(tmp_path / "inc")})
    with pytest.raises(FieldError, match="producer_id") as info:
        producer_from_config(config, producer_id="trainer/0")
    assert info.value.key == "producer_id"
    store = open_store(str(tmp_path / "inc"))
    for kwargs, key in (({"model": "a b"}, "model"), ({"buffer_size": 0}, "buffer_size"),
                        ({"buffer_size": 2.5}, "buffer_size"), ({"generation": -1}, "generation")):
        with pytest.raises(FieldError) as info:
            IncrementalProducer(store, **kwargs)  # type: ignore[arg-type]
        assert info.value.key == key
    assert not (tmp_path / "inc").exists() or not any((tmp_path / "inc").iterdir())
    store.close()


def test_unknown_key_suggests_the_key_users_write_never_an_internal_name() -> None:
    for key in ("infer", "PersiaInferConfg"):
        with pytest.raises(ConfigError) as info:
            config_from_mapping({key: {}}, "f.yaml")
        assert "did you mean 'PersiaInferConfig'?" in str(info.value)
        known = str(info.value).split("known: ")[1]
        assert "infer," not in known and "source" not in known and "PersiaInferConfig" in known
    with pytest.raises(ConfigError, match="did you mean 'flush_interval_s'"):
        config_from_mapping({"persia_inc": {"producer": {"flush_intervals": 1}}})


def test_hdfs_scheme_is_http_or_https_from_yaml_and_from_code() -> None:
    from persia_inc.foundation.fields import FieldError
    from persia_inc.storage.settings import HdfsSettings

    with pytest.raises(ConfigError) as info:
        config_from_mapping({"persia_inc": {"hdfs": {"scheme": "ftp"}}}, "f.yaml")
    assert info.value.key == "persia_inc.hdfs.scheme" and "'http', 'https'" in str(info.value)
    with pytest.raises(FieldError, match="scheme"):
        HdfsSettings(scheme="ftp")  # type: ignore[arg-type]
    assert config_from_mapping({"persia_inc": {"hdfs": {"scheme": "https"}}}).persia_inc.hdfs.scheme \
        == "https"


# ------------------------------------------------------------------- the reference, generated


def test_every_key_is_documented_and_config_defaults_prints_each(
        capsys: pytest.CaptureFixture[str]) -> None:
    from persia_inc.cli import main
    from persia_inc.config.reference import settings_reference, undocumented

    assert undocumented() == []
    assert main(["config", "--defaults"]) == 0
    printed = capsys.readouterr().out.splitlines()
    settings = settings_reference()
    assert printed == [f"{s.key} = {s.default}  # {s.doc}" for s in settings]
    assert "persia_inc.loader.dense_sync.retire_grace_s = 30.0  # A version that stopped" in "\n".join(
        printed)
    # the keys are exactly the ones a file may set: every one, at its printed default, loads
    # back to the defaults
    import json

    mapping: dict = {}
    for s in settings:
        *path, last = s.key.split(".")
        node = mapping
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(s.default)
    assert config_from_mapping(mapping) == Config(source="<mapping>")


def test_the_readme_table_is_generated_from_the_settings() -> None:
    from persia_inc.config.reference import README_END, README_START, replace_reference

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert replace_reference(readme) == readme, "README drifted: run .venv/bin/python tools/config-reference"
    table = readme[readme.index(README_START):readme.index(README_END)]
    assert "| `persia_inc.producer.flush_interval_s` | `30.0` |" in table
    with pytest.raises(ValueError, match="markers"):
        replace_reference("no table here")


def test_kafka_and_s3_settings_given_in_code_meet_the_yaml_rule() -> None:
    from persia_inc.foundation.fields import FieldError
    from persia_inc.foundation.kafka import KafkaSettings
    from persia_inc.storage.settings import S3Settings

    kafka = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 2000}
    with pytest.raises(ConfigError) as from_yaml:
        config_from_mapping({"persia_inc": {"kafka": kafka}}, "f.yaml")
    with pytest.raises(FieldError) as from_code:
        KafkaSettings(**kafka)  # type: ignore[arg-type]
    assert from_yaml.value.key == "persia_inc.kafka.heartbeat_interval_ms"
    assert from_code.value.key == "heartbeat_interval_ms"
    assert from_code.value.reason == from_yaml.value.reason
    with pytest.raises(FieldError, match="addressing_style"):
        S3Settings(addressing_style="sideways")
    with pytest.raises(FieldError, match="read_timeout_s"):
        S3Settings(read_timeout_s="30")  # type: ignore[arg-type]
