"""LoRA adapters inside a Megatron checkpoint, and folding them into the base weights.

A LoRA run saves `<linear>.lora_A.weight` [r, in] and `<linear>.lora_B.weight` [out, r] beside each target's
`<linear>.weight`, and `lora_r` / `lora_alpha` in the checkpoint's args; the merged weight is
W + (lora_alpha / lora_r) * B A. Merging needs no other TP rank: a column-parallel linear's rank holds B's rows
for its output rows and all of A, a row-parallel one A's columns for its input columns and all of B, so
W_r + s * B_r A (or W_r + s * B A_r) is that rank's shard of the merged weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ascendfactory.errors import UserError

LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"


def is_lora_key(name: str) -> bool:
    return name.endswith("." + LORA_A) or name.endswith("." + LORA_B)


def has_adapters(state: Mapping) -> bool:
    return any(is_lora_key(k) for k in state)


def lora_scaling(args: dict, where) -> float:
    r, alpha = args.get("lora_r"), args.get("lora_alpha")
    if not r or alpha is None:
        raise UserError(f"{where}: holds LoRA adapters but its args have no lora_r / lora_alpha, so they cannot be "
                        "merged; the checkpoint is damaged or not one of ours")
    return float(alpha) / float(r)


class MergedAdapters(Mapping):
    """A rank's model state with every adapter folded into its base weight, computed when the weight is read
    (mg2hf streams one layer at a time); the adapter entries themselves are gone."""

    def __init__(self, state: Mapping[str, torch.Tensor], scaling: float):
        self._state = state
        self._scaling = scaling
        self._keys = [k for k in state if not is_lora_key(k)]

    def __getitem__(self, name: str) -> torch.Tensor:
        if is_lora_key(name):
            raise KeyError(name)
        weight = self._state[name]
        stem = name.removesuffix("weight")
        a = self._state.get(stem + LORA_A) if name.endswith(".weight") else None
        if a is None:
            return weight
        b = self._state[stem + LORA_B]
        return (weight.float() + self._scaling * (b.float() @ a.float())).to(weight.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def without_adapters(state: Mapping[str, torch.Tensor], args: dict, where) -> Mapping[str, torch.Tensor]:
    """The state as a plain model's weights: unchanged when it holds no adapters, else merged."""
    return MergedAdapters(state, lora_scaling(args, where)) if has_adapters(state) else state
