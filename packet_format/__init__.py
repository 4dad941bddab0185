"""The contract between training and serving: packets v1 and v2 (cuts), naming, announcements,
manifests.

Imports nothing of ours, so both sides (and third parties) can depend on it alone.
"""

import logging

from persia_inc.packet_format.announcement import ANNOUNCEMENT_VERSION, Announcement
from persia_inc.packet_format.cut import (
    CUT_DTYPES,
    CUT_FORMAT_VERSION,
    CUT_LANE,
    LEGACY_CUT_LANE,
    Cut,
    CutDtype,
    CutHeader,
    CutTable,
    TableRows,
    check_lane,
    lane_folders,
)
from persia_inc.packet_format.cut_codec import (
    decode_cut,
    encode_cut,
    read_cut_header,
    write_cut,
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
    MANIFEST_VERSION,
    CheckpointManifest,
    ManifestPart,
    ManifestTable,
    Watermark,
)
from persia_inc.packet_format.naming import (
    PACKET_SUFFIX,
    PacketId,
    cut_key,
    packet_key,
    packet_path,
    parse_packet_path,
    stream_listings,
    stream_prefix,
)
from persia_inc.packet_format.table_codec import (
    OP_DELETE,
    OP_UPSERT,
    Packet,
    decode_packet,
    encode_packet,
    read_packet_header,
    write_packet,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ANNOUNCEMENT_VERSION",
    "CUT_DTYPES",
    "CUT_FORMAT_VERSION",
    "CUT_LANE",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "LEGACY_CUT_LANE",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MAX_GENERATION",
    "MAX_SEQUENCE",
    "OP_DELETE",
    "OP_UPSERT",
    "PACKET_SUFFIX",
    "Announcement",
    "AnnouncementError",
    "CheckpointManifest",
    "CorruptPacketError",
    "Cut",
    "CutDtype",
    "CutHeader",
    "CutTable",
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
    "TableRows",
    "UnsupportedPacketError",
    "Watermark",
    "check_lane",
    "cut_key",
    "decode_cut",
    "decode_packet",
    "encode_cut",
    "encode_packet",
    "lane_folders",
    "packet_key",
    "packet_path",
    "parse_packet_path",
    "read_cut_header",
    "read_packet_header",
    "stream_listings",
    "stream_prefix",
    "write_cut",
    "write_packet",
]
