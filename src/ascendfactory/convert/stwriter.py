"""Sharded safetensors written tensor by tensor.

The output is planned up front (names, shapes, dtype), so each file's header is known before its
data and every tensor goes to disk as soon as it is merged: memory does not grow with the shard size.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from ascendfactory.convert.hfread import INDEX
from ascendfactory.errors import UserError

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' (HF's decimal units), '500MiB', or a number of bytes."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m:
            raise UserError(f"--shard-size: {text!r} is not a size; use e.g. 5GB, 500MB or a number of bytes")
        size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size < 1:
        raise UserError(f"--shard-size: must be positive, got {text!r}")
    return size


class ShardedWriter:
    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, shard_size: int):
        self.out_dir, self.dtype = Path(out_dir), dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        filled = 0
        for name, shape in plan:
            nbytes = itemsize * math.prod(shape)
            if shards[-1] and filled + nbytes > shard_size:
                shards.append([])
                filled = 0
            shards[-1].append((name, shape, nbytes))
            filled += nbytes
        n = len(shards)
        self.shards = [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", s) for k, s in enumerate(shards)]
        self.order = [(fname, name, shape) for fname, s in self.shards for name, shape, _ in s]
        self.pos = 0
        self.file = None
        self.total = sum(nb for _, s in self.shards for *_, nb in s)

    def write(self, name: str, *parts: torch.Tensor) -> None:
        """The next planned tensor: one tensor, or its consecutive row pieces (written without joining them)."""
        fname, want, shape = self.order[self.pos]
        got = (sum(t.shape[0] for t in parts), *parts[0].shape[1:]) if parts[0].dim() else ()
        if name != want or got != tuple(shape) or any(t.shape[1:] != parts[0].shape[1:] for t in parts):
            raise UserError(f"tensor {name} has shape {got}, expected {want} {tuple(shape)}; "
                            f"does --hf-config-dir match the checkpoint's model?")
        if self.file is None or self.file.name != str(self.out_dir / fname):
            self._open(fname)
        for t in parts:
            self.file.write(memoryview(t.to(self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.pos += 1
        if self.pos == len(self.order) or self.order[self.pos][0] != fname:
            self.file.close()

    def _open(self, fname: str) -> None:
        header, offset = {}, 0
        for name, shape, nbytes in dict(self.shards)[fname]:
            header[name] = {"dtype": _ST_DTYPE[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
        self.file = open(self.out_dir / fname, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def finish(self) -> list[str]:
        if self.pos != len(self.order):
            raise RuntimeError(f"wrote {self.pos} of {len(self.order)} planned tensors")
        index = {"metadata": {"total_size": self.total}, "weight_map": {name: f for f, name, _ in self.order}}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
        return [f for f, _ in self.shards]
