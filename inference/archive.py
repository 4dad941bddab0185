"""Package a dense model for TorchServe: TorchScript `.pt` + handler + config -> `.mar`.

Uses torch-model-archiver's Python API (`generate_model_archive(ModelArchiverConfig)`), the
same code path as its command line. The archive holds:

* `<name>.pt`: the TorchScript dense model (`inference.model.save_torchscript`);
* `persia_handler.py`: a two-line entry point, `MarEntryHandler`, subclassing the handler class
  the caller names (`handler`: a subclass of `inference.handler.PersiaHandler` that says how
  to reach the servers, e.g. the application's `persia_inc.handler.ConfiguredHandler`; this
  layer never names the application's classes). The worker's Python must have that package
  installed, as TorchServe's own docs assume for any library a handler imports;
* extra files: `persia_model.json` (the `ModelSpec`) and, if given, `global_config.yaml` (the
  embedding servers; `PERSIA_INC_CONFIG` on the TorchServe process overrides it).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from persia_inc.inference.spec import CONFIG_FILE, SPEC_FILE, ModelSpec

HANDLER_FILE = "persia_handler.py"
_HANDLER_SOURCE = '''"""TorchServe entry point of a persia-inc model (written by inference.archive)."""

from {module} import {name} as _Handler


class MarEntryHandler(_Handler):
    """The class TorchServe instantiates: {module}.{name}, which the archive's maker named."""
'''
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def handler_source(handler: str) -> str:
    """The source of the .mar's entry point module: `MarEntryHandler(<handler>)`; `handler`
    is a dotted class name (`package.module.Class`), ValueError otherwise."""
    if not _DOTTED.match(handler):
        raise ValueError(f"handler must be a dotted class name like package.module.Class, "
                         f"got {handler!r}")
    module, _, name = handler.rpartition(".")
    return _HANDLER_SOURCE.format(module=module, name=name)


def archive_model(model_name: str, serialized_file: str | Path, spec: ModelSpec,
                  export_dir: str | Path, *, handler: str, config_file: str | Path | None = None,
                  version: str = "1.0", force: bool = True,
                  check_config: Callable[[Path], object] | None = None) -> Path:
    """Write `<export_dir>/<model_name>.mar` and return its path.

    serialized_file: a TorchScript file ending in `.pt`; handler: the dotted name of the
    handler class the archive's entry point subclasses (see the module docstring);
    config_file: a persia-inc YAML config to ship as `global_config.yaml` (None: the TorchServe
    process must set PERSIA_INC_CONFIG);
    check_config(path) raises if that config is unusable (e.g. `persia_inc.load_config`), so a
    bad one fails here rather than in a TorchServe worker.
    """
    with warnings.catch_warnings():
        # model_archiver/version.py leaves version.txt open (a ResourceWarning at import)
        warnings.simplefilter("ignore", ResourceWarning)
        from model_archiver.model_archiver_config import ModelArchiverConfig
        from model_archiver.model_packaging import generate_model_archive

    serialized = Path(serialized_file)
    if serialized.suffix != ".pt":
        raise ValueError(f"{serialized}: TorchServe loads TorchScript only from a .pt file")
    if not serialized.is_file():
        raise FileNotFoundError(serialized)
    export = Path(export_dir)
    export.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="persia-mar-") as staging_dir:
        staging = Path(staging_dir)
        entry = staging / HANDLER_FILE
        entry.write_text(handler_source(handler), encoding="utf-8")
        extras = [spec.save(staging / SPEC_FILE)]
        if config_file is not None:
            if check_config is not None:
                check_config(Path(config_file))  # fail here, not in a TorchServe worker
            extras.append(Path(shutil.copyfile(config_file, staging / CONFIG_FILE)))
        generate_model_archive(ModelArchiverConfig(
            model_name=model_name, handler=str(entry), version=version,
            serialized_file=str(serialized), extra_files=",".join(str(p) for p in extras),
            export_path=str(export), force=force))
    mar = export / f"{model_name}.mar"
    if not mar.is_file():
        raise RuntimeError(f"torch-model-archiver did not write {mar}")
    return mar


__all__ = ["HANDLER_FILE", "archive_model", "handler_source"]
