"""Packet v2 (a flush cut): round trips, error bounds, every rejection, v1 beside v2, third-party
readers, and the lane in naming, announcements and manifests."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from test_packet_format import rewrite

from persia_inc.packet_format import (
    CUT_LANE,
    Announcement,
    AnnouncementError,
    CheckpointManifest,
    CorruptPacketError,
    CutHeader,
    CutTable,
    ManifestError,
    ManifestTable,
    PacketError,
    PacketHeader,
    PacketId,
    PacketLimits,
    PacketTooLargeError,
    TableRows,
    UnsupportedPacketError,
    Watermark,
    cut_key,
    decode_cut,
    encode_cut,
    encode_packet,
    packet_path,
    parse_packet_path,
    read_cut_header,
    stream_prefix,
    write_cut,
)
from persia_inc.packet_format.cut_codec import cut_columns, dequantize_rows, quantize_rows
from persia_inc.packet_format.table_codec import META_PREFIX

HEADER = CutHeader(model="ctr", producer="trainer-0", generation=7, sequence=42)


def table_rows(name: str, n: int, dim: int, deletes: int = 0, state_dim: int = 0, seed: int = 0
               ) -> TableRows:
    rng = np.random.default_rng(seed)
    signs = rng.choice(2**40, n + deletes, replace=False).astype(np.uint64)
    state = rng.standard_normal((n, state_dim), dtype=np.float32) if state_dim else None
    return TableRows(name, signs[:n], rng.standard_normal((n, dim), dtype=np.float32),
                     signs[n:], state)


def mixed_tables() -> list[TableRows]:
    """Dims 4, 16, 64; an empty table, a deletes-only table, one with state."""
    return [
        table_rows("small", 50, 4, deletes=5, seed=1),
        table_rows("empty", 0, 16, seed=2),
        table_rows("wide", 20, 64, state_dim=2, seed=3),
        table_rows("gone", 0, 16, deletes=7, seed=4),
        table_rows("mid", 30, 16, deletes=3, seed=5),
    ]




def column(data: bytes, name: str) -> pa.Array:
    return pa.ipc.open_file(pa.BufferReader(data)).get_batch(0).column(name)


def assert_rejected(data: bytes, error: type[PacketError], reason: str, **kwargs: object) -> None:
    with pytest.raises(error) as info:
        decode_cut(data, where="s3://b/inc/x.arrow", **kwargs)  # type: ignore[arg-type]
    assert reason in str(info.value) and "s3://b/inc/x.arrow" in str(info.value)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_round_trip_mixed_dims_empty_deletes_and_state(dtype: str) -> None:
    tables = mixed_tables()
    data = encode_cut(replace(HEADER, dtype=dtype), tables)
    cut = decode_cut(data)
    assert cut.header.format_version == 2 and cut.header.lane == CUT_LANE
    assert cut.header.dtype == dtype
    assert [t.name for t in cut] == [t.name for t in tables]
    assert [(t.dim, t.rows, t.deleted_rows, t.state_dim) for t in cut.header.tables] == [
        (4, 50, 5, 0), (16, 0, 0, 0), (64, 20, 0, 2), (16, 0, 7, 0), (16, 30, 3, 0)]
    for want, got in zip(tables, cut, strict=True):
        assert got.embeddings.dtype == np.float32 and got.embeddings.shape == want.embeddings.shape
        np.testing.assert_array_equal(got.signs, want.signs)
        np.testing.assert_array_equal(got.deleted, want.deleted)
        if dtype == "float32":
            np.testing.assert_array_equal(got.embeddings, want.embeddings)
        else:
            np.testing.assert_allclose(got.embeddings, want.embeddings, atol=0.05)
        if want.state is None:
            assert got.state is None
        else:
            np.testing.assert_array_equal(got.state, want.state)
    assert cut.table("wide").dim == 64
    assert read_cut_header(data) == cut.header


def test_write_cut_returns_the_header_as_written_and_is_deterministic() -> None:
    sink = io.BytesIO()
    written = write_cut(sink, HEADER, mixed_tables())
    assert written == decode_cut(sink.getvalue()).header
    assert written.rows == 100 and written.deleted_rows == 15 and len(written.checksum) == 16
    assert encode_cut(HEADER, mixed_tables()) == sink.getvalue()  # a retry writes the same bytes


def test_tables_read_into_one_block_encode_as_separate_arrays_do() -> None:
    """A producer reads a cut's rows into one block, end to end (the values column is then that
    block, not a copy): the bytes are those of the same rows in arrays of their own, with or
    without a gap, a reordering or an empty table between them."""
    tables = [table_rows(f"t{i}", n, 16, seed=i) for i, n in enumerate((40, 0, 25, 60))]
    block = np.empty(sum(t.embeddings.size for t in tables) + 16 + 25 * 16, np.float32)
    used, in_block = 0, []
    for t in tables:
        rows = block[used:used + t.embeddings.size].reshape(t.embeddings.shape)
        rows[:] = t.embeddings
        used += t.embeddings.size
        in_block.append(replace(t, embeddings=rows))
    assert encode_cut(HEADER, in_block) == encode_cut(HEADER, tables)
    apart = block[used + 16:used + 16 + 25 * 16].reshape(25, 16)  # after a gap
    gap = [in_block[3], replace(in_block[2], embeddings=apart)]
    np.copyto(gap[1].embeddings, tables[2].embeddings)
    assert encode_cut(HEADER, gap) == encode_cut(HEADER, [tables[3], tables[2]])
    swapped = [in_block[3], in_block[0]]
    assert encode_cut(HEADER, swapped) == encode_cut(HEADER, [tables[3], tables[0]])


def test_header_tables_give_the_dim_of_an_empty_table() -> None:
    header = replace(HEADER, tables=(CutTable("a", 8), CutTable("b", 32)))
    empty = TableRows("b", np.empty(0, np.uint64), np.empty((0, 0), np.float32), np.empty(0, np.uint64))
    cut = decode_cut(encode_cut(header, [table_rows("a", 3, 8), empty]))
    assert [(t.name, t.dim) for t in cut.header.tables] == [("a", 8), ("b", 32)]
    assert cut.table("b").embeddings.shape == (0, 32)


def test_float32_rows_are_views_on_the_packet_bytes() -> None:
    data = encode_cut(HEADER, mixed_tables())
    cut = decode_cut(pa.py_buffer(data))
    packet_bytes = np.frombuffer(data, np.uint8)
    for table in cut:
        if table.signs.size:
            assert np.shares_memory(table.embeddings, packet_bytes), table.name
            assert np.shares_memory(table.signs, packet_bytes)


def test_float16_error_is_half_a_float16_ulp() -> None:
    tables = [table_rows("a", 2000, 16, seed=1), table_rows("b", 500, 64, seed=2)]
    cut = decode_cut(encode_cut(replace(HEADER, dtype="float16"), tables))
    for want, got in zip(tables, cut, strict=True):
        bound = np.spacing(np.abs(want.embeddings).astype(np.float16)).astype(np.float32) / 2
        assert (np.abs(got.embeddings - want.embeddings) <= bound + 2**-25).all()


def _int8_bound(rows: np.ndarray) -> np.ndarray:
    lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
    ulp_lo = np.spacing(np.abs(lo).astype(np.float16)).astype(np.float64)
    slack = 2 * np.finfo(np.float32).eps * np.maximum(np.abs(lo), np.abs(hi))
    return ((hi - lo) + ulp_lo) / 510 * (1 + 2**-10) + 2**-25 + slack


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_int8_error_is_within_a_510th_of_the_row_range(scale: float) -> None:
    rng = np.random.default_rng(7)
    tables = [TableRows(name, rng.choice(2**40, n, replace=False).astype(np.uint64),
                        (rng.standard_normal((n, dim)) * scale + rng.uniform(-3, 3, (n, 1)) * scale
                         ).astype(np.float32), np.empty(0, np.uint64))
              for name, n, dim in (("a", 3000, 16), ("b", 800, 64))]
    cut = decode_cut(encode_cut(replace(HEADER, dtype="int8"), tables))
    for want, got in zip(tables, cut, strict=True):
        err = np.abs(got.embeddings.astype(np.float64) - want.embeddings).max(axis=1)
        bound = _int8_bound(want.embeddings)
        assert (err <= bound).all(), float((err / bound).max())
        assert (err <= (want.embeddings.max(1) - want.embeddings.min(1)) / 510 * 1.01 + 1e-6).all()


def test_int8_constant_rows() -> None:
    rows = np.array([[0.5] * 8, [0.1] * 8, [0.0] * 8, [-1234.567] * 8], np.float32)
    q, scale, offset = quantize_rows(rows)
    back = dequantize_rows(q, scale, offset)
    assert scale[0] == 0 and scale[2] == 0 and (back[[0, 2]] == rows[[0, 2]]).all()
    ulp = np.spacing(np.abs(rows[:, 0]).astype(np.float16)).astype(np.float32)
    assert (np.abs(back - rows).max(axis=1) <= ulp / 200 + 1e-6).all()


def test_int8_refuses_values_it_cannot_quantize() -> None:
    for bad in (np.nan, np.inf, 1e6):
        rows = table_rows("emb", 3, 4)
        rows.embeddings[1, 2] = bad
        with pytest.raises(ValueError, match="'emb'"):
            encode_cut(replace(HEADER, dtype="int8"), [rows])


# ------------------------------------------------------------------------------ writer checks


@pytest.mark.parametrize(("tables", "reason"), [
    ([TableRows("t", np.array([1, 2, 1], np.uint64), np.zeros((3, 4), np.float32),
                np.empty(0, np.uint64))], "'t': signs holds sign 1 more than once"),
    ([TableRows("t", np.array([1], np.uint64), np.zeros((1, 4), np.float32),
                np.array([5, 5], np.uint64))], "'t': deleted holds sign 5"),
    ([TableRows("t", np.array([1, 2], np.uint64), np.zeros((2, 4), np.float32),
                np.array([2], np.uint64))], "'t': sign 2 is both upserted and deleted"),
    ([TableRows("t", np.array([1, 2], np.uint64), np.zeros((3, 4), np.float32),
                np.empty(0, np.uint64))], "'t' embeddings must be"),
    ([TableRows("t", np.array([1], np.uint64), np.zeros((1, 4), np.float32),
                np.empty(0, np.uint64), np.zeros((2, 1), np.float32))], "'t' state"),
    ([TableRows("t", np.array([-1]), np.zeros((1, 4), np.float32), np.empty(0, np.uint64))],
     "'t' signs must be non-negative"),
    ([table_rows("t", 1, 4), table_rows("t", 1, 4)], "each table once"),
])
def test_writer_refuses_inconsistent_tables(tables: list[TableRows], reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        encode_cut(HEADER, tables)


def test_writer_checks_the_header_tables() -> None:
    header = replace(HEADER, tables=(CutTable("a", 8),))
    with pytest.raises(ValueError, match="'a': embeddings are 4 wide"):
        encode_cut(header, [table_rows("a", 2, 4)])
    with pytest.raises(ValueError, match="lists 'a'"):
        encode_cut(header, [table_rows("b", 2, 8)])
    with pytest.raises(ValueError, match="lists 1 tables, 2 given"):
        encode_cut(header, [table_rows("a", 2, 8), table_rows("b", 2, 8)])
    with pytest.raises(ValueError, match="lane"):
        encode_cut(replace(HEADER, lane="emb"), [table_rows("a", 2, 8)])


# ------------------------------------------------------------------------------ v1 beside v2


def test_v1_and_v2_side_by_side() -> None:
    v1_header = PacketHeader(model="ctr", table="emb", producer="trainer-0", generation=3,
                             sequence=9, dtype="float16")
    rows = table_rows("emb", 40, 8, deletes=4, state_dim=3)
    v1 = encode_packet(v1_header, rows.signs, rows.embeddings, deleted=rows.deleted, state=rows.state)
    v2 = encode_cut(HEADER, mixed_tables())
    old, new = decode_cut(v1), decode_cut(v2)
    assert old.header.format_version == 1 and old.header.lane == "emb" and old.header.table == "emb"
    assert old.header.dtype == "float16"
    assert old.header.tables == (CutTable("emb", 8, 40, 4, 3),)
    (only,) = old.tables
    np.testing.assert_array_equal(only.signs, rows.signs)
    np.testing.assert_array_equal(only.deleted, rows.deleted)
    np.testing.assert_allclose(only.embeddings, rows.embeddings, atol=0.01)
    assert only.state is not None and only.state.shape == (40, 3)
    assert new.header.format_version == 2 and len(new.tables) == 5
    assert read_cut_header(v1) == old.header and read_cut_header(v2) == new.header
    assert PacketId.of(old.header).key == "ctr/emb/trainer-0/0000000003-000000000009.arrow"
    at = v1.find(rows.embeddings[3].astype(np.float16).tobytes())
    assert at > 0
    with pytest.raises(CorruptPacketError, match="checksum"):  # v1 checks stay on
        decode_cut(v1[:at] + bytes([v1[at] ^ 1]) + v1[at + 1:], where="v1")


# ------------------------------------------------------------------------------ hostile input


def valid() -> bytes:
    return encode_cut(HEADER, mixed_tables())


def test_truncated_and_torn_cuts_are_rejected() -> None:
    data = valid()
    assert_rejected(data[:-10], CorruptPacketError, "torn or truncated")
    assert_rejected(data[: len(data) // 2], CorruptPacketError, "torn or truncated")
    assert_rejected(b"PAR1" + data[4:], CorruptPacketError, "bad magic")
    assert_rejected(data[:8], CorruptPacketError, "bad magic")
    with pytest.raises(CorruptPacketError):
        read_cut_header(data[:-10])


def test_a_flipped_value_byte_fails_the_checksum() -> None:
    tables = mixed_tables()
    data = valid()
    at = data.find(tables[2].embeddings[3].tobytes()) + 5
    assert at > 5
    assert_rejected(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:], CorruptPacketError,
                    "checksum mismatch")
    decode_cut(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:], verify_checksum=False)


def test_every_flipped_byte_or_truncation_raises_only_packet_errors() -> None:
    data = encode_cut(HEADER, [table_rows("a", 3, 4, deletes=1), table_rows("b", 2, 8, state_dim=1)])
    for at in range(0, len(data), 3):
        for mutated in (data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:], data[:at]):
            with contextlib.suppress(PacketError):  # anything else fails the test
                decode_cut(mutated)


def test_list_offsets_must_step_by_the_dim() -> None:
    data = valid()
    embedding = column(data, "embedding")
    offsets = embedding.offsets.to_numpy().copy()
    offsets[1] += 1  # row 0 of 'small' takes 5 values, row 1 takes 3: same total
    bad = pa.ListArray.from_arrays(pa.array(offsets), embedding.values)
    assert_rejected(rewrite(data, columns={"embedding": bad}), CorruptPacketError,
                    "table 'small': 'embedding' offsets are not 4 values per upsert")
    offsets = embedding.offsets.to_numpy().copy()
    offsets[55:] += 16  # a delete of 'small' holds a row
    bad = pa.ListArray.from_arrays(pa.array(offsets), pa.concat_arrays(
        [embedding.values, pa.array(np.zeros(16, np.float32))]))
    assert_rejected(rewrite(data, columns={"embedding": bad}), CorruptPacketError,
                    "table 'small': 'embedding' offsets")


def test_the_table_column_must_agree_with_the_header() -> None:
    data = valid()
    table = column(data, "table")
    indices = table.indices.to_numpy().copy()
    indices[[0, -1]] = indices[[-1, 0]]
    swapped = pa.DictionaryArray.from_arrays(pa.array(indices), table.dictionary)
    assert_rejected(rewrite(data, columns={"table": swapped}), CorruptPacketError,
                    "table 'small': column 'table' disagrees")
    renamed = pa.DictionaryArray.from_arrays(
        table.indices, pa.array(["small", "empty", "wide", "gone", "other"]))
    assert_rejected(rewrite(data, columns={"table": renamed}), CorruptPacketError,
                    "column 'table' names")
    plain = table.cast(pa.string())
    assert_rejected(rewrite(data, columns={"table": plain}), CorruptPacketError, "column 'table'")


def test_ops_nulls_and_counts_are_checked() -> None:
    data = valid()
    ops = column(data, "op").to_numpy().copy()
    ops[3] = 7
    assert_rejected(rewrite(data, columns={"op": pa.array(ops)}), CorruptPacketError, "unknown op code 7")
    ops[3] = 1
    assert_rejected(rewrite(data, columns={"op": pa.array(ops)}), CorruptPacketError,
                    "table 'small': column 'op' disagrees")
    signs = column(data, "sign").to_pylist()
    signs[2] = None
    assert_rejected(rewrite(data, columns={"sign": pa.array(signs, pa.uint64())}), CorruptPacketError,
                    "holds nulls")
    embedding = column(data, "embedding")
    values = embedding.values.to_pylist()
    values[1] = None
    holed = pa.ListArray.from_arrays(embedding.offsets, pa.array(values, pa.float32()))
    assert_rejected(rewrite(data, columns={"embedding": holed}), CorruptPacketError, "nulls")
    header = decode_cut(data).header
    more = json.dumps([{**t, "rows": t["rows"] + 1} if t["name"] == "mid" else t
                       for t in json.loads(_tables_meta(data))], separators=(",", ":"))
    assert_rejected(rewrite(data, metadata={"tables": more}), CorruptPacketError, "rows, metadata says")
    assert header.rows == 100


def _tables_meta(data: bytes) -> str:
    meta = pa.ipc.open_file(pa.BufferReader(data)).schema.metadata
    return meta[(META_PREFIX + "tables").encode()].decode()


def test_duplicate_signs_are_rejected() -> None:
    data = valid()
    signs = column(data, "sign").to_numpy().copy()
    signs[1] = signs[0]
    assert_rejected(rewrite(data, columns={"sign": pa.array(signs)}), CorruptPacketError,
                    "checksum mismatch")
    assert_rejected(rewrite(data, columns={"sign": pa.array(signs)}), CorruptPacketError,
                    "table 'small': duplicate sign", verify_checksum=False)
    signs = column(data, "sign").to_numpy().copy()
    signs[54] = signs[0]  # a delete of 'small' equals one of its upserts
    assert_rejected(rewrite(data, columns={"sign": pa.array(signs)}), CorruptPacketError,
                    "duplicate sign", verify_checksum=False)


def test_compressed_and_multi_batch_cuts_are_rejected() -> None:
    data = valid()
    assert_rejected(rewrite(data, compression="zstd"), UnsupportedPacketError, "compressed")
    assert_rejected(rewrite(data, batches=2), CorruptPacketError, "exactly one record batch")


def test_limits_are_enforced() -> None:
    data = valid()
    assert_rejected(data, PacketTooLargeError, "table 'wide': dim 64",
                    limits=PacketLimits(max_dim=32))
    assert_rejected(data, PacketTooLargeError, "115 rows over the 100-row limit",
                    limits=PacketLimits(max_rows=100))
    assert_rejected(data, PacketTooLargeError, "byte limit", limits=PacketLimits(max_bytes=1000))
    huge = json.dumps([{**t, "dim": 10**6} for t in json.loads(_tables_meta(data))])
    assert_rejected(rewrite(data, metadata={"tables": huge}), PacketTooLargeError, "dim 1000000")


@pytest.mark.parametrize(("tables", "reason"), [
    ("[{", "not JSON"),
    ('{"name": "a"}', "must be a list"),
    ('[{"name": "a"}]', "tables[0] must be an object with keys"),
    ('[{"name": "../a", "dim": 4, "rows": 0, "deleted_rows": 0, "state_dim": 0}]', "tables[0]"),
    ('[{"name": "a", "dim": "4", "rows": 0, "deleted_rows": 0, "state_dim": 0}]', "tables[0]"),
    ('[{"name": "a", "dim": 0, "rows": 0, "deleted_rows": 0, "state_dim": 0}]', "dim must be positive"),
])
def test_bad_tables_metadata_is_rejected(tables: str, reason: str) -> None:
    assert_rejected(rewrite(valid(), metadata={"tables": tables}), CorruptPacketError, reason)
    with pytest.raises(CorruptPacketError, match="tables"):
        read_cut_header(rewrite(valid(), metadata={"tables": tables}))


def test_unknown_versions_and_dtypes_are_unsupported() -> None:
    assert_rejected(rewrite(valid(), metadata={"format_version": "3"}), UnsupportedPacketError,
                    "format version '3'")
    assert_rejected(rewrite(valid(), metadata={"dtype": "bfloat16"}), UnsupportedPacketError,
                    "dtype 'bfloat16'")
    assert_rejected(rewrite(valid(), metadata={"generation": "-1"}), CorruptPacketError,
                    "generation")


def test_int8_scale_must_be_finite() -> None:
    data = encode_cut(replace(HEADER, dtype="int8"), mixed_tables())
    scale = column(data, "scale").to_numpy().copy()
    scale[0] = np.inf
    assert_rejected(rewrite(data, columns={"scale": pa.array(scale)}), CorruptPacketError,
                    "'scale' holds a non-finite value")


# ------------------------------------------------------------------------------ third parties


def write_stream(folder: Path, dtype: str = "float32") -> list[bytes]:
    """Two cuts of one producer: one with deletes, one without."""
    header = replace(HEADER, dtype=dtype)
    first = encode_cut(header, mixed_tables())
    second = encode_cut(replace(header, sequence=43),
                        [table_rows("small", 10, 4, seed=9), table_rows("mid", 5, 16, seed=8)])
    for sequence, data in ((42, first), (43, second)):
        path = folder / cut_key("ctr", "trainer-0", 7, sequence)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [first, second]


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_every_cut_of_a_stream_has_one_schema(dtype: str, tmp_path: Path) -> None:
    first, second = write_stream(tmp_path, dtype)
    schemas = [pa.ipc.open_file(pa.BufferReader(d)).schema for d in (first, second)]
    assert schemas[0].equals(schemas[1], check_metadata=False)
    assert schemas[0].names == cut_columns(dtype)
    assert decode_cut(second).header.deleted_rows == 0


def test_pyarrow_dataset_reads_every_row(tmp_path: Path) -> None:
    write_stream(tmp_path)
    table = ds.dataset(tmp_path / "ctr" / CUT_LANE, format="ipc").to_table()
    assert table.num_rows == 115 + 15
    frame = table.select(["table", "op"]).to_pylist()
    deletes = [row["table"] for row in frame if row["op"] == 1]
    assert sorted(set(deletes)) == ["gone", "mid", "small"] and len(deletes) == 15
    assert sum(row["table"] == "small" for row in frame) == 55 + 10


def test_polars_reads_cuts(tmp_path: Path) -> None:
    write_stream(tmp_path)
    files = sorted((tmp_path / "ctr" / CUT_LANE / "trainer-0").iterdir())
    frame = pl.concat([pl.read_ipc(path) for path in files])
    assert frame.height == 130 and frame.columns == cut_columns("float32")
    counts = dict(frame.group_by("table").len().select(pl.col("table").cast(pl.String), "len").iter_rows())
    assert counts == {"small": 65, "wide": 20, "gone": 7, "mid": 38}
    upserts = frame.filter((pl.col("op") == 0) & (pl.col("table").cast(pl.String) == "wide"))
    assert upserts["embedding"].list.len().unique().to_list() == [64]
    assert frame.filter(pl.col("op") == 1)["embedding"].list.len().max() == 0


# ------------------------------------------------------------------------------ naming


def test_cut_keys_and_identities() -> None:
    key = cut_key("ctr", "trainer-0", 7, 42)
    assert key == "ctr/~cuts/trainer-0/0000000007-000000000042.arrow"
    written = decode_cut(valid()).header
    pid = PacketId.of(written)
    assert pid == PacketId("ctr", CUT_LANE, "trainer-0", 7, 42) and pid.key == key
    assert pid.stream == ("ctr", CUT_LANE, "trainer-0")
    assert packet_path("s3://b/inc/", written) == f"s3://b/inc/{key}"
    assert parse_packet_path(f"s3://b/inc/{key}") == pid
    assert stream_prefix("ctr", CUT_LANE, "trainer-0") == "ctr/~cuts/trainer-0/"
    assert stream_prefix("ctr", CUT_LANE) == "ctr/~cuts/"
    for lane in ("_other", "_cuts/x", ""):
        with pytest.raises(ValueError):
            PacketId("ctr", lane, "p", 0, 0)
    with pytest.raises(PacketError):
        parse_packet_path("s3://b/inc/ctr/_x/trainer-0/0000000007-000000000042.arrow")


# ------------------------------------------------------------------------------ announcement


def test_cut_announcement_round_trip() -> None:
    data = valid()
    header = decode_cut(data).header
    note = Announcement.for_cut("s3://b/inc", header, len(data))
    assert note.table == CUT_LANE and note.rows == 100 and note.deleted_rows == 15
    assert note.uri == "s3://b/inc/" + cut_key("ctr", "trainer-0", 7, 42)
    assert note.format_version == 1 and note.checksum == header.checksum
    assert Announcement.from_json(note.to_json()) == note
    record = json.loads(note.to_json())
    with pytest.raises(AnnouncementError, match="table"):
        Announcement.from_json(json.dumps({**record, "table": "_other"}))


# ------------------------------------------------------------------------------ manifest


def cut_manifest() -> CheckpointManifest:
    return CheckpointManifest(
        model="ctr", tables={"emb": ManifestTable(dim=16, rows=0, parts=())},
        watermarks=(Watermark("emb", "old-trainer", 3, 17), Watermark(CUT_LANE, "trainer-0", 7, 42)),
    )


def test_manifest_v2_writes_cut_watermarks_without_a_table() -> None:
    manifest = cut_manifest()
    record = json.loads(manifest.to_json())
    assert record["format_version"] == 2
    assert record["watermarks"] == [
        {"table": "emb", "producer": "old-trainer", "generation": 3, "sequence": 17},
        {"producer": "trainer-0", "generation": 7, "sequence": 42}]
    assert CheckpointManifest.from_json(manifest.to_json()) == manifest


def test_manifest_v1_still_reads_and_cannot_hold_cut_watermarks() -> None:
    v1 = {"kind": "persia-inc-checkpoint", "format_version": 1, "model": "ctr", "created_at_ns": 5,
          "tables": {}, "watermarks": [{"table": "emb", "producer": "p", "generation": 1,
                                        "sequence": 2}]}
    manifest = CheckpointManifest.from_json(json.dumps(v1))
    assert manifest.watermarks == (Watermark("emb", "p", 1, 2),) and manifest.format_version == 1
    assert json.loads(manifest.to_json()) == v1
    del v1["watermarks"][0]["table"]  # type: ignore[attr-defined]
    with pytest.raises(ManifestError, match=r"watermarks\[0\].table"):
        CheckpointManifest.from_json(json.dumps(v1))
    with pytest.raises(ValueError, match="version 1"):
        replace(cut_manifest(), format_version=1).to_json()


def test_manifest_refuses_the_lane_spelled_as_a_table() -> None:
    record = json.loads(cut_manifest().to_json())
    record["watermarks"][1]["table"] = CUT_LANE
    with pytest.raises(ManifestError, match=r"watermarks\[1\].table"):
        CheckpointManifest.from_json(json.dumps(record))


def test_watermarks_validate_the_lane() -> None:
    assert Watermark(CUT_LANE, "p", 0, 0).table == CUT_LANE
    for bad in (("_x", "p", 0, 0), ("emb", "a/b", 0, 0), ("emb", "p", -1, 0)):
        with pytest.raises(ValueError):
            Watermark(*bad)
