"""The contract between training and serving: packet v1, naming, announcements, manifests.

Imports nothing of ours, so both sides (and third parties) can depend on it alone.
"""

import logging

from persia_inc.packet_format.announcement import ANNOUNCEMENT_VERSION, Announcement
from persia_inc.packet_format.codec import (
    OP_DELETE,
    OP_UPSERT,
    Packet,
    decode_packet,
    encode_packet,
    read_packet_header,
    write_packet,
)
from persia_inc.packet_format.errors import (
    AnnouncementError,
    CorruptPacketError,
    ManifestError,
    PacketError,
    PacketTooLargeError,
    UnsupportedPacketError,
)
from persia_inc.packet_format.header import (
    DEFAULT_LIMITS,
    FORMAT_VERSION,
    MAX_GENERATION,
    MAX_SEQUENCE,
    FlushReason,
    PacketHeader,
    PacketLimits,
    Position,
)
from persia_inc.packet_format.manifest import (
    MANIFEST_NAME,
    CheckpointManifest,
    ManifestPart,
    ManifestTable,
    Watermark,
)
from persia_inc.packet_format.naming import (
    PACKET_SUFFIX,
    PacketId,
    packet_key,
    packet_path,
    parse_packet_path,
    stream_prefix,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ANNOUNCEMENT_VERSION",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_GENERATION",
    "MAX_SEQUENCE",
    "OP_DELETE",
    "OP_UPSERT",
    "PACKET_SUFFIX",
    "Announcement",
    "AnnouncementError",
    "CheckpointManifest",
    "CorruptPacketError",
    "FlushReason",
    "ManifestError",
    "ManifestPart",
    "ManifestTable",
    "Packet",
    "PacketError",
    "PacketHeader",
    "PacketId",
    "PacketLimits",
    "PacketTooLargeError",
    "Position",
    "UnsupportedPacketError",
    "Watermark",
    "decode_packet",
    "encode_packet",
    "packet_key",
    "packet_path",
    "parse_packet_path",
    "read_packet_header",
    "stream_prefix",
    "write_packet",
]
