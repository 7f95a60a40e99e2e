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
# Which layers a LAYER row belongs to, when not all: MoE layers, or the dense ones (mlp_only_layers, ...).
MOE, DENSE = "moe", "dense"


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
    # LAYER rows only: MOE rows apply to MoE layers, DENSE rows to the others (every layer of a dense model).
    layers: str | None = None


# Conditions a rule may depend on: (facts, pp) -> bool.
WHEN = {
    "qkv_bias": lambda f, pp: f.qkv_bias,
    "qk_norm": lambda f, pp: f.qk_norm,
    "untied": lambda f, pp: not f.tie_word_embeddings,
    # With tied embeddings the last stage still needs the output weight when it does not hold the embedding.
    "tied_split": lambda f, pp: f.tie_word_embeddings and pp > 1,
    "shared_expert": lambda f, pp: f.shared_expert_size > 0,
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
                                                      "model.layers.{i}.mlp.up_proj.weight"), FUSED_GATE_UP,
         layers=DENSE),
    Rule("decoder.layers.{j}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), ROW_PARALLEL,
         layers=DENSE),
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
    post_norms: bool = False  # a norm on each sub-layer's output before the residual add (GLM-4-0414)
    # MoE: HF renormalises the top-k routing weights when norm_topk_prob (config.json's key, else this default)
    norm_topk_prob: bool = False
    norm_topk_prob_key: str | None = None


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

# GLM (SPEC.md section 9): q/k/v bias, one fused gate_up_proj [2F, H] (gate rows first), half-head interleaved RoPE.
# The original remote-code layout (model_type chatglm) reads and writes through convert/chatglm.py onto GLM's names.
_GLM_MLP = "model.layers.{i}.mlp"
GLM_TABLE = tuple(
    Rule(r.mg, (f"{_GLM_MLP}.gate_up_proj.weight",), r.kind) if r.kind is FUSED_GATE_UP else r for r in COMMON
) + QKV_BIAS
GLM4_POST_NORMS = (
    Rule("decoder.layers.{j}.post_self_attn_layernorm.weight", ("model.layers.{i}.post_self_attn_layernorm.weight",),
         REPLICATED),
    Rule("decoder.layers.{j}.post_mlp_layernorm.weight", ("model.layers.{i}.post_mlp_layernorm.weight",), REPLICATED),
)
# The tiny GLM models: a GLM-4 tokenizer (special tokens first, so <|endoftext|> is id 0) and GLM's head dim.
_GLM_TINY = {"head_dim": 16, "pad_token_id": 0, "eos_token_id": 0}
_GLM_TRAITS = dict(qkv_bias=True, qkv_bias_key="attention_bias", rope_percent=0.5, rope_interleaved=True)

FAMILIES += (
    Family(("GlmForCausalLM",), GLM_TABLE, tiny=Tiny("glm", "GlmConfig", "glm4", config=_GLM_TINY), **_GLM_TRAITS),
    Family(("Glm4ForCausalLM",), GLM_TABLE + GLM4_POST_NORMS, post_norms=True,
           tiny=Tiny("glm4", "Glm4Config", "glm4", config=_GLM_TINY, tests={"dtype": "bfloat16"}), **_GLM_TRAITS),
)

# Mixture-of-Experts (SPEC.md section 8): the router replicated; expert e's MLP on EP rank e // (E / EP) as local
# expert e % (E / EP), TP-split like a dense MLP; Qwen2-MoE's shared expert split like a dense MLP, its gate
# replicated. Dense layers of an MoE model (mlp_only_layers, decoder_sparse_step) keep COMMON's MLP rows.
_MG_MOE = "decoder.layers.{j}.mlp"
_EXP = f"{_MG_MOE}.experts.local_experts.{{e}}"


def _moe_rows(hf_moe: str, fc1: tuple[str, str], fc2: str) -> tuple[Rule, ...]:
    """Router and expert rows of an HF MoE block `hf_moe` whose expert linears are named fc1 (gate, up), fc2."""
    return (
        Rule(f"{_MG_MOE}.router.weight", (f"{hf_moe}.gate.weight",), REPLICATED, layers=MOE),
        Rule(f"{_EXP}.linear_fc1.weight", tuple(f"{hf_moe}.experts.{{e}}.{n}.weight" for n in fc1), FUSED_GATE_UP,
             layers=MOE),
        Rule(f"{_EXP}.linear_fc2.weight", (f"{hf_moe}.experts.{{e}}.{fc2}.weight",), ROW_PARALLEL, layers=MOE),
    )


QWEN_MOE = _moe_rows("model.layers.{i}.mlp", ("gate_proj", "up_proj"), "down_proj")
SHARED_EXPERT = (
    Rule(f"{_MG_MOE}.shared_experts.linear_fc1.weight", ("model.layers.{i}.mlp.shared_expert.gate_proj.weight",
                                                        "model.layers.{i}.mlp.shared_expert.up_proj.weight"),
         FUSED_GATE_UP, when="shared_expert", layers=MOE),
    Rule(f"{_MG_MOE}.shared_experts.linear_fc2.weight", ("model.layers.{i}.mlp.shared_expert.down_proj.weight",),
         ROW_PARALLEL, when="shared_expert", layers=MOE),
    Rule(f"{_MG_MOE}.shared_experts.gate_weight", ("model.layers.{i}.mlp.shared_expert_gate.weight",),
         REPLICATED, when="shared_expert", layers=MOE),
)
MIXTRAL_MOE = _moe_rows("model.layers.{i}.block_sparse_moe", ("w1", "w3"), "w2")

# The tiny MoE test models: 4 experts of MLP size 32, top-2.
_TINY_MOE = {"moe_intermediate_size": 32, "num_experts_per_tok": 2}

FAMILIES += (
    # Qwen3-MoE's test model has a dense layer (mlp_only_layers) between MoE ones.
    Family(("Qwen3MoeForCausalLM",), COMMON + QKV_BIAS + QK_NORM + QWEN_MOE, qkv_bias_key="attention_bias",
           qk_norm=True, norm_topk_prob_key="norm_topk_prob",
           tiny=Tiny("qwen3_moe", "Qwen3MoeConfig", "qwen",
                     config={**_TINY_MOE, "num_experts": 4, "head_dim": 16, "norm_topk_prob": True},
                     tests={"mlp_only_layers": [1]})),
    Family(("Qwen2MoeForCausalLM",), COMMON + QKV_BIAS + QWEN_MOE + SHARED_EXPERT, qkv_bias=True,
           norm_topk_prob_key="norm_topk_prob",
           tiny=Tiny("qwen2_moe", "Qwen2MoeConfig", "qwen",
                     config={**_TINY_MOE, "num_experts": 4, "shared_expert_intermediate_size": 48})),
    # Mixtral's experts have intermediate_size rows; every layer is MoE; top-k always renormalised.
    Family(("MixtralForCausalLM",), COMMON + MIXTRAL_MOE, norm_topk_prob=True,
           tiny=Tiny("mixtral", "MixtralConfig", "llama3", config={"num_local_experts": 4, "num_experts_per_tok": 2,
                                                                   "intermediate_size": 32})),
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
_M, _S = "moe_ffn_hidden_size", "shared_expert_size"
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
    "model.layers.{i}.mlp.gate_up_proj.weight": ("gate_up_dim", _H),
    "model.layers.{i}.post_self_attn_layernorm.weight": (_H,),
    "model.layers.{i}.post_mlp_layernorm.weight": (_H,),
    # MoE (the mlp.experts names also cover Qwen2-MoE; Mixtral's block_sparse_moe below)
    "model.layers.{i}.mlp.gate.weight": ("num_experts", _H),
    "model.layers.{i}.mlp.experts.{e}.gate_proj.weight": (_M, _H),
    "model.layers.{i}.mlp.experts.{e}.up_proj.weight": (_M, _H),
    "model.layers.{i}.mlp.experts.{e}.down_proj.weight": (_H, _M),
    "model.layers.{i}.mlp.shared_expert.gate_proj.weight": (_S, _H),
    "model.layers.{i}.mlp.shared_expert.up_proj.weight": (_S, _H),
    "model.layers.{i}.mlp.shared_expert.down_proj.weight": (_H, _S),
    "model.layers.{i}.mlp.shared_expert_gate.weight": (1, _H),
    "model.layers.{i}.block_sparse_moe.gate.weight": ("num_experts", _H),
    "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight": (_M, _H),
    "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight": (_M, _H),
    "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight": (_H, _M),
}


def hf_shape(template: str, facts: ModelFacts) -> tuple[int, ...]:
    dims = {"q_dim": facts.num_heads * facts.head_dim, "kv_dim": facts.num_kv_heads * facts.head_dim,
            "gate_up_dim": 2 * facts.ffn_hidden_size}
    return tuple(d if isinstance(d, int) else dims[d] if d in dims else getattr(facts, d)
                 for d in HF_SHAPES[template])


def rules_for(facts: ModelFacts, pp: int) -> list[Rule]:
    """The rules that apply to this model at this pipeline size, in the table's order."""
    return [r for r in facts.family.table if r.when is None or WHEN[r.when](facts, pp)]


def is_expert(rule: Rule) -> bool:
    return "{e}" in rule.mg


def stage_items(rules: list[Rule], layout, pp_rank: int, *, experts: int = 0, ep: int = 1, ep_rank: int = 0,
                moe_layers=()):
    """(rule, megatron name, HF names) held by one pipeline stage (and EP rank), in state-dict order.

    Expert rows (`{e}`) are expanded over the `experts // ep` experts of EP rank `ep_rank`: local expert k is
    global expert ep_rank * experts // ep + k; a run of expert rows goes expert by expert, as megatron-core's
    local experts list their parameters. MOE rows apply to the HF layers in `moe_layers`, DENSE rows to the
    others."""
    first = layout.first_layer(pp_rank)
    if pp_rank == 0:
        yield from ((r, r.mg, list(r.hf)) for r in rules if r.scope == FIRST)
    per_rank = experts // ep
    for j in range(layout.layers[pp_rank]):
        i = first + j
        kind = MOE if i in moe_layers else DENSE
        here = (r for r in rules if r.scope == LAYER and r.layers in (None, kind))
        for expert, run in groupby(here, key=is_expert):
            run = list(run)
            for k in range(per_rank) if expert else (None,):
                e = None if k is None else ep_rank * per_rank + k
                for r in run:
                    yield r, r.mg.format(j=j, e=k), [h.format(i=i, e=e) for h in r.hf]
    if pp_rank == layout.pp - 1:
        yield from ((r, r.mg, list(r.hf)) for r in rules if r.scope == LAST)


def model_items(facts: ModelFacts, rules: list[Rule], layout, pp_rank: int, ep_rank: int = 0):
    """stage_items for this model: its experts and MoE layers, at the layout's EP size."""
    return stage_items(rules, layout, pp_rank, experts=facts.num_experts, ep=layout.ep, ep_rank=ep_rank,
                       moe_layers=facts.moe_layers)


def merged_items(facts: ModelFacts, rules: list[Rule], layout, pp_rank: int):
    """(EP rank, rule, megatron name, HF names) of one pipeline stage over all its EP ranks, each HF tensor once
    and in HF order: a non-expert row from EP rank 0 (the others hold copies), a layer's expert rows from every
    EP rank in turn (global expert order)."""
    ranks = [list(model_items(facts, rules, layout, pp_rank, e)) for e in range(layout.ep)]
    k = 0
    while k < len(ranks[0]):  # every EP rank's list has the same rows at the same positions
        end = k
        while end < len(ranks[0]) and is_expert(ranks[0][end][0]):
            end += 1
        if end == k:
            yield (0, *ranks[0][k])
            k += 1
            continue
        for e in range(layout.ep):
            yield from ((e, *it) for it in ranks[e][k:end])
        k = end
