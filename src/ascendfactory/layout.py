"""TP/PP layout rules of a conversion: layer split, vocab padding, divisibility. No torch here."""

from __future__ import annotations

from dataclasses import dataclass

from ascendfactory.errors import UserError
from ascendfactory.modelinfo import ModelFacts, read_model_facts

ITERATION = 1  # converted weights are saved as iteration 1 (SPEC.md section 6)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def dtype_name(dtype: str | None, flag: str = "--dtype") -> str | None:
    """Canonical bf16|fp16|fp32 (None stays None = keep the source dtype)."""
    if dtype is None:
        return None
    d = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if d not in DTYPES:
        raise UserError(f"{flag}: unknown dtype {dtype!r}; use bf16, fp16 or fp32")
    return d


def torch_dtype(name: str | None, default=None):
    """The torch dtype of a canonical name; `default` for None (keep the source dtype)."""
    if name is None:
        return default
    import torch  # here, not at the top: `plan` imports this module and must not load torch

    return getattr(torch, DTYPES[name])


def parse_num_layer_list(value: str | list[int] | None) -> list[int] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            return [int(x) for x in value.replace(" ", "").split(",") if x]
        except ValueError:
            raise UserError(f"--num-layer-list: {value!r} is not a comma-separated list of integers, "
                            f"e.g. 6,10") from None
    return [int(x) for x in value]


def stage_layers(num_layers: int, pp: int, num_layer_list: list[int] | None = None,
                 keys: tuple[str, str] = ("--num-layer-list", "--pp")) -> list[int]:
    """Layers held by each pipeline stage: the explicit list, or an even split. `keys`: how errors name the
    list and the PP size (CLI flags here, config keys for the trainer)."""
    list_key, pp_key = keys
    if pp < 1:
        raise UserError(f"{pp_key}: must be >= 1, got {pp}")
    if num_layer_list is not None:
        if len(num_layer_list) != pp or any(n < 1 for n in num_layer_list) or sum(num_layer_list) != num_layers:
            raise UserError(f"{list_key}: {','.join(map(str, num_layer_list))} must have {pp} positive "
                            f"entries (one per PP stage) summing to num_hidden_layers={num_layers}")
        return list(num_layer_list)
    if num_layers % pp:
        raise UserError(f"{pp_key}: {pp} does not divide num_hidden_layers={num_layers}; choose a divisor of "
                        f"{num_layers} or use {list_key}")
    return [num_layers // pp] * pp


def padded_vocab_size(vocab: int, tp: int, divisible_by: int | None) -> int:
    """Megatron's padding: a multiple of divisible_by * TP; no padding without the option."""
    if divisible_by is None:
        return vocab
    if divisible_by < 1:
        raise UserError(f"--make-vocab-size-divisible-by: must be >= 1, got {divisible_by}")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def check_tp(facts: ModelFacts, tp: int, padded_vocab: int) -> None:
    if tp < 1:
        raise UserError(f"--tp: must be >= 1, got {tp}")
    for what, n in (("num_attention_heads", facts.num_heads), ("num_key_value_heads", facts.num_kv_heads),
                    ("intermediate_size", facts.ffn_hidden_size)):
        if n % tp:
            raise UserError(f"--tp: {tp} does not divide {what}={n} of config.json; choose a divisor of {n}")
    if padded_vocab % tp:
        raise UserError(f"--tp: {tp} does not divide vocab_size={padded_vocab}; pass "
                        f"--make-vocab-size-divisible-by (e.g. 128) to pad the vocabulary")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    layers: tuple[int, ...]  # layers per PP stage
    vocab_size: int
    padded_vocab_size: int

    def first_layer(self, pp_rank: int) -> int:
        return sum(self.layers[:pp_rank])


def make_layout(facts: ModelFacts, tp: int, pp: int, num_layer_list: list[int] | None = None,
                make_vocab_size_divisible_by: int | None = None) -> Layout:
    padded = padded_vocab_size(facts.vocab_size, tp, make_vocab_size_divisible_by)
    check_tp(facts, tp, padded)
    layers = stage_layers(facts.num_layers, pp, num_layer_list)
    return Layout(tp, pp, tuple(layers), facts.vocab_size, padded)


def plan_layout(hf_dir, tp: int, pp: int, num_layer_list=None, make_vocab_size_divisible_by=None
                ) -> tuple[ModelFacts, Layout]:
    """Facts + validated layout (UserError on any bad combination); reads config.json only."""
    facts = read_model_facts(hf_dir)
    return facts, make_layout(facts, tp, pp, parse_num_layer_list(num_layer_list), make_vocab_size_divisible_by)
