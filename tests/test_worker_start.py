"""TorchServe workers start at the lowest CPU priority and serve at their own
(`inference.worker_start`); the worker inside a real TorchServe is checked in
test_inference_serving.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persia_inc.inference import worker_start

# lower, report, restore, report: in a child, since it leaves its session and changes priority
_CHILD = """
import json, os
from persia_inc.inference import worker_start as w
if os.environ.get("ROOT_GROUP"):  # /proc/self/autogroup reads empty in the root group (CI's)
    real, sid = w._autogroup_nice, os.getsid(0)
    w._autogroup_nice = lambda: real() if os.getsid(0) != sid else None  # until a session of its own
def state():
    group = w._autogroup_nice()
    return {"sid": os.getsid(0), "nice": os.getpriority(os.PRIO_PROCESS, 0), "group": group}
before = state()
how = w.lower_priority()
os.environ[w.PRIORITY_ENV] = how
lowered = state()
restored_how = w.restore_priority()
print(json.dumps({"before": before, "how": how, "lowered": lowered, "restored": state(),
                  "restored_how": restored_how, "again": w.restore_priority()}))
"""


@pytest.mark.parametrize("started_in", ["own_group", "root_group"])
def test_lowered_for_the_start_and_restored(started_in: str) -> None:
    """The root group case is a process whose session has no autogroup (CI runs there):
    /proc/self/autogroup reads nothing until the process has a session of its own."""
    env = {**os.environ, "ROOT_GROUP": "1" if started_in == "root_group" else ""}
    out = json.loads(subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                                    check=True, timeout=60, env=env).stdout)
    before, lowered, restored = out["before"], out["lowered"], out["restored"]
    assert lowered["sid"] != os.getsid(0)  # a session (and autogroup) of its own
    if out["how"].startswith("autogroup:"):
        # back to the group nice it started with; the root group (CI's) reads None and runs at 0
        assert lowered["group"] == worker_start.LOW_NICE
        assert restored["group"] == (before["group"] or 0) == int(out["how"].split(":")[1])
    else:  # no autogroup here: the worker's own nice
        assert out["how"] == f"nice:{before['nice']}"
        assert lowered["nice"] == worker_start.LOW_NICE
    assert restored["nice"] == before["nice"]
    assert out["restored_how"] == out["how"] and out["again"] == ""  # restored once


def test_other_commands_pass_through() -> None:
    """TorchServe may run its --python for something else than a worker: that runs as is."""
    start = Path(worker_start.__file__)
    done = subprocess.run([sys.executable, str(start), "-c", "import os; print(os.getsid(0))"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert int(done.stdout) == os.getsid(0)  # not moved to a session of its own
