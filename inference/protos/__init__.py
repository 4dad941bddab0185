"""TorchServe's gRPC stubs, generated from the protos TorchServe itself ships.

TorchServe 0.12 keeps `inference.proto` and `management.proto` (and the `google/rpc` protos
they import) inside `ts/frontend/model-server.jar`. Nothing here is hand-written or committed:
on first use the protos are extracted from the installed jar and compiled with
`grpc_tools.protoc` into a cache directory keyed by the protos' hash and the grpcio-tools
version, so a fresh clone works after `pip install -e '.[serve]'` and an upgraded TorchServe
regenerates by itself. `python -m inference.protos` does the same ahead of time (build or
image time); `PERSIA_INC_CACHE_DIR` moves the cache.

The generated package is imported under the private name `persia_inc_ts_protos` without
touching `sys.path`. `google.rpc.status_pb2` comes from googleapis-common-protos.

Use: `from inference.protos import stubs; stubs().inference_pb2_grpc.InferenceAPIsServiceStub`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE = "persia_inc_ts_protos"
PROTOS = ("inference.proto", "management.proto")
_lock = threading.Lock()
_loaded: dict[str, TsProtos] = {}


@dataclass(frozen=True, slots=True)
class TsProtos:
    """The four generated modules of TorchServe's gRPC API."""

    inference_pb2: ModuleType
    inference_pb2_grpc: ModuleType
    management_pb2: ModuleType
    management_pb2_grpc: ModuleType
    directory: Path


def model_server_jar() -> Path:
    """The installed `ts/frontend/model-server.jar`; FileNotFoundError with an install hint."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("TorchServe is not installed: pip install -e '.[serve]'")
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise FileNotFoundError(f"{jar} is missing: reinstall torchserve==0.12.0")
    return jar


def _read_protos(jar: Path) -> dict[str, bytes]:
    """proto name -> text, for ours (`proto/*.proto`) and the google/rpc ones they import."""
    out: dict[str, bytes] = {}
    with zipfile.ZipFile(jar) as archive:
        names = set(archive.namelist())
        for name in PROTOS:
            member = f"proto/{name}" if f"proto/{name}" in names else name
            out[name] = archive.read(member)
        for member in names:
            if member.startswith("google/rpc/") and member.endswith(".proto"):
                out[member] = archive.read(member)
    return out


def cache_root() -> Path:
    """Where generated stubs are kept (`PERSIA_INC_CACHE_DIR`, else ~/.cache/persia-inc)."""
    env = os.environ.get("PERSIA_INC_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "persia-inc"


def generate(target: Path | None = None) -> Path:
    """Extract and compile the protos (if not done yet); returns the directory that holds
    the generated package. Safe when several processes race: each builds in a temporary
    directory and renames it into place."""
    from grpc_tools import protoc

    jar = model_server_jar()
    protos = _read_protos(jar)
    digest = hashlib.sha256()
    for name in sorted(protos):
        digest.update(name.encode() + b"\0" + protos[name])
    import grpc_tools

    version = getattr(grpc_tools, "__version__", "") or _dist_version("grpcio-tools")
    digest.update(version.encode())
    final = (target or cache_root()) / f"ts-protos-{digest.hexdigest()[:16]}"
    if (final / PACKAGE / "management_pb2_grpc.py").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ts-protos-", dir=final.parent))
    try:
        include = work / "include"
        for name, text in protos.items():
            path = include / (f"{PACKAGE}/{name}" if name in PROTOS else name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text)
        out = work / "out"
        (out / PACKAGE).mkdir(parents=True)
        (out / PACKAGE / "__init__.py").write_text('"""Generated from TorchServe\'s protos."""\n')
        well_known = Path(protoc.__file__).parent / "_proto"
        args = ["grpc_tools.protoc", f"-I{include}", f"-I{well_known}",
                f"--python_out={out}", f"--grpc_python_out={out}",
                *(f"{include}/{PACKAGE}/{name}" for name in PROTOS)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on TorchServe's protos from {jar}")
        try:
            out.rename(final)
        except OSError:
            if not (final / PACKAGE / "management_pb2_grpc.py").is_file():
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


def stubs() -> TsProtos:
    """The generated modules, built on first use and imported once per process."""
    with _lock:
        if "stubs" not in _loaded:
            directory = generate()
            if PACKAGE not in sys.modules:
                init = directory / PACKAGE / "__init__.py"
                spec = importlib.util.spec_from_file_location(
                    PACKAGE, init, submodule_search_locations=[str(init.parent)])
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot import the generated stubs in {directory}")
                package = importlib.util.module_from_spec(spec)
                sys.modules[PACKAGE] = package
                spec.loader.exec_module(package)
            modules = {name: importlib.import_module(f"{PACKAGE}.{name}") for name in
                       ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc")}
            _loaded["stubs"] = TsProtos(directory=directory, **modules)
        return _loaded["stubs"]


__all__ = ["TsProtos", "cache_root", "generate", "model_server_jar", "stubs"]
