"""Optional pieces (extras): whether one is installed, and the one line that says how to get it.

A command checks what it needs before it starts a long run, so a missing piece is one line at
the start, never a traceback at the end.
"""

from __future__ import annotations

import importlib.util

# import name -> the extra of persia-inc that installs it
EXTRA_OF = {"torch": "torch", "matplotlib": "plot", "ts": "serve", "model_archiver": "serve"}


def have(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(module: str) -> str:
    """`pip install 'persia-inc[extra]'` for the extra that brings `module`."""
    return f"pip install 'persia-inc[{EXTRA_OF[module]}]'"


__all__ = ["EXTRA_OF", "have", "install_hint"]
