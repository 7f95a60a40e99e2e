"""Per-family HF <-> megatron-core GPTModel (local layer spec) name tables (SPEC.md section 6).

Each family is data only: the engine in sharding.py applies any table at any TP/PP. Adding a
family means adding its architecture to modelinfo.ARCHITECTURES and a table here.

Placeholders: `{i}` = HF layer index, `{j}` = layer index inside its pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ascendfactory.errors import UserError
from ascendfactory.modelinfo import ModelFacts, supported_architectures

# How one Megatron tensor is cut into TP shards (sharding.py implements each kind).
REPLICATED = "replicated"  # every TP rank holds the whole tensor
COLUMNS = "columns"  # split on dim 1
VOCAB = "vocab"  # split on dim 0 after padding the vocab rows with zeros
QKV = "qkv"  # q, k, v interleaved per kv group (GQA), then split on dim 0
GATE_UP = "gate_up"  # rank r holds cat(gate.chunk(T)[r], up.chunk(T)[r])

# Where the tensor lives: every layer, the first pipeline stage, or the last one.
LAYER, FIRST, LAST = "layer", "first", "last"


@dataclass(frozen=True)
class Rule:
    mg: str
    hf: tuple[str, ...]
    kind: str
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
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, FIRST),
    Rule("decoder.layers.{j}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), REPLICATED),
    Rule(f"{_MG_ATTN}.linear_qkv.weight", (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight",
                                          f"{_ATTN}.v_proj.weight"), QKV),
    Rule(f"{_MG_ATTN}.linear_proj.weight", (f"{_ATTN}.o_proj.weight",), COLUMNS),
    Rule("decoder.layers.{j}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         REPLICATED),
    Rule("decoder.layers.{j}.mlp.linear_fc1.weight", ("model.layers.{i}.mlp.gate_proj.weight",
                                                      "model.layers.{i}.mlp.up_proj.weight"), GATE_UP),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), COLUMNS),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, LAST),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, LAST, when="untied"),
    Rule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB, LAST, when="tied_split", to_hf=False),
)

QKV_BIAS = (
    Rule(f"{_MG_ATTN}.linear_qkv.bias", (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias",
                                        f"{_ATTN}.v_proj.bias"), QKV, when="qkv_bias"),
)

QK_NORM = (
    Rule(f"{_MG_ATTN}.q_layernorm.weight", (f"{_ATTN}.q_norm.weight",), REPLICATED, when="qk_norm"),
    Rule(f"{_MG_ATTN}.k_layernorm.weight", (f"{_ATTN}.k_norm.weight",), REPLICATED, when="qk_norm"),
)

def hf_linear_owners() -> dict[str, str]:
    """HF linear name -> the megatron-core linear holding it (q_proj -> linear_qkv, ...), from the table."""
    return {h.split(".")[-2]: r.mg.split(".")[-2] for r in COMMON if r.scope == LAYER and r.mg.endswith(".weight")
            and r.kind != REPLICATED for h in r.hf}


TABLES: dict[str, tuple[Rule, ...]] = {
    # Llama may carry attention_bias=true; the bias rule applies only when config.json says so.
    "LlamaForCausalLM": COMMON + QKV_BIAS,
    "MistralForCausalLM": COMMON,
    "Qwen2ForCausalLM": COMMON + QKV_BIAS,
    "Qwen3ForCausalLM": COMMON + QKV_BIAS + QK_NORM,
}


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
    table = TABLES.get(facts.architecture)
    if table is None:
        raise UserError(f"config.json: no conversion table for {facts.architecture}; "
                        f"supported: {supported_architectures()}")
    return [r for r in table if r.when is None or WHEN[r.when](facts, pp)]


def stage_items(rules: list[Rule], layout, pp_rank: int):
    """(rule, megatron name, HF names) held by one pipeline stage, in state-dict order."""
    first = layout.first_layer(pp_rank)
    if pp_rank == 0:
        yield from ((r, r.mg, list(r.hf)) for r in rules if r.scope == FIRST)
    for j in range(layout.layers[pp_rank]):
        for r in rules:
            if r.scope == LAYER:
                yield r, r.mg.format(j=j), [h.format(i=first + j) for h in r.hf]
    if pp_rank == layout.pp - 1:
        yield from ((r, r.mg, list(r.hf)) for r in rules if r.scope == LAST)
