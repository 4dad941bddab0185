"""Packet v1: round trips, every rejection, naming, announcements and manifests."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest

from persia_inc.packet_format import (
    Announcement,
    AnnouncementError,
    CheckpointManifest,
    CorruptPacketError,
    ManifestError,
    ManifestPart,
    ManifestTable,
    PacketError,
    PacketHeader,
    PacketId,
    PacketLimits,
    PacketTooLargeError,
    UnsupportedPacketError,
    Watermark,
    decode_packet,
    encode_packet,
    packet_path,
    parse_packet_path,
    read_packet_header,
    write_packet,
)
from persia_inc.packet_format.table_codec import META_PREFIX

HEADER = PacketHeader(model="ctr", table="emb", producer="trainer-0", generation=7, sequence=42)


def make_rows(n: int = 100, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    signs = rng.choice(2**40, n, replace=False).astype(np.uint64)
    return signs, rng.standard_normal((n, dim), dtype=np.float32)


def rewrite(data: bytes, *, metadata: dict[str, str] | None = None,
            columns: dict[str, pa.Array] | None = None, batches: int = 1,
            compression: str | None = None) -> bytes:
    """Re-encode a valid packet with some part changed, as a hostile writer would."""
    table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    meta.update({META_PREFIX + k: v for k, v in (metadata or {}).items()})
    arrays = {name: table.column(name).combine_chunks() for name in table.schema.names}
    arrays.update(columns or {})
    schema = pa.schema([pa.field(n, a.type) for n, a in arrays.items()],
                       metadata={k.encode(): v.encode() for k, v in meta.items()})
    batch = pa.record_batch(list(arrays.values()), schema=schema)
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, schema, options=options) as writer:
        for _ in range(batches):
            writer.write_batch(batch)
    return sink.getvalue()


# ------------------------------------------------------------------------------ round trip


def test_roundtrip_keeps_rows_in_order_with_the_full_header() -> None:
    signs, rows = make_rows()
    packet = decode_packet(encode_packet(HEADER, signs, rows))
    assert packet.signs.dtype == np.uint64
    assert np.array_equal(packet.signs, signs)
    assert packet.embeddings.dtype == np.float32
    assert np.array_equal(packet.embeddings, rows)
    assert packet.deleted.size == 0 and packet.state is None
    h = packet.header
    assert (h.model, h.table, h.producer, h.generation, h.sequence) == ("ctr", "emb", "trainer-0", 7, 42)
    assert (h.rows, h.dim, h.deleted_rows, h.format_version) == (100, 8, 0, 1)
    assert len(h.checksum) == 16


def test_rows_are_a_view_on_the_packet_bytes_not_a_copy() -> None:
    signs, rows = make_rows(1000)
    buf = pa.py_buffer(encode_packet(HEADER, np.sort(signs), rows))
    packet = decode_packet(buf)
    assert not packet.embeddings.flags.owndata
    address = packet.embeddings.__array_interface__["data"][0]
    assert buf.address <= address < buf.address + buf.size


def test_deletes_state_and_float16_roundtrip() -> None:
    signs, rows = make_rows(50, 4)
    state = np.arange(50 * 2, dtype=np.float32).reshape(50, 2)
    deleted = np.array([2**41 + 5, 2**41 + 1], np.uint64)
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=0,
                          dtype="float16", flush_reason="size")
    packet = decode_packet(encode_packet(header, signs, rows, deleted=deleted, state=state))
    assert np.array_equal(packet.deleted, deleted)
    assert np.allclose(packet.embeddings, rows, atol=1e-2)
    assert packet.embeddings.dtype == np.float32
    assert np.array_equal(packet.state, state)
    assert packet.header.flush_reason == "size" and packet.header.deleted_rows == 2


def test_delete_only_packet_names_its_dim() -> None:
    header = PacketHeader(model="m", table="t", producer="p", generation=1, sequence=0, dim=16)
    packet = decode_packet(encode_packet(header, np.empty(0, np.uint64), np.empty((0, 16), np.float32),
                                         deleted=np.array([9], np.uint64)))
    assert packet.signs.size == 0 and packet.embeddings.shape == (0, 16)
    assert packet.deleted.tolist() == [9]


def test_write_and_read_through_file_objects(tmp_path) -> None:
    signs, rows = make_rows()
    path = tmp_path / "p.arrow"
    with path.open("wb") as sink:
        written = write_packet(sink, HEADER, signs, rows)
    with path.open("rb") as source:
        packet = decode_packet(source, where=str(path))
    assert packet.header == written
    with path.open("rb") as source:
        assert read_packet_header(source).checksum == written.checksum


def test_encoder_refuses_inconsistent_arguments() -> None:
    signs, rows = make_rows(10)
    with pytest.raises(ValueError, match="more than once"):
        encode_packet(HEADER, np.concatenate([signs, signs[:1]]), np.vstack([rows, rows[:1]]))
    with pytest.raises(ValueError, match="shape"):
        encode_packet(HEADER, signs, rows[:5])
    with pytest.raises(ValueError, match="both upserted and deleted"):
        encode_packet(HEADER, signs, rows, deleted=signs[:1])
    with pytest.raises(ValueError, match="non-negative"):
        encode_packet(HEADER, np.array([-1]), rows[:1])
    with pytest.raises(ValueError, match="producer"):
        PacketHeader(model="m", table="t", producer="../etc", generation=1, sequence=1)
    with pytest.raises(ValueError, match="sequence"):
        PacketHeader(model="m", table="t", producer="p", generation=1, sequence=10**12)


# ------------------------------------------------------------------------------ rejection


@pytest.fixture
def valid() -> bytes:
    signs, rows = make_rows(200, 8)
    return encode_packet(HEADER, signs, rows)


def assert_rejected(data: bytes, error: type[PacketError], reason: str, **kwargs) -> None:
    with pytest.raises(error) as info:
        decode_packet(data, where="s3://bucket/inc/ctr/emb/p/x.arrow", **kwargs)
    assert info.value.where == "s3://bucket/inc/ctr/emb/p/x.arrow"
    assert reason in info.value.reason
    assert "s3://bucket/inc/ctr/emb/p/x.arrow" in str(info.value)


def test_bad_magic_is_corrupt(valid: bytes) -> None:
    assert_rejected(b"PAR1" + valid[4:], CorruptPacketError, "bad magic")
    assert_rejected(b"", CorruptPacketError, "bad magic")


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_packet_is_corrupt(valid: bytes, cut: int) -> None:
    assert_rejected(valid[:-cut], CorruptPacketError, "torn or truncated")


def test_torn_middle_is_corrupt(valid: bytes) -> None:
    torn = valid[: len(valid) // 2] + valid[-10:]
    with pytest.raises(CorruptPacketError):
        decode_packet(torn)


def test_flipped_row_bit_is_a_checksum_mismatch(valid: bytes) -> None:
    data = bytearray(valid)
    data[len(data) // 2] ^= 0x01
    assert_rejected(bytes(data), CorruptPacketError, "checksum mismatch")


def test_wrong_checksum_in_metadata(valid: bytes) -> None:
    assert_rejected(rewrite(valid, metadata={"checksum": "0" * 16}), CorruptPacketError, "checksum")


def test_wrong_version_is_unsupported(valid: bytes) -> None:
    assert_rejected(rewrite(valid, metadata={"format_version": "2"}), UnsupportedPacketError,
                    "format version '2'")


def test_foreign_arrow_file_is_corrupt(valid: bytes) -> None:
    sink = io.BytesIO()
    table = pa.table({"x": [1, 2, 3]})
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert_rejected(sink.getvalue(), CorruptPacketError, "not a persia-inc packet")


def test_duplicate_signs_are_corrupt(valid: bytes) -> None:
    signs = pa.ipc.open_file(pa.BufferReader(valid)).read_all().column("sign").to_numpy().copy()
    signs[5] = signs[6]
    data = rewrite(valid, columns={"sign": pa.array(signs)})
    assert_rejected(data, CorruptPacketError, "duplicate sign", verify_checksum=False)


def test_duplicates_in_foreign_order_are_found_too(valid: bytes) -> None:
    signs = pa.ipc.open_file(pa.BufferReader(valid)).read_all().column("sign").to_numpy()[::-1].copy()
    signs[0] = signs[-1]
    data = rewrite(valid, columns={"sign": pa.array(signs)})
    assert_rejected(data, CorruptPacketError, "duplicate sign", verify_checksum=False)


def test_dim_mismatch_is_corrupt(valid: bytes) -> None:
    assert_rejected(rewrite(valid, metadata={"dim": "16"}), CorruptPacketError, "dim mismatch")


def test_wrong_sign_type_is_corrupt(valid: bytes) -> None:
    signs = pa.ipc.open_file(pa.BufferReader(valid)).read_all().column("sign").to_numpy()
    data = rewrite(valid, columns={"sign": pa.array(signs.astype(np.int64))})
    assert_rejected(data, CorruptPacketError, "want uint64", verify_checksum=False)


def test_nulls_are_corrupt(valid: bytes) -> None:
    signs = pa.ipc.open_file(pa.BufferReader(valid)).read_all().column("sign").to_pylist()
    signs[3] = None
    data = rewrite(valid, columns={"sign": pa.array(signs, pa.uint64())})
    assert_rejected(data, CorruptPacketError, "nulls", verify_checksum=False)


def test_extra_column_is_corrupt(valid: bytes) -> None:
    data = rewrite(valid, columns={"extra": pa.array(np.zeros(200, np.int8))})
    assert_rejected(data, CorruptPacketError, "columns")


def test_two_batches_are_corrupt(valid: bytes) -> None:
    assert_rejected(rewrite(valid, batches=2), CorruptPacketError, "exactly one record batch")


def test_compressed_body_is_refused_before_decompression(valid: bytes) -> None:
    data = rewrite(valid, compression="zstd")
    assert_rejected(data, UnsupportedPacketError, "compressed")


def test_row_count_lie_is_corrupt(valid: bytes) -> None:
    assert_rejected(rewrite(valid, metadata={"rows": "199"}), CorruptPacketError, "metadata says")


def test_non_integer_metadata_is_corrupt(valid: bytes) -> None:
    assert_rejected(rewrite(valid, metadata={"sequence": "4e3"}), CorruptPacketError, "not an integer")
    assert_rejected(rewrite(valid, metadata={"producer": "../../etc"}), CorruptPacketError, "bad header")


@pytest.mark.parametrize(("limits", "reason"), [
    (PacketLimits(max_rows=100), "row limit"),
    (PacketLimits(max_dim=4), "dim 8 outside"),
    (PacketLimits(max_bytes=1024), "byte limit"),
])
def test_oversize_packets_are_refused(valid: bytes, limits: PacketLimits, reason: str) -> None:
    assert_rejected(valid, PacketTooLargeError, reason, limits=limits)


def test_oversize_stream_is_refused_without_reading_it_all() -> None:
    class Endless(io.RawIOBase):
        def __init__(self) -> None:
            self.served = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.served += size
            return b"A" * size

    stream = Endless()
    with pytest.raises(PacketTooLargeError):
        decode_packet(stream, limits=PacketLimits(max_bytes=4096))
    assert stream.served == 4097


# ------------------------------------------------------------------------------ naming


def test_packet_path_and_parse_are_inverse() -> None:
    path = packet_path("s3://bucket/inc/", HEADER)
    assert path == "s3://bucket/inc/ctr/emb/trainer-0/0000000007-000000000042.arrow"
    assert parse_packet_path(path) == PacketId("ctr", "emb", "trainer-0", 7, 42)
    assert PacketId.of(HEADER).key == "ctr/emb/trainer-0/0000000007-000000000042.arrow"


def test_sorted_names_are_apply_order() -> None:
    ids = [PacketId("m", "t", "p", g, s) for g in (1, 2, 10) for s in (0, 9, 10, 99, 1000)]
    assert sorted(i.key for i in ids) == [i.key for i in sorted(ids)]


@pytest.mark.parametrize("path", [
    "m/t/p/1-2.arrow", "t/p/0000000001-000000000002.arrow", "m/t/../0000000001-000000000002.arrow",
    "m/t/p/0000000001-000000000002.parquet",
])
def test_parse_refuses_non_packet_paths(path: str) -> None:
    with pytest.raises(PacketError):
        parse_packet_path(path)


# ------------------------------------------------------------------------------ announcement


def test_announcement_roundtrip() -> None:
    signs, rows = make_rows()
    data = encode_packet(HEADER, signs, rows)
    header = decode_packet(data).header
    note = Announcement.for_packet("s3://b/inc", header, len(data))
    again = Announcement.from_json(note.to_json())
    assert again == note
    assert note.uri == packet_path("s3://b/inc", header)
    assert note.key == b"trainer-0" and note.rows == 100 and note.bytes == len(data)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda r: "not json", "not JSON"),
    (lambda r: [1, 2], "not a JSON object"),
    (lambda r: {**r, "format_version": 2}, "format_version"),
    (lambda r: {**r, "rows": -1}, "'rows'"),
    (lambda r: {**r, "rows": True}, "'rows'"),
    (lambda r: {**r, "uri": 5}, "'uri'"),
    (lambda r: {**r, "producer": "../x"}, "producer"),
    (lambda r: {**r, "sequence": 10**13}, "sequence"),
    (lambda r: {**r, "surprise": 1}, "unknown fields"),
    (lambda r: {k: v for k, v in r.items() if k != "checksum"}, "'checksum'"),
])
def test_malformed_announcements_are_rejected(mutate, reason: str) -> None:
    record = json.loads(Announcement.for_packet("/inc", HEADER, 10).to_json())
    mutated = mutate(record)
    raw = mutated if isinstance(mutated, str) else json.dumps(mutated)
    with pytest.raises(AnnouncementError, match=reason) as info:
        Announcement.from_json(raw, where="topic persia-inc.ctr partition 0 offset 9")
    assert "offset 9" in str(info.value)


def test_oversize_announcement_is_rejected() -> None:
    with pytest.raises(AnnouncementError, match="over"):
        Announcement.from_json(b" " * (65 * 1024))


# ------------------------------------------------------------------------------ manifest


def make_manifest() -> CheckpointManifest:
    return CheckpointManifest(
        model="ctr",
        tables={"emb": ManifestTable(dim=16, rows=30, parts=(
            ManifestPart("emb/part-00000.arrow", 10, 1000, "a" * 16),
            ManifestPart("emb/part-00001.arrow", 20, 2000, "b" * 16)))},
        watermarks=(Watermark("emb", "trainer-0", 3, 17),),
    )


def test_manifest_roundtrip() -> None:
    manifest = make_manifest()
    assert CheckpointManifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(("mutate", "key"), [
    (lambda r: r.update(kind="other"), "'kind'"),
    (lambda r: r.update(format_version=9), "format_version"),
    (lambda r: r["tables"]["emb"].update(rows=31), "tables.emb.rows"),
    (lambda r: r["tables"]["emb"].update(dim="16"), "tables.emb.dim"),
    (lambda r: r["tables"]["emb"]["parts"][1].update(path="../../etc/passwd"), "parts[1].path"),
    (lambda r: r["tables"]["emb"]["parts"][0].update(path="/abs"), "parts[0].path"),
    (lambda r: r["watermarks"][0].update(sequence=-1), "watermarks[0].sequence"),
    (lambda r: r["watermarks"][0].update(producer="a/b"), "watermarks[0].producer"),
    (lambda r: r.update(tables=[]), "tables"),
])
def test_malformed_manifests_name_the_key(mutate, key: str) -> None:
    record = json.loads(make_manifest().to_json())
    mutate(record)
    with pytest.raises(ManifestError) as info:
        CheckpointManifest.from_json(json.dumps(record), where="s3://b/ckpt/manifest.json")
    assert key in str(info.value) and "s3://b/ckpt/manifest.json" in str(info.value)


