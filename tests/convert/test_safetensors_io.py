"""Sharded safetensors writer/reader: round trips, format compatibility with torch, bad folders."""

import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from openr1_jax.convert.safetensors_io import INDEX_FILE, SafetensorsReader, ShardedSafetensorsWriter
from openr1_jax.errors import UserError

TORCH_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
}


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((40, 16)).astype(np.float32),
        "model.layers.0.mlp.weight": rng.standard_normal((33, 7)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.weight_fp8": rng.uniform(-448, 448, (64, 20)).astype(ml_dtypes.float8_e4m3fn),
        "model.layers.0.mlp.weight_scale_inv": rng.uniform(0, 1, (1, 1)).astype(np.float32),
        "model.positions": np.arange(-50, 50, dtype=np.int64),
        "model.norm.weight": np.float32(1.5).reshape(()),  # 0-d
        "model.layers.1.mlp.weight": rng.standard_normal((9, 31)).astype(ml_dtypes.bfloat16),
    }


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _write(folder, tensors, max_shard_bytes=1000):
    with ShardedSafetensorsWriter(folder, max_shard_bytes=max_shard_bytes) as writer:
        for name, array in tensors.items():
            writer.add(name, array)


def test_round_trip_is_bitwise_and_sharded(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors)

    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*shards, INDEX_FILE])  # no .partial left
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())

    with SafetensorsReader(tmp_path) as reader:
        assert reader.names() == sorted(tensors)
        assert len(reader) == len(tensors)
        assert "model.positions" in reader and "missing" not in reader
        assert reader.metadata() == index["metadata"]
        assert reader.dtype("model.layers.0.mlp.weight") == "BF16"
        assert reader.dtype("model.layers.0.mlp.weight_fp8") == "F8_E4M3"
        assert reader.dtype("model.positions") == "I64"
        for name, array in tensors.items():
            assert reader.shape(name) == array.shape
            assert reader.shard(name) == index["weight_map"][name]
            assert _same_bits(reader.get(name), array), name


def test_torch_reads_our_shards(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / shard))
    assert set(loaded) == set(tensors)
    with SafetensorsReader(tmp_path) as reader:
        for name, array in tensors.items():
            value = loaded[name]
            assert value.dtype == TORCH_DTYPES[reader.dtype(name)], name
            assert tuple(value.shape) == array.shape
            # Compare raw bytes: torch has no numpy bf16/fp8, and bits are what must match.
            assert value.reshape(-1).view(torch.uint8).numpy().tobytes() == array.tobytes(), name


def test_reads_torch_written_single_file(tmp_path):
    tensors = {
        "a": torch.randn(5, 3, dtype=torch.bfloat16),
        "b": torch.randn(17).to(torch.float8_e4m3fn),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(4, 4, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with SafetensorsReader(tmp_path) as reader:
        assert reader.names() == ["a", "b", "c", "d"]
        assert reader.metadata() == {}
        for name, value in tensors.items():
            got = reader.get(name)
            assert got.shape == tuple(value.shape)
            assert got.tobytes() == value.reshape(-1).view(torch.uint8).numpy().tobytes(), name
        assert reader.get("a").dtype == ml_dtypes.bfloat16


def test_oversized_tensor_gets_its_own_shard(tmp_path):
    small, big = np.ones(4, np.float32), np.ones(1000, np.float32)
    _write(tmp_path, {"small0": small, "big": big, "small1": small}, max_shard_bytes=64)
    weight_map = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]
    assert len({weight_map["small0"], weight_map["big"], weight_map["small1"]}) == 3
    with SafetensorsReader(tmp_path) as reader:
        assert _same_bits(reader.get("big"), big)


def test_big_endian_input_is_stored_little_endian(tmp_path):
    array = np.arange(12, dtype=">f4").reshape(3, 4)
    _write(tmp_path, {"x": array})
    with SafetensorsReader(tmp_path) as reader:
        np.testing.assert_array_equal(reader.get("x"), array)
        assert reader.dtype("x") == "F32"


def test_writer_rejects_duplicates_and_unknown_dtypes(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=8)
    writer.add("x", np.zeros(4, np.float32))
    writer.add("y", np.zeros(4, np.float32))  # flushes "x" to its own shard first
    with pytest.raises(ValueError, match="already added"):
        writer.add("x", np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="cannot store"):
        writer.add("z", np.zeros(2, np.complex64))
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.add("w", np.zeros(1, np.float32))


def test_failed_write_leaves_no_index(tmp_path):
    with pytest.raises(RuntimeError), ShardedSafetensorsWriter(tmp_path, max_shard_bytes=8) as writer:
        writer.add("x", np.zeros(4, np.float32))
        writer.add("y", np.zeros(4, np.float32))
        raise RuntimeError("conversion failed midway")
    assert not (tmp_path / INDEX_FILE).exists()


def test_missing_shard_raises_user_error(tmp_path):
    _write(tmp_path, _tensors())
    shard = json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"]["model.positions"]
    (tmp_path / shard).unlink()
    with pytest.raises(UserError, match=re.escape(shard) + ".*" + re.escape(INDEX_FILE)):
        SafetensorsReader(tmp_path)


def test_index_naming_absent_tensor_raises_user_error(tmp_path):
    _write(tmp_path, {"x": np.zeros(2, np.float32)})
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = index["weight_map"]["x"]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match="ghost"):
        SafetensorsReader(tmp_path)


def test_empty_folder_raises_user_error(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        SafetensorsReader(tmp_path)


def test_corrupt_file_raises_user_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(UserError, match="not valid JSON"):
        SafetensorsReader(tmp_path)


def test_truncated_file_raises_user_error(tmp_path):
    save_file({"x": torch.zeros(100)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with SafetensorsReader(tmp_path) as reader, pytest.raises(UserError, match="truncated"):
        reader.get("x")
