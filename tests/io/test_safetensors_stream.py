"""deepmoe.io.safetensors_stream, the one streaming safetensors reader and writer (merge, checkpoints):
what it reads is what `safetensors.torch.load_file` reads, whole or a row block at a time, and what it
writes `load_file` reads back bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepmoe.io.safetensors_stream import (
    CheckpointError,
    ShardWriter,
    read_header,
    read_rows,
    read_tensor,
    row_blocks,
    tensor_locations,
    write_file,
)

# cpu_only: safetensors files streamed to CPU tensors
pytestmark = pytest.mark.cpu_only

MERGE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in MERGE_DTYPES:
        name = str(dtype).removeprefix("torch.")
        out[f"{name}.matrix"] = torch.randn(37, 11, generator=g).to(dtype)
        out[f"{name}.cube"] = torch.randn(5, 3, 4, generator=g).to(dtype)
        out[f"{name}.vector"] = torch.randn(13, generator=g).to(dtype)
        out[f"{name}.scalar"] = torch.randn((), generator=g).to(dtype)
    out["special"] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40])
    out["fp8"] = torch.randn(6, 4, generator=g).to(torch.float8_e4m3fn)
    out["ints"] = torch.arange(-5, 5, dtype=torch.int64)
    out["empty"] = torch.zeros(0, 7, dtype=torch.bfloat16)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes (bit-for-bit comparison: NaN and −0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_reader_returns_what_load_file_returns_whole_and_by_row_blocks(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    located = tensor_locations(path)
    assert set(located) == set(want)
    with open(path, "rb") as f:
        for name, t in located.items():
            assert t.shape == tuple(want[name].shape)
            got = read_tensor(f, t)
            assert got.dtype == want[name].dtype and _bits(got).equal(_bits(want[name])), name
            blocks = list(row_blocks(t, max_bytes=16))  # a few rows each
            assert [r0 for r0, _ in blocks] == sorted({r0 for r0, _ in blocks})
            if t.shape and t.shape[0] > 1:
                assert len(blocks) > 1, name
            pieces = [read_rows(f, t, r0, r1) for r0, r1 in blocks]
            if pieces:
                joined = torch.cat(pieces) if t.shape else pieces[0]
                assert _bits(joined).equal(_bits(want[name])), name
            if t.shape and t.shape[0] >= 3:  # one row block from the middle
                assert _bits(read_rows(f, t, 1, 3)).equal(_bits(want[name][1:3])), name


def test_writer_output_loads_bit_identically(tmp_path):
    tensors = _tensors()
    path = write_file(tmp_path / "whole.safetensors", tensors, metadata={"step": "3"})
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert _bits(loaded[name]).equal(_bits(t)), name
    # row block by row block, from views that share memory (as a merge or an expert split writes)
    base = torch.randn(8, 6).to(torch.bfloat16)
    entries = [("top", torch.bfloat16, (4, 6)), ("all", torch.bfloat16, (8, 6)), ("s", torch.float64, ())]
    with ShardWriter(tmp_path / "rows.safetensors", entries) as writer:
        writer.write(base[:4])
        for r0 in range(0, 8, 3):
            writer.write(base[r0 : r0 + 3])
        writer.write(torch.tensor(2.5, dtype=torch.float64))
    loaded = load_file(str(tmp_path / "rows.safetensors"))
    assert _bits(loaded["top"]).equal(_bits(base[:4])) and _bits(loaded["all"]).equal(_bits(base))
    assert loaded["s"].item() == 2.5


def test_writer_refuses_wrong_dtype_size_and_missing_bytes(tmp_path):
    with pytest.raises(RuntimeError, match="is BF16"), ShardWriter(tmp_path / "x", [("w", "BF16", (2,))]) as w:
        w.write(torch.zeros(2))
    with pytest.raises(RuntimeError, match="past its end"), ShardWriter(tmp_path / "x", [("w", "F32", (2,))]) as w:
        w.write(torch.zeros(3))
    with pytest.raises(RuntimeError, match="header says 8"), ShardWriter(tmp_path / "x", [("w", "F32", (2,))]) as w:
        w.write(torch.zeros(1))


def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    t = tensor_locations(path)["w"]
    with open(path, "rb") as f, pytest.raises(CheckpointError, match="truncated file"):
        read_tensor(f, t)
    (tmp_path / "junk").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="junk: not a safetensors file"):
        read_header(tmp_path / "junk")
