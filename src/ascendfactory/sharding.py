"""Mapping kinds: how one Megatron tensor is cut over the TP ranks, and put back, named by Megatron's terms.

Each kind owns both directions and the LoRA adapter split of its linear. hf -> mg reads only the rows / columns a
rank needs (through `read`), so building one rank never holds more than that rank's tensors; mg -> hf is the exact
inverse. A kind sees names already expanded (layer, expert), so expert rows need nothing here.

Core, not convert/: the tables (families.py) hold these objects and `plan` reads the tables; only convert calls
their methods. No torch import at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from ascendfactory.layout import ShardPlan
    from ascendfactory.modelinfo import ModelFacts

Range = tuple[int, int]


class Reader(Protocol):
    """Reads one HF tensor, or only a range of its rows or columns."""

    def __call__(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def _cat(tensors, dim: int = 0) -> torch.Tensor:
    import torch

    return torch.cat(tensors, dim=dim)


def _part(n: int, tp: int, rank: int) -> Range:
    size = n // tp
    return rank * size, (rank + 1) * size


class Kind:
    """shard: TP rank `tp_rank`'s part of one Megatron tensor, built from the HF tensors `names`.
    merge: the HF tensors rebuilt from every TP rank's shard (inverse of shard).
    split_adapter: HF linear name -> (lora_A, lora_B) from every TP rank's adapter shards of the Megatron linear."""

    name = ""
    lora = False  # a linear LoRA can adapt (rules.py's lora_target_modules hint lists the HF names it fuses)

    def shard(self, names: list[str], read: Reader, facts: ModelFacts, layout: ShardPlan, tp_rank: int
              ) -> torch.Tensor:
        return _cat(self.shard_parts(names, read, facts, layout, tp_rank))

    def shard_parts(self, names: list[str], read: Reader, facts: ModelFacts, layout: ShardPlan, tp_rank: int
                    ) -> list[torch.Tensor]:
        """shard's rows in consecutive pieces, for a writer that streams them without joining them in memory.
        A kind overrides shard or this (a kind that builds its shard by joining parts)."""
        return [self.shard(names, read, facts, layout, tp_rank)]

    def merge(self, names: list[str], shards: list[torch.Tensor], facts: ModelFacts, vocab_size: int
              ) -> dict[str, torch.Tensor]:
        return {n: _cat(parts) for n, parts in self.merge_parts(names, shards, facts, vocab_size).items()}

    def merge_parts(self, names: list[str], shards: list[torch.Tensor], facts: ModelFacts, vocab_size: int
                    ) -> dict[str, list[torch.Tensor]]:
        """merge's tensors each in consecutive row pieces (views of the shards), for a writer that streams them
        without joining them in memory. A kind overrides merge or this."""
        return {n: [t] for n, t in self.merge(names, shards, facts, vocab_size).items()}

    def split_adapter(self, names: list[str], a: list[torch.Tensor], b: list[torch.Tensor], facts: ModelFacts
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise ValueError(f"no LoRA adapter split for a {self.name} tensor")

    def __repr__(self) -> str:
        return self.name


class Replicated(Kind):
    """Every TP rank holds the whole tensor (norms, a router)."""

    name = "replicated"

    def shard(self, names, read, facts, layout, tp_rank):
        return read(names[0])

    def merge(self, names, shards, facts, vocab_size):
        return {names[0]: shards[0]}


class VocabRows(Kind):
    """Vocab-parallel embedding / output layer: rows split after padding the vocab with zero rows."""

    name = "vocab rows"

    def shard_parts(self, names, read, facts, layout, tp_rank):
        a, b = _part(layout.padded_vocab_size, layout.tp, tp_rank)
        real = read(names[0], rows=(min(a, layout.vocab_size), min(b, layout.vocab_size)))
        pad = (b - a) - real.shape[0]
        return [real] if pad == 0 else [real, real.new_zeros((pad, *real.shape[1:]))]

    def merge_parts(self, names, shards, facts, vocab_size):
        parts, left = [], vocab_size
        for s in shards:  # the padding rows dropped
            parts.append(s[:left])
            left -= parts[-1].shape[0]
        return {names[0]: parts}


class ColumnParallel(Kind):
    """Output dim split (dim 0 of the weight, a bias's only dim): each rank computes part of the outputs. Its LoRA
    adapter keeps A whole on every rank and splits B's rows like the weight's."""

    name = "column-parallel"
    lora = True

    def shard(self, names, read, facts, layout, tp_rank):
        return read(names[0], rows=_part(read.shape(names[0])[0], layout.tp, tp_rank))

    def merge_parts(self, names, shards, facts, vocab_size):
        return {names[0]: list(shards)}

    def split_adapter(self, names, a, b, facts):
        # the delta of a fused part is B_part A: its own rows of B (as merge takes them from the weight), shared A
        return {n: (a[0], bn) for n, bn in self.merge(names, b, facts, facts.vocab_size).items()}


class RowParallel(Kind):
    """Input dim split (dim 1 of the weight): each rank sums a partial product. Its LoRA adapter splits A's columns
    like the weight's and keeps B whole."""

    name = "row-parallel"
    lora = True

    def shard(self, names, read, facts, layout, tp_rank):
        return read(names[0], cols=_part(read.shape(names[0])[1], layout.tp, tp_rank))

    def merge(self, names, shards, facts, vocab_size):
        return {names[0]: _cat(shards, dim=1)}

    def split_adapter(self, names, a, b, facts):
        return {names[0]: (self.merge(names, a, facts, facts.vocab_size)[names[0]], b[0])}


class FusedQKV(ColumnParallel):
    """q, k, v (three HF tensors) interleaved per kv group (GQA), then column-parallel: rank r holds whole
    groups."""

    name = "fused qkv"
    shard = Kind.shard  # the join of shard_parts, not ColumnParallel's one read

    @staticmethod
    def _rows(facts: ModelFacts) -> tuple[int, int]:
        """Rows per kv group: of q (nh/ng heads) and of k or v (one head)."""
        return facts.num_heads // facts.num_kv_heads * facts.head_dim, facts.head_dim

    def shard_parts(self, names, read, facts, layout, tp_rank):
        q_rows, kv_rows = self._rows(facts)
        g0, g1 = _part(facts.num_kv_heads, layout.tp, tp_rank)
        rows = (q_rows, kv_rows, kv_rows)
        parts = [read(n, rows=(g0 * r, g1 * r)) for n, r in zip(names, rows)]
        return [p[g * r:(g + 1) * r] for g in range(g1 - g0) for p, r in zip(parts, rows)]

    def merge_parts(self, names, shards, facts, vocab_size):
        q_rows, kv_rows = self._rows(facts)
        groups = [g for s in shards for g in s.reshape(-1, q_rows + 2 * kv_rows, *s.shape[1:])]
        firsts = (0, q_rows, q_rows + kv_rows)
        return {n: [g[a:a + r] for g in groups] for n, a, r in zip(names, firsts, (q_rows, kv_rows, kv_rows))}


class FusedGateUp(ColumnParallel):
    """SwiGLU's gate and up projections, column-parallel each: rank r holds cat(gate.chunk(T)[r], up.chunk(T)[r]).
    From two HF tensors (gate_proj, up_proj) or from one already-fused [2F, H] tensor, gate rows first (GLM's
    gate_up_proj). F comes from the tensor, so an expert's own MLP size needs nothing else."""

    name = "fused gate/up"
    shard = Kind.shard  # the join of shard_parts, not ColumnParallel's one read

    @staticmethod
    def _sources(names: list[str], read: Reader) -> list[tuple[str, int, int]]:
        """(HF name, first row, rows) of gate, then of up."""
        if len(names) == 2:
            return [(n, 0, read.shape(n)[0]) for n in names]
        f = read.shape(names[0])[0] // 2
        return [(names[0], 0, f), (names[0], f, f)]

    def shard_parts(self, names, read, facts, layout, tp_rank):
        parts = []
        for name, first, rows in self._sources(names, read):
            a, b = _part(rows, layout.tp, tp_rank)
            parts.append(read(name, rows=(first + a, first + b)))
        return parts

    def merge_parts(self, names, shards, facts, vocab_size):
        halves = [s.chunk(2) for s in shards]
        gate, up = [h[0] for h in halves], [h[1] for h in halves]
        return {names[0]: gate, names[1]: up} if len(names) == 2 else {names[0]: gate + up}


REPLICATED = Replicated()
VOCAB_ROWS = VocabRows()
COLUMN_PARALLEL = ColumnParallel()
ROW_PARALLEL = RowParallel()
FUSED_QKV = FusedQKV()
FUSED_GATE_UP = FusedGateUp()
