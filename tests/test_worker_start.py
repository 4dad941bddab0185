"""TorchServe workers start at the lowest CPU priority and serve at their own
(`inference.worker_start`); the worker inside a real TorchServe is checked in
test_inference_serving.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from persia_inc.inference import worker_start

# lower, report, restore, report: in a child, since it leaves its session and changes priority
_CHILD = """
import json, os
from persia_inc.inference import worker_start as w
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


def test_lowered_for_the_start_and_restored() -> None:
    out = json.loads(subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                                    check=True, timeout=60).stdout)
    before, lowered, restored = out["before"], out["lowered"], out["restored"]
    assert lowered["sid"] != os.getsid(0)  # a session (and autogroup) of its own
    if out["how"].startswith("autogroup:"):
        assert lowered["group"] == worker_start.LOW_NICE and restored["group"] == before["group"]
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
