"""Generations that make sense: a stray far-future packet never silences a stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_producer_support import NumpyModel, producer_config

from persia_inc.packet_format import MAX_GENERATION, PacketHeader, encode_packet, packet_key
from persia_inc.producer import UnstoredDataError, WriterFailedError
from persia_inc.producer.generation import GenerationOverflowError, next_generation
from persia_inc.storage import open_store
from persia_inc.wiring import producer_from_config


def _stray(root: Path, generation: int, producer: str = "producer-0") -> Path:
    header = PacketHeader(model="ctr", table="emb", producer=producer, generation=generation,
                          sequence=0)
    path = root / packet_key("ctr", "emb", producer, generation, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_packet(header, np.arange(3, dtype=np.uint64), np.ones((3, 4), np.float32)))
    return path


def test_next_generation_after_the_largest_names_the_file(tmp_path: Path) -> None:
    stray = _stray(tmp_path, MAX_GENERATION)
    _stray(tmp_path, 7, producer="someone-else")
    with open_store(str(tmp_path)) as store:
        with pytest.raises(GenerationOverflowError, match=str(stray.name)) as caught:
            next_generation(store, "ctr", "producer-0")
        assert caught.value.uri.endswith(stray.name)
        assert next_generation(store, "ctr", "someone-else") == 8


def test_producer_behind_a_stray_largest_generation_refuses_with_the_file(tmp_path: Path) -> None:
    stray = _stray(tmp_path / "inc", MAX_GENERATION)
    model = NumpyModel()
    producer = producer_from_config(producer_config(str(tmp_path / "inc")))
    producer.register_table("emb", model.read)
    with pytest.raises(WriterFailedError, match=stray.name):
        producer.wait_generation(10)
    with pytest.raises(WriterFailedError, match=stray.name):
        producer.record("emb", model.step(10))
    with pytest.raises(UnstoredDataError, match=stray.name) as unstored:
        producer.close()
    assert unstored.value.rows == 10 and unstored.value.tables == ["emb"]
    assert stray.exists()  # never destroyed: it is the user's to move
