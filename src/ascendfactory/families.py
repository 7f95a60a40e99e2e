"""The model families: one record per architecture, data only (SPEC.md sections 6, 8, 9).

A record holds the HF architecture name(s), the traits megatron-core's TransformerConfig and layer spec are built
from (engine/model.py), the HF <-> megatron-core GPTModel (local layer spec) mapping table, and the tiny test
model (tiny.py). The mapping kinds (sharding.py) and the stage iteration below apply any table at any TP/PP/EP;
adding a Llama-like family is one record here.

Name placeholders: `{i}` = HF layer index, `{j}` = layer index inside its pipeline stage, `{e}` = expert: global
on the HF side, the EP rank's local index on the Megatron side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING

from ascendfactory.sharding import (
    FUSED_GATE_UP,
    FUSED_QKV,
    REPLICATED,
    ROW_PARALLEL,
    VOCAB_ROWS,
    Kind,
)

if TYPE_CHECKING:
    from ascendfactory.modelinfo import ModelFacts

# Where the tensor lives: every layer, the first pipeline stage, or the last one.
LAYER, FIRST, LAST = "layer", "first", "last"


@dataclass(frozen=True)
class Rule:
    """One mapping row: a Megatron tensor, the HF tensors it is built from, and how it is cut (kind)."""

    mg: str
    hf: tuple[str, ...]
    kind: Kind
    scope: str = LAYER
    # A predicate name from WHEN: the rule applies only to models / layouts where it holds.
    when: str | None = None
    # False for a tensor that duplicates another one (the tied output layer copy): mg2hf skips it.
    to_hf: bool = True


# Conditions a rule may depend on: (facts, pp) -> bool.
WHEN = {
    "qkv_bias": lambda f, pp: f.qkv_bias,
    "qk_norm": lambda f, pp: f.qk_norm,
    "untied": lambda f, pp: not f.tie_word_embeddings,
    # With tied embeddings the last stage still needs the output weight when it does not hold the embedding.
    "tied_split": lambda f, pp: f.tie_word_embeddings and pp > 1,
}

_ATTN = "model.layers.{i}.self_attn"
_MG_ATTN = "decoder.layers.{j}.self_attention"

COMMON = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_ROWS, FIRST),
    Rule("decoder.layers.{j}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), REPLICATED),
    Rule(f"{_MG_ATTN}.linear_qkv.weight", (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight",
                                          f"{_ATTN}.v_proj.weight"), FUSED_QKV),
    Rule(f"{_MG_ATTN}.linear_proj.weight", (f"{_ATTN}.o_proj.weight",), ROW_PARALLEL),
    Rule("decoder.layers.{j}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         REPLICATED),
    Rule("decoder.layers.{j}.mlp.linear_fc1.weight", ("model.layers.{i}.mlp.gate_proj.weight",
                                                      "model.layers.{i}.mlp.up_proj.weight"), FUSED_GATE_UP),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), ROW_PARALLEL),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, LAST),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB_ROWS, LAST, when="untied"),
    Rule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB_ROWS, LAST, when="tied_split", to_hf=False),
)

QKV_BIAS = (
    Rule(f"{_MG_ATTN}.linear_qkv.bias", (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias",
                                        f"{_ATTN}.v_proj.bias"), FUSED_QKV, when="qkv_bias"),
)

QK_NORM = (
    Rule(f"{_MG_ATTN}.q_layernorm.weight", (f"{_ATTN}.q_norm.weight",), REPLICATED, when="qk_norm"),
    Rule(f"{_MG_ATTN}.k_layernorm.weight", (f"{_ATTN}.k_norm.weight",), REPLICATED, when="qk_norm"),
)


@dataclass(frozen=True)
class Tiny:
    """A family's tiny random-init test model (tiny.py builds it offline)."""

    name: str  # make_tiny_model's `family`
    config_class: str  # the transformers config class
    tokenizer: str  # make_tokenizer's flavor
    config: dict = field(default_factory=dict)  # this family's own config entries over the shared tiny sizes
    # make_tiny_model options of the conversion tests' model of this family: each family covers another variant.
    tests: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    architectures: tuple[str, ...]  # config.json `architectures` names; the first is the transformers class
    table: tuple[Rule, ...]
    tiny: Tiny
    # Traits (tied embeddings come from config.json's tie_word_embeddings in every family).
    qkv_bias: bool = False
    qkv_bias_key: str | None = None  # config.json key that overrides qkv_bias (Llama's attention_bias)
    qk_norm: bool = False
    norm: str = "RMSNorm"  # megatron-core TransformerConfig.normalization
    mlp: str = "swiglu"
    rope_percent: float = 1.0  # fraction of each head dim that rotates (megatron-core rotary_percent)
    rope_interleaved: bool = False  # rotate pairs (x[..., 0::2], x[..., 1::2]) instead of halves


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}

FAMILIES = (
    # Llama may carry attention_bias=true; the bias rule applies only when config.json says so.
    Family(("LlamaForCausalLM",), COMMON + QKV_BIAS, qkv_bias_key="attention_bias",
           tiny=Tiny("llama", "LlamaConfig", "llama3", config={"rope_scaling": _LLAMA3_ROPE})),
    Family(("Qwen2ForCausalLM",), COMMON + QKV_BIAS, qkv_bias=True,
           tiny=Tiny("qwen2", "Qwen2Config", "qwen", tests={"tie_word_embeddings": True})),
    Family(("Qwen3ForCausalLM",), COMMON + QKV_BIAS + QK_NORM, qkv_bias_key="attention_bias", qk_norm=True,
           tiny=Tiny("qwen3", "Qwen3Config", "qwen", config={"head_dim": 16}, tests={"dtype": "bfloat16"})),
    Family(("MistralForCausalLM",), COMMON, tiny=Tiny("mistral", "MistralConfig", "llama3")),
)

ARCHITECTURES: dict[str, Family] = {a: fam for fam in FAMILIES for a in fam.architectures}


def supported_architectures() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def hf_linear_owners() -> dict[str, str]:
    """HF linear name -> the megatron-core linear holding it (q_proj -> linear_qkv, ...), from the tables."""
    return {h.split(".")[-2]: r.mg.split(".")[-2] for fam in FAMILIES for r in fam.table
            if r.scope == LAYER and r.mg.endswith(".weight") and r.kind.lora for h in r.hf}


# HF tensor shapes, by name template: checked before converting, and the plan of mg2hf's output files.
_H, _F, _V = "hidden_size", "ffn_hidden_size", "vocab_size"
HF_SHAPES: dict[str, tuple] = {
    "model.embed_tokens.weight": (_V, _H),
    "lm_head.weight": (_V, _H),
    "model.norm.weight": (_H,),
    "model.layers.{i}.input_layernorm.weight": (_H,),
    "model.layers.{i}.post_attention_layernorm.weight": (_H,),
    f"{_ATTN}.q_proj.weight": ("q_dim", _H),
    f"{_ATTN}.k_proj.weight": ("kv_dim", _H),
    f"{_ATTN}.v_proj.weight": ("kv_dim", _H),
    f"{_ATTN}.q_proj.bias": ("q_dim",),
    f"{_ATTN}.k_proj.bias": ("kv_dim",),
    f"{_ATTN}.v_proj.bias": ("kv_dim",),
    f"{_ATTN}.o_proj.weight": (_H, "q_dim"),
    f"{_ATTN}.q_norm.weight": ("head_dim",),
    f"{_ATTN}.k_norm.weight": ("head_dim",),
    "model.layers.{i}.mlp.gate_proj.weight": (_F, _H),
    "model.layers.{i}.mlp.up_proj.weight": (_F, _H),
    "model.layers.{i}.mlp.down_proj.weight": (_H, _F),
}


def hf_shape(template: str, facts: ModelFacts) -> tuple[int, ...]:
    dims = {"q_dim": facts.num_heads * facts.head_dim, "kv_dim": facts.num_kv_heads * facts.head_dim}
    return tuple(dims[d] if d in dims else getattr(facts, d) for d in HF_SHAPES[template])


def rules_for(facts: ModelFacts, pp: int) -> list[Rule]:
    """The rules that apply to this model at this pipeline size, in the table's order."""
    return [r for r in facts.family.table if r.when is None or WHEN[r.when](facts, pp)]


def _is_expert(rule: Rule) -> bool:
    return "{e}" in rule.mg


def stage_items(rules: list[Rule], layout, pp_rank: int, *, experts: int = 0, ep: int = 1, ep_rank: int = 0):
    """(rule, megatron name, HF names) held by one pipeline stage (and EP rank), in state-dict order.

    Expert rows (`{e}`) are expanded over the `experts // ep` experts of EP rank `ep_rank`: local expert k is
    global expert ep_rank * experts // ep + k; a run of expert rows goes expert by expert, as megatron-core's
    local experts list their parameters."""
    first = layout.first_layer(pp_rank)
    if pp_rank == 0:
        yield from ((r, r.mg, list(r.hf)) for r in rules if r.scope == FIRST)
    per_rank = experts // ep
    for j in range(layout.layers[pp_rank]):
        i = first + j
        for expert, run in groupby((r for r in rules if r.scope == LAYER), key=_is_expert):
            run = list(run)
            for k in range(per_rank) if expert else (None,):
                e = None if k is None else ep_rank * per_rank + k
                for r in run:
                    yield r, r.mg.format(j=j, e=k), [h.format(i=i, e=e) for h in r.hf]
    if pp_rank == layout.pp - 1:
        yield from ((r, r.mg, list(r.hf)) for r in rules if r.scope == LAST)
