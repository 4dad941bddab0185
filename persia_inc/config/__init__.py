"""`global_config.yaml`: the PERSIA keys, PERSIA's nested form, and our own section.

Three shapes are read into one frozen, typed `Config`:

* the seed-document form: `PersiaInferConfig.{servers, initial_sparse_checkpoint}` and
  top-level `enable_incremental_update`, `incremental_buffer_size`, `incremental_dir`, `storage`;
* PERSIA's repository form: `common_config.infer_config.{servers, embedding_checkpoint}` (or
  `common_config.job_type: Infer` with `servers`/`initial_sparse_checkpoint` beside it) and
  `embedding_parameter_server_config.{enable_incremental_update, incremental_buffer_size,
  incremental_dir, storage}`; PERSIA's other documented keys are accepted and ignored;
* our additions under `persia_inc:`, every field with a default.

Unknown keys, wrong types and inconsistent values raise one `ConfigError` naming the file, the
key and what was expected.
"""

from persia_inc.config.errors import ConfigError
from persia_inc.config.load import config_from_mapping, load_config
from persia_inc.config.schema import Config, InferConfig, PersiaIncSettings, StorageName

__all__ = [
    "Config",
    "ConfigError",
    "InferConfig",
    "PersiaIncSettings",
    "StorageName",
    "config_from_mapping",
    "load_config",
]
