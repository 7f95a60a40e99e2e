"""Lazy reads from an HF safetensors checkpoint: one tensor, or a row / column range of it.

Each read opens the file, copies the requested slice out of the memory map and closes it again,
so file pages touched by earlier reads do not stay mapped (and counted) in this process.
"""

from __future__ import annotations

import json
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


class SafetensorsReader:
    """Implements sharding.Reader over every safetensors file of a model folder."""

    def __init__(self, model_dir: str | Path):
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in weight_files(model_dir):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        self.where[name] = path
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
            except Exception as e:  # safetensors raises its own error types for truncated / bad headers
                raise UserError(f"{path}: unreadable safetensors file ({e}); re-download the model") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def __call__(self, name: str, rows=None, cols=None) -> torch.Tensor:
        with safe_open(str(self.where[name]), framework="pt") as f:
            sl = f.get_slice(name)
            if rows is not None:
                return sl[rows[0]:rows[1]]
            if cols is not None:
                return sl[:, cols[0]:cols[1]]
            return sl[:]
