"""The generic TP sharding engine: applies one table rule (families.py) in either direction.

hf -> mg reads only the rows / columns a rank needs (through `read`), so building one rank
never holds more than that rank's tensors. mg -> hf is the exact inverse.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ascendfactory.convert.families import COLUMNS, GATE_UP, QKV, REPLICATED, VOCAB
from ascendfactory.convert.layout import Layout
from ascendfactory.modelinfo import ModelFacts

Range = tuple[int, int]


class Reader(Protocol):
    """Reads one HF tensor, or only a range of its rows or columns."""

    def __call__(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def _part(n: int, tp: int, rank: int) -> Range:
    size = n // tp
    return rank * size, (rank + 1) * size


def _qkv_sizes(facts: ModelFacts) -> tuple[int, int]:
    """Rows per kv group: of q (nh/ng heads) and of k or v (one head)."""
    return facts.num_heads // facts.num_kv_heads * facts.head_dim, facts.head_dim


def shard(kind: str, hf_names: list[str], read: Reader, facts: ModelFacts, layout: Layout,
          tp_rank: int) -> torch.Tensor:
    """TP rank `tp_rank`'s part of one Megatron tensor, built from the HF tensors `hf_names`."""
    tp = layout.tp
    name = hf_names[0]
    if kind == REPLICATED:
        return read(name)
    if kind == COLUMNS:
        return read(name, cols=_part(read.shape(name)[1], tp, tp_rank))
    if kind == VOCAB:
        a, b = _part(layout.padded_vocab_size, tp, tp_rank)
        real = read(name, rows=(min(a, layout.vocab_size), min(b, layout.vocab_size)))
        pad = (b - a) - real.shape[0]
        if pad == 0:
            return real
        return torch.cat([real, real.new_zeros((pad, *real.shape[1:]))])
    if kind == QKV:
        q_rows, kv_rows = _qkv_sizes(facts)
        g0, g1 = _part(facts.num_kv_heads, tp, tp_rank)
        parts = [read(n, rows=(g0 * r, g1 * r)) for n, r in zip(hf_names, (q_rows, kv_rows, kv_rows))]
        rest = parts[0].shape[1:]
        groups = [p.reshape(g1 - g0, -1, *rest) for p in parts]
        return torch.cat(groups, dim=1).reshape(-1, *rest)
    if kind == GATE_UP:
        rows = _part(facts.ffn_hidden_size, tp, tp_rank)
        return torch.cat([read(n, rows=rows) for n in hf_names])
    raise ValueError(f"unknown transform kind {kind!r}")


def merge(kind: str, hf_names: list[str], shards: list[torch.Tensor], facts: ModelFacts,
          vocab_size: int) -> dict[str, torch.Tensor]:
    """The HF tensors rebuilt from every TP rank's shard of one Megatron tensor (inverse of shard)."""
    if kind == REPLICATED:
        return {hf_names[0]: shards[0]}
    if kind == COLUMNS:
        return {hf_names[0]: torch.cat(shards, dim=1)}
    if kind == VOCAB:
        return {hf_names[0]: torch.cat(shards)[:vocab_size]}
    if kind == QKV:
        q_rows, kv_rows = _qkv_sizes(facts)
        full = torch.cat(shards)
        rest = full.shape[1:]
        q, k, v = full.reshape(facts.num_kv_heads, -1, *rest).split([q_rows, kv_rows, kv_rows], dim=1)
        return {n: t.reshape(-1, *rest) for n, t in zip(hf_names, (q, k, v))}
    if kind == GATE_UP:
        halves = [s.chunk(2) for s in shards]
        return {hf_names[0]: torch.cat([h[0] for h in halves]), hf_names[1]: torch.cat([h[1] for h in halves])}
    raise ValueError(f"unknown transform kind {kind!r}")
