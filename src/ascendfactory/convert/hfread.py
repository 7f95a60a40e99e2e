"""Lazy reads from an HF safetensors checkpoint: one tensor, or a row / column range of it.

Each read copies the requested bytes with positioned reads (preadv) straight into the returned tensor's
memory: no memory map, so no page faults per 4 KiB page (system time that dominated the reads) and no
file pages of earlier reads mapped (and counted) in this process. A row range is one contiguous byte range;
a column range reads the same range, each row's columns into their place and the other columns into a
scratch buffer (no copy of whole rows, no second buffer).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from ascendfactory.errors import UserError

if TYPE_CHECKING:  # torch only in annotations: fingerprint.py (used by `plan`) imports INDEX from here
    import torch

INDEX = "model.safetensors.index.json"


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF model folder; UserError naming the folder when there are none."""
    d = Path(model_dir)
    index = d / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{index}: not a valid safetensors index ({e}); re-save the model") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise UserError(f"{d / missing[0]}: weight file listed in {INDEX} is missing; re-download the model")
        return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    if any(d.glob("pytorch_model*.bin")):
        raise UserError(f"{d}: only .bin weights found; re-save with save_pretrained(safe_serialization=True)")
    raise UserError(f"{d}: no *.safetensors weights found; point --hf-dir at a complete HF model folder")


# safetensors dtype names -> torch dtype attribute names (torch is imported only when reading)
_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _data_offsets(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (dtype, absolute file offset of its data), from the safetensors header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: (v["dtype"], 8 + n + v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


class SafetensorsReader:
    """Implements sharding.Reader over every safetensors file of a model folder."""

    def __init__(self, model_dir: str | Path):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.offsets: dict[str, tuple[str, int]] = {}
        for path in weight_files(model_dir):
            try:
                with safe_open(str(path), framework="pt") as f:  # validates the header and the data's size
                    for name in f.keys():
                        self.where[name] = path
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except Exception as e:  # safetensors raises its own error types for truncated / bad headers
                raise UserError(f"{path}: unreadable safetensors file ({e}); re-download the model") from None
            self.offsets.update(_data_offsets(path))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def __call__(self, name: str, rows=None, cols=None) -> torch.Tensor:
        import torch

        dtype, offset = self.offsets[name]
        shape = self.shapes[name]
        if dtype not in _DTYPES:  # rare dtypes (fp8, ...): safetensors' own reader
            with safe_open(str(self.where[name]), framework="pt") as f:
                sl = f.get_slice(name)
                return sl[rows[0]:rows[1]] if rows is not None else sl[:, cols[0]:cols[1]] if cols else sl[:]
        dtype = getattr(torch, _DTYPES[dtype])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        first, last = rows if rows is not None else (0, shape[0] if shape else 1)
        out = torch.empty(((last - first, *shape[1:]) if cols is None else (last - first, cols[1] - cols[0],
                                                                            *shape[2:])) if shape else (), dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        iov = [view]
        if cols is not None:  # each row's columns straight into place, the others into one scratch buffer
            col_bytes = row_bytes // shape[1]
            keep, before, after = [n * col_bytes for n in (cols[1] - cols[0], cols[0], shape[1] - cols[1])]
            skip = memoryview(bytearray(max(before, after)))
            iov = [v for r in range(last - first) for v in (skip[:before], view[r * keep:(r + 1) * keep], skip[:after])]
        fd = os.open(self.where[name], os.O_RDONLY)
        try:
            _preadv_all(fd, iov, offset + first * row_bytes, f"{self.where[name]}: truncated at tensor {name}; "
                        "re-download the model")
        finally:
            os.close(fd)
        return out


def _preadv_all(fd: int, iov: list[memoryview], offset: int, truncated: str) -> None:
    """Fill the buffers `iov` from consecutive bytes at `offset`: preadv takes at most IOV_MAX buffers and may
    return fewer bytes than asked (large reads, signals); UserError(truncated) at the end of the file."""
    iov, limit, i = [v for v in iov if len(v)], os.sysconf("SC_IOV_MAX"), 0
    while i < len(iov):
        got = os.preadv(fd, iov[i:i + limit], offset)
        if got == 0:
            raise UserError(truncated)
        offset += got
        while i < len(iov) and got >= len(iov[i]):
            got -= len(iov[i])
            i += 1
        if got:
            iov[i] = iov[i][got:]
