"""The one error family of the packet contract.

Every error names *where* (a path, URI or other identity) and *why*, so an on-call engineer
can find the bad object from the log line alone.
"""

from __future__ import annotations


class PacketError(ValueError):
    """A packet, announcement or manifest that does not meet the v1 contract."""

    def __init__(self, where: str | None, reason: str) -> None:
        self.where = where or "<bytes>"
        self.reason = reason
        super().__init__(f"{self.where}: {reason}")


class CorruptPacketError(PacketError):
    """Bytes that are not a valid packet: torn, bad magic, checksum, schema, duplicates."""


class UnsupportedPacketError(PacketError):
    """A well-formed packet of a format version or dtype this reader does not know."""


class PacketTooLargeError(PacketError):
    """A packet over the configured limits (rows, bytes or dim)."""


class AnnouncementError(PacketError):
    """A malformed announcement record."""


class ManifestError(PacketError):
    """A malformed checkpoint manifest."""
