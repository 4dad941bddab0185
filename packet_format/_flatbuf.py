"""Just enough FlatBuffers reading to inspect an Arrow IPC message before Arrow decodes it.

Arrow allocates a compressed buffer's claimed uncompressed size before it checks anything, so
a hostile packet could ask for terabytes. We refuse compressed record batches up front by
looking at the one field that says so (`RecordBatch.compression`, also inside a
`DictionaryBatch.data`), with bounds checks on every read. Layout reference: Arrow
`format/Message.fbs`.
"""

from __future__ import annotations

import struct

_MESSAGE_HEADER = 2  # Message.header (union value)
_MESSAGE_HEADER_TYPE = 1  # Message.header_type
_RECORD_BATCH_LENGTH = 0
_RECORD_BATCH_COMPRESSION = 3
_DICTIONARY_BATCH_DATA = 1
_DICTIONARY_BATCH_IS_DELTA = 2
HEADER_DICTIONARY_BATCH = 2
HEADER_RECORD_BATCH = 3


class FlatbufferError(ValueError):
    """The flatbuffer is malformed (an offset points outside the buffer)."""


def _read(fmt: str, buf: bytes, pos: int) -> int:
    size = struct.calcsize(fmt)
    if pos < 0 or pos + size > len(buf):
        raise FlatbufferError(f"offset {pos} outside a {len(buf)}-byte message header")
    return struct.unpack_from(fmt, buf, pos)[0]


def _field_pos(buf: bytes, table: int, index: int) -> int | None:
    """Absolute position of field `index` of the table at `table`, or None when absent."""
    vtable = table - _read("<i", buf, table)
    vtable_size = _read("<H", buf, vtable)
    slot = 4 + 2 * index
    if slot + 2 > vtable_size:
        return None
    offset = _read("<H", buf, vtable + slot)
    return table + offset if offset else None


def _table_at(buf: bytes, field_pos: int) -> int:
    """Position of the table a field's offset points to."""
    return field_pos + _read("<I", buf, field_pos)


def _compressed(buf: bytes, batch: int) -> bool:
    return _field_pos(buf, batch, _RECORD_BATCH_COMPRESSION) is not None


def record_batch_facts(metadata: bytes) -> tuple[int, bool]:
    """(header_type, compressed) of one IPC `Message` flatbuffer.

    `compressed` is meaningful for record batches (header_type 3) and dictionary batches
    (header_type 2, where it is that of the batch's data).
    """
    root = _read("<I", metadata, 0)
    type_pos = _field_pos(metadata, root, _MESSAGE_HEADER_TYPE)
    header_type = _read("<B", metadata, type_pos) if type_pos is not None else 0
    if header_type not in (HEADER_RECORD_BATCH, HEADER_DICTIONARY_BATCH):
        return header_type, False
    header_pos = _field_pos(metadata, root, _MESSAGE_HEADER)
    if header_pos is None:
        raise FlatbufferError("batch message without a header")
    batch = _table_at(metadata, header_pos)
    if header_type == HEADER_RECORD_BATCH:
        return header_type, _compressed(metadata, batch)
    data_pos = _field_pos(metadata, batch, _DICTIONARY_BATCH_DATA)
    if data_pos is None:
        raise FlatbufferError("dictionary batch without data")
    return header_type, _compressed(metadata, _table_at(metadata, data_pos))


def dictionary_batch_is_delta(metadata: bytes) -> bool:
    """Whether a dictionary batch message (header_type 2) is a delta (not allowed in a cut)."""
    root = _read("<I", metadata, 0)
    header_pos = _field_pos(metadata, root, _MESSAGE_HEADER)
    if header_pos is None:
        raise FlatbufferError("batch message without a header")
    pos = _field_pos(metadata, _table_at(metadata, header_pos), _DICTIONARY_BATCH_IS_DELTA)
    return pos is not None and _read("<B", metadata, pos) != 0
