"""Lazy, torch-free reads of tensor slices from a (possibly index-sharded) safetensors checkpoint.

The loader asks for one device's slice at a time, so a tensor is never materialised whole on the host
unless a device needs all of it. The file is memory-mapped: a slice touches only its own pages. We parse
the header ourselves because ``safe_open(framework="numpy")`` cannot represent bfloat16 and the ``flax``
framework returns device arrays (on device 0); ml_dtypes gives numpy the bfloat16/float8 dtypes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsReader:
    """All tensors of a model directory (``model.safetensors`` or an index + shards), by name."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}")
        self._tensors: dict[str, np.ndarray] = {}
        for name in files:
            self._tensors.update(_map_file(directory / name))

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A view of the part of a tensor that ``index`` selects; pages are read when it is copied."""
        return self._tensors[name][index]


def _map_file(path: Path) -> dict[str, np.ndarray]:
    """Views into one memory map of a safetensors file (header: u64 length + JSON, then raw data)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} in {path.name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        tensors[name] = raw[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors
