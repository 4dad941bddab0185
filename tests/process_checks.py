"""Shared helpers of the tests that start whole process trees (no tests here): is a process
still alive, and which processes still use a folder."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def processes_under(path: Path | str) -> list[str]:
    """`pid: command line` of every live process whose command line or working directory
    names `path`."""
    text, found = str(path), []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (text in cmdline or cwd.startswith(text)) and alive(int(entry.name)):
            found.append(f"{entry.name}: {cmdline}")
    return found
