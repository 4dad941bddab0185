"""What the dense sync works with: the TorchServe clients it is given (protocols), each
version's state, TorchServe's view as last read, and the name of a version's `.mar` copy
(shared with `persia-inc rollback`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from persia_inc.packet_format import Watermark
from persia_inc.packet_format.dense_manifest import DenseManifest


class DenseManagement(Protocol):
    """What the dense sync needs of TorchServe's management API (`inference.management`).
    Errors carry `retriable` (unreachable or busy) and `not_found` attributes."""

    def describe(self, model_name: str, version: str = "") -> list[dict[str, Any]]: ...

    def register(self, url: str, model_name: str = "", options: Any = None) -> str: ...

    def set_default(self, model_name: str, version: str) -> str: ...

    def unregister(self, model_name: str, version: str = "") -> str: ...

    def close(self) -> None: ...


class DenseValidator(Protocol):
    """Sends one real request shaped by the version's spec to that version alone
    (`inference.validate.VersionProbe`). Raises with `retriable` true when TorchServe or the
    embedding servers were unavailable, and with the reason otherwise."""

    def validate(self, model_name: str, version: str, mar_file: Path) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class DenseVersionState:
    """One dense version as the sync knows it. state: found, registered, active, retired,
    refused or skipped (older than the newest kept ones when the sync started)."""

    version: int
    manifest: DenseManifest | None = None
    state: str = "found"
    reason: str = ""
    registered_at_ns: int = 0
    activated_at_ns: int = 0
    mar_file: str = ""
    deactivated_s: float = 0.0  # monotonic time it stopped being the default (0: never was)
    waiting_for: list[str] = field(default_factory=list)
    validated: bool = False


@dataclass(slots=True)
class TorchServeView:
    """What TorchServe held of the model at the last read: version -> the .mar it was
    registered from, and the default version ('' when the model is not registered)."""

    held: dict[str, str] = field(default_factory=dict)
    default: str = ""
    answers: bool = False
    error: str = ""
    read_at_ns: int = 0
    down_since_s: float = 0.0  # monotonic; 0 while it answers


def retriable(exc: BaseException) -> bool:
    """A management error that waiting may fix (TorchServe unreachable or busy)."""
    return bool(getattr(exc, "retriable", False)) or isinstance(exc, ConnectionError | TimeoutError)


def digest_of(path: Path) -> str:
    """xxh3-64 of the file at `path`, '' if there is none."""
    try:
        return xxhash.xxh3_64_hexdigest(path.read_bytes())
    except FileNotFoundError:
        return ""


def mar_file_name(model_name: str, version: int) -> str:
    """The name of a version's `.mar` copy in TorchServe's model_store (the sync and
    `persia-inc rollback` use the same, so each recognizes the other's registrations)."""
    return f"{model_name}.v{version:012d}.mar"


def version_key(version: str) -> tuple[int, str]:
    """Sort key of TorchServe version names: numbers in order, other names first."""
    return (int(version), "") if version.isdigit() else (-1, version)


def position_json(mark: Watermark) -> dict[str, object]:
    """A version's sparse position as `/streams` shows it."""
    return {"lane": mark.table, "producer": mark.producer, "generation": mark.generation,
            "sequence": mark.sequence}


__all__ = ["DenseManagement", "DenseValidator", "DenseVersionState", "TorchServeView", "digest_of",
           "mar_file_name", "position_json", "retriable", "version_key"]
