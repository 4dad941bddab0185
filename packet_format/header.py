"""Packet identity and descriptive metadata (`PacketHeader`) and reader limits."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Literal

FORMAT_VERSION = 1
MAX_GENERATION = 10**10 - 1  # ten digits in the file name
MAX_SEQUENCE = 10**12 - 1  # twelve digits in the file name

FlushReason = Literal["size", "interval", "explicit", "close", "checkpoint"]
Position = tuple[int, int]  # (generation, sequence): a packet's place in its stream
FLUSH_REASONS: tuple[str, ...] = ("size", "interval", "explicit", "close", "checkpoint")
DTYPES: tuple[str, ...] = ("float32", "float16")

# A name is one path component: no separators, no dot-files, bounded length.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(kind: str, value: object) -> str:
    """Return `value` if it is a safe single path component, else raise ValueError naming `kind`."""
    if not isinstance(value, str) or not _NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{kind} must be 1-128 characters of letters, digits, '_', '.', '-' "
            f"starting with a letter or digit, got {value!r}"
        )
    return value


def check_position(generation: object, sequence: object) -> None:
    """Raise ValueError unless (generation, sequence) fit the naming scheme."""
    for kind, value, top in (
        ("generation", generation, MAX_GENERATION),
        ("sequence", sequence, MAX_SEQUENCE),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError(f"{kind} must be an integer in [0, {top}], got {value!r}")


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """Who wrote a packet, where it sits in that producer's stream, and what it holds.

    `rows`, `dim`, `deleted_rows` and `checksum` describe the payload; `encode_packet` fills
    them in, so a writer leaves them at their defaults.
    """

    model: str
    table: str
    producer: str
    generation: int
    sequence: int
    created_at_ns: int = field(default_factory=time.time_ns)
    flush_reason: FlushReason = "explicit"
    dtype: Literal["float32", "float16"] = "float32"
    rows: int = 0
    deleted_rows: int = 0
    dim: int = 0
    state_dim: int = 0
    checksum: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_name("model", self.model)
        check_name("table", self.table)
        check_name("producer", self.producer)
        check_position(self.generation, self.sequence)
        if self.flush_reason not in FLUSH_REASONS:
            raise ValueError(f"flush_reason must be one of {FLUSH_REASONS}, got {self.flush_reason!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def position(self) -> Position:
        """(generation, sequence): the packet's place in its producer's stream."""
        return (self.generation, self.sequence)


@dataclass(frozen=True, slots=True)
class PacketLimits:
    """What a reader accepts at most; a hostile packet cannot make it allocate past these."""

    max_rows: int = 50_000_000
    """Rows one packet may hold; a reader refuses more."""
    max_bytes: int = 4 * 1024**3
    """Bytes one packet may take; a reader refuses more."""
    max_dim: int = 4096
    """The widest row a reader accepts."""

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_bytes", "max_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PacketLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = PacketLimits()
