"""The package's shape: one import root in the wheel, and light imports for the lower layers."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("boto3", "hdfs", "kafka", "yaml", "torch")


def _loaded_after(module: str) -> list[str]:
    code = (f"import sys, json; import {module}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", ["persia_inc.packet_format", "persia_inc.embedding_server.client",
                                    "persia_inc.storage", "persia_inc"])
def test_lower_layers_load_no_heavy_library(module: str) -> None:
    assert _loaded_after(module) == []


@pytest.mark.parametrize("module", ["persia_inc.producer", "persia_inc.loader"])
def test_the_training_and_serving_sides_load_no_client_library(module: str) -> None:
    """What a training job or a loader pays to import ours: no torch (the producer's hook
    loads it on first use), no boto3, hdfs or Kafka client (the configured backend loads its
    own)."""
    assert [m for m in _loaded_after(module) if m in ("torch", "boto3", "hdfs", "kafka")] == []


def test_the_hook_loads_torch_on_first_use() -> None:
    code = ("import sys; import persia_inc.producer as p; before = 'torch' in sys.modules; "
            "p.IncrementalUpdateHook; print(before, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          check=True)
    assert done.stdout.split() == ["False", "True"]


def test_the_heavy_check_sees_a_heavy_import() -> None:
    """The check above can fail: the app's YAML config does load yaml."""
    assert _loaded_after("persia_inc.config") == ["yaml"]


def _source_copy(target: Path) -> Path:
    """The working tree's tracked and new files (not ignored ones, nor a stale build/)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("persia_inc-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"persia_inc"}
    for folder in ("foundation", "packet_format", "storage", "producer", "loader", "embedding_server",
                   "inference", "persia_inc"):
        for module in (source / folder).rglob("*.py"):
            relative = module.relative_to(source / folder).as_posix()
            installed = "persia_inc/" + (relative if folder == "persia_inc" else f"{folder}/{relative}")
            assert installed in names, f"{module.relative_to(source)} is not in the wheel"
    assert "persia_inc/embedding_server/protos/embedding.proto" in names


LIBRARY = ("foundation", "packet_format", "storage", "producer", "loader", "embedding_server",
           "inference", "persia_inc")
WAITS_ALLOWED = {"foundation/wait.py", "foundation/retry.py"}  # the wait helper, the retry rule


def _library_modules() -> list[Path]:
    return sorted(m for folder in LIBRARY for m in (ROOT / folder).rglob("*.py")
                  if "protos" not in m.parts)


def _sleeps_in_loops(tree: ast.AST) -> list[int]:
    """Lines of `time.sleep(...)` calls inside a while or for loop (a hand-written poll)."""
    found = []
    for loop in (n for n in ast.walk(tree) if isinstance(n, ast.While | ast.For)):
        for node in ast.walk(loop):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "sleep" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "time"):
                found.append(node.lineno)
    return sorted(set(found))


def test_no_hand_written_polling_loop_outside_the_wait_helper() -> None:
    polls = [f"{module.relative_to(ROOT)}:{line}" for module in _library_modules()
             if module.relative_to(ROOT).as_posix() not in WAITS_ALLOWED
             for line in _sleeps_in_loops(ast.parse(module.read_text()))]
    assert polls == [], "use persia_inc.foundation.wait.wait_until: " + ", ".join(polls)


def test_the_polling_check_sees_a_poll() -> None:
    poll = "import time\nwhile not ready():\n    time." + "sleep(0.1)\n"
    assert _sleeps_in_loops(ast.parse(poll)) == [3]


def _class_names(tree: ast.AST) -> list[str]:
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]


def _classes_by_name() -> dict[str, list[str]]:
    """Every class of the library (nested ones and the .mar's generated handler included)."""
    from persia_inc.inference.archive import handler_source
    from persia_inc.wiring import MAR_HANDLER

    found: dict[str, list[str]] = {}
    sources = [(str(m.relative_to(ROOT)), m.read_text()) for m in _library_modules()]
    for where, text in [*sources, ("the .mar's entry point", handler_source(MAR_HANDLER))]:
        for name in _class_names(ast.parse(text)):
            found.setdefault(name, []).append(where)
    return found


def test_no_two_classes_share_a_name() -> None:
    shared = {name: where for name, where in _classes_by_name().items() if len(where) > 1}
    assert shared == {}, "one name per idea: " + "; ".join(f"{n} in {w}" for n, w in shared.items())


def test_the_duplicate_check_sees_a_nested_class() -> None:
    assert _class_names(ast.parse("def f():\n    class Handler: ...\nclass Handler: ...\n")) == [
        "Handler", "Handler"]


def test_the_mar_handler_named_by_the_app_is_the_inference_handler() -> None:
    import importlib

    from persia_inc.inference.handler import PersiaHandler
    from persia_inc.wiring import MAR_HANDLER

    module, _, name = MAR_HANDLER.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), PersiaHandler)


def test_no_library_module_over_650_lines() -> None:
    """The before-stop hook's rule: each module stays one idea a newcomer reads in one sitting."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others",
                             "--exclude-standard", "*.py"], capture_output=True, text=True,
                            check=True).stdout.split()
    big = {name: n for name in listed
           if not name.startswith(("tests/", "bench/")) and "_pb2" not in name
           and (ROOT / name).is_file()
           and (n := len((ROOT / name).read_text().splitlines())) > 650}
    assert big == {}, f"split these modules: {big}"


def _unnamed_threads(tree: ast.AST) -> list[int]:
    """Lines that start a thread or an executor not named through `thread_name()`."""
    def named(call: ast.Call, keyword: str) -> bool:
        value = next((k.value for k in call.keywords if k.arg == keyword), None)
        return (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id == "thread_name")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                node.func, "id", "")
            if ((callee == "ThreadPoolExecutor" and not named(node, "thread_name_prefix"))
                    or (callee == "Thread" and not named(node, "name"))):
                found.append(node.lineno)
    return found


def test_every_thread_and_executor_is_named_through_thread_name() -> None:
    """So the leak guard (threads.leaked_threads, tests/conftest.py) sees every one of ours."""
    unnamed = [f"{module.relative_to(ROOT)}:{line}" for module in _library_modules()
               if module.relative_to(ROOT).as_posix() != "foundation/threads.py"
               for line in _unnamed_threads(ast.parse(module.read_text()))]
    assert unnamed == [], "name it with foundation.threads.thread_name: " + ", ".join(unnamed)


def test_the_thread_check_sees_an_unnamed_executor() -> None:
    code = ("pool = ThreadPoolExecutor(4, thread_name_prefix='x')\n"
            "t = threading.Thread(name=thread_name('y'))\n")
    assert _unnamed_threads(ast.parse(code)) == [1]
