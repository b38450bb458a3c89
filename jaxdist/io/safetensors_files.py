"""`.safetensors` files read a slice at a time and written a tensor at a time, in every dtype
(bf16 included, which the `safetensors` package's numpy side cannot read).

The format: 8 bytes (little-endian u64) giving the header's length, a JSON header mapping each
tensor name to its dtype, shape and byte range in the data that follows (plus an optional
`__metadata__` of strings), then the data, C order, little-endian. Reading maps the file
(`np.memmap`) and copies only the slice asked for, so the pages of the rest are never read.
Writing streams: the header is known from the shapes alone, then each tensor is written as it
arrives, so memory holds one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from jaxdist.errors import DataError, UsageError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # as the safetensors package: larger is a damaged file


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor is: its file, dtype, shape, and byte offset from the file's start."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the file at `path`; DataError naming the file when it is damaged."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise DataError(f"{path}: tensor {name} has dtype {entry['dtype']}, which jaxdist "
                            f"does not read")
        dtype, shape = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != dtype.itemsize * int(np.prod(shape)) or 8 + length + end > size:
            raise DataError(f"{path}: tensor {name} does not fit the file (truncated?)")
        tensors[name] = TensorInfo(path, dtype, shape, 8 + length + begin)
    return tensors


def read_slice(info: TensorInfo, index: tuple[slice, ...]) -> np.ndarray:
    """`index` of the tensor, copied out of the file (only its pages are read)."""
    if not all(info.shape):  # nothing to map
        return np.zeros(info.shape, info.dtype)[index]
    mapped = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset,
                       shape=info.shape)
    return np.array(mapped[index])


def dtype_name(dtype: np.dtype) -> str:
    """The format's name of a numpy dtype ("BF16" for ml_dtypes' bfloat16)."""
    if np.dtype(dtype) not in _NAMES:
        raise UsageError(f"dtype {np.dtype(dtype)} cannot be written to a safetensors file")
    return _NAMES[np.dtype(dtype)]


def write_file(path: Path, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
               tensors: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors named and shaped by `specs` (in its order), taking each from `tensors` as it
    comes; a tensor of another shape or dtype than its spec raises UsageError."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = np.dtype(dtype).itemsize * int(np.prod(shape))
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        names = iter(specs.items())
        for x in tensors:
            name, (shape, dtype) = next(names)
            if x.shape != tuple(shape) or x.dtype != np.dtype(dtype):
                raise UsageError(f"tensor {name} is {x.dtype}{list(x.shape)}, its header says "
                                 f"{np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
        if next(names, None) is not None:
            raise UsageError(f"{path}: fewer tensors came than its header lists")
        f.flush()
        os.fsync(f.fileno())
