"""Safetensors files read and written a piece at a time (docs/design.md#m5-hugging-face-checkpoints).

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape and
byte range of the data section; optional `__metadata__`), then the tensors' bytes. Reading: the header
gives each tensor's absolute byte range (`StoredTensor`), and `read_rows` reads rows [r0, r1) of dim 0
with plain file reads (no memory map, so no pages stay resident). Writing: `ShardWriter` writes the
header first (names, dtypes and shapes are known in advance), then each tensor's bytes in the header's
order, in as many pieces as the caller likes. So a file can be transformed with a few row blocks in
memory, not a model. Files written here load with `safetensors.torch.load_file`.

Every problem with a file raises `CheckpointError`, one line naming the file and, where there is one,
the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, unreadable, or does not match its config."""


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
"""Safetensors dtype code -> torch dtype, for the codes read and written here."""
CODES = {dtype: code for code, dtype in DTYPES.items()}

CHUNK_BYTES = 64 * 2**20
"""Default largest row block of `row_blocks`."""

_MAX_HEADER = 100 * 2**20  # as safetensors itself: a larger header is a corrupt file


def dtype_code(dtype: str | torch.dtype) -> str:
    """The safetensors code of a torch dtype (a code is returned as is)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in CODES:
        raise ValueError(f"dtype {dtype} cannot be stored: use one of {', '.join(map(str, CODES))}")
    return CODES[dtype]


def itemsize(code: str) -> int:
    return torch.empty((), dtype=DTYPES[code]).element_size()


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: file, dtype code, shape, absolute byte offsets [start, end)."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def rows(self) -> int:
        """Indices of dim 0 (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of dim 0 (the whole tensor for a scalar)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, offset of the data section) of a safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {size} bytes)")
            raw = f.read(size)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    if len(raw) < size:
        raise CheckpointError(f"{path}: ends inside its header (truncated file)")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + size


def tensor_locations(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Name -> StoredTensor of every tensor of one safetensors file, in the header's order."""
    path = Path(path)
    header, data_start = read_header(path)
    out = {}
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            shape, dtype = tuple(int(n) for n in entry["shape"]), str(entry["dtype"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: header entry of tensor {name!r} is malformed: {entry!r}") from None
        if not 0 <= begin <= end or (dtype in DTYPES and end - begin != math.prod(shape) * itemsize(dtype)):
            raise CheckpointError(f"{path}: tensor {name!r}: byte range [{begin}, {end}) does not fit {dtype} {shape}")
        out[name] = StoredTensor(path, dtype, shape, data_start + begin, data_start + end)
    return out


def read_rows(f: BinaryIO, t: StoredTensor, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of dim 0 of `t` (all of a scalar) in its stored dtype, read from the open file `f`
    (of `t.path`) with plain file reads into a new tensor."""
    if t.dtype not in DTYPES:
        raise CheckpointError(f"{t.path}: dtype {t.dtype} is not read here (one of {', '.join(DTYPES)})")
    buffer = torch.empty((r1 - r0) * t.row_bytes, dtype=torch.uint8)
    view, done = memoryview(buffer.numpy()), 0
    f.seek(t.start + r0 * t.row_bytes)
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{t.path}: ends inside a tensor (truncated file)")
        done += n
    shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
    return buffer.view(DTYPES[t.dtype]).reshape(shape)


def read_tensor(f: BinaryIO, t: StoredTensor) -> Tensor:
    """All of `t`, read from the open file `f`."""
    return read_rows(f, t, 0, t.rows)


def row_blocks(t: StoredTensor, max_bytes: int = CHUNK_BYTES, work_itemsize: int = 4) -> Iterator[tuple[int, int]]:
    """[r0, r1) row ranges covering `t` of at most `max_bytes` once converted to a dtype of
    `work_itemsize` bytes (float32 by default); a row larger than that is a block of its own."""
    per_row = max(1, t.row_bytes * work_itemsize // itemsize(t.dtype))
    step = max(1, max_bytes // per_row)
    for r0 in range(0, t.rows, step):
        yield r0, min(t.rows, r0 + step)


class ShardWriter:
    """One safetensors file written piece by piece: the header (names, dtypes, shapes, offsets) is
    written first, then each tensor's bytes in the header's order, by `write` calls of whole tensors or
    row blocks. Closing checks that every byte was written and fsyncs the file."""

    def __init__(
        self,
        path: str | os.PathLike,
        entries: Sequence[tuple[str, str | torch.dtype, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ):
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self._ranges: list[tuple[str, str, int]] = []  # (name, dtype code, end offset)
        offset = 0
        for name, dtype, shape in entries:
            if name in header:
                raise ValueError(f"{path}: tensor {name!r} listed twice")
            code = dtype_code(dtype)
            nbytes = math.prod(shape) * itemsize(code)
            header[name] = {"dtype": code, "shape": [int(n) for n in shape], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._ranges.append((name, code, offset))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = Path(path)
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.expected = offset
        self.written = 0
        self._current = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            if exc_type is None:
                if self.written != self.expected:
                    raise RuntimeError(f"{self.path}: wrote {self.written} data bytes, its header says {self.expected}")
                self.file.flush()
                os.fsync(self.file.fileno())
        finally:
            self.file.close()

    def write(self, rows: Tensor) -> None:
        """The next bytes of the current tensor: all of it or its next rows, in its dtype."""
        data = rows.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if not data.nbytes:
            return
        while self._current < len(self._ranges) and self._ranges[self._current][2] <= self.written:
            self._current += 1
        if self._current == len(self._ranges):
            raise RuntimeError(f"{self.path}: {data.nbytes} bytes written past the last tensor")
        name, code, end = self._ranges[self._current]
        if rows.dtype != DTYPES[code]:
            raise RuntimeError(f"{self.path}: tensor {name!r} is {code}, got {rows.dtype}")
        if self.written + data.nbytes > end:
            raise RuntimeError(f"{self.path}: tensor {name!r}: {data.nbytes} bytes written past its end")
        self.file.write(memoryview(data))
        self.written += data.nbytes


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write whose dtype and shape are known now and whose values `make()` produces only
    when it is written (e.g. read from another checkpoint), so a file's tensors are never all in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(dtype_code(self.dtype))


def write_file(
    path: str | os.PathLike, tensors: Mapping[str, Tensor | PendingTensor], metadata: dict[str, str] | None = None
) -> Path:
    """`tensors` into one safetensors file at `path`, tensor by tensor (views are fine: each is copied
    only while it is written; a `PendingTensor` is made right before it is written), fsynced."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(path, entries, metadata) as writer:
        for name, t in tensors.items():
            value = t.make() if isinstance(t, PendingTensor) else t
            if tuple(value.shape) != tuple(t.shape):
                raise RuntimeError(f"{path}: tensor {name!r} has shape {list(value.shape)}, expected {list(t.shape)}")
            writer.write(value)
            del value  # a view keeps all of its tensor alive: let it go before the next one is made
    return Path(path)


__all__ = [
    "CHUNK_BYTES",
    "DTYPES",
    "CheckpointError",
    "PendingTensor",
    "ShardWriter",
    "StoredTensor",
    "dtype_code",
    "read_header",
    "read_rows",
    "read_tensor",
    "row_blocks",
    "tensor_locations",
    "write_file",
]
