"""megatron-core GPTModel built from an HF config.json and its family record's traits (families.py).

Local layer spec: its parameter names are the ones the converter's tables target.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ascendfactory.modelinfo import ModelFacts, check_trainable


class _OwnMLPNotice(logging.Filter):
    """megatron-core logs "Unknown MLP type" for every layer of SwiGLUMLP (not its own MLP class) and then builds
    it as it builds its MLP (the TP group from parallel_state): a notice, not a problem, in each rank's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_OwnMLPNotice())


@dataclass(frozen=True)
class Parallel:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    num_layer_list: tuple[int, ...] | None = None  # layers per PP stage; None: megatron-core's even split
    ep: int = 1  # expert parallel (MoE); expert TP = TP


def pipeline_layout(num_layer_list) -> str | None:
    """megatron-core's explicit layout for an uneven split (E = embedding, t = layer, L = loss/output): stage p
    builds layers [sum(list[:p]), sum(list[:p+1])), numbered from 0 in its state dict, as the converter writes."""
    if not num_layer_list or len(set(num_layer_list)) == 1:
        return None
    return "E" + "|".join("t" * n for n in num_layer_list) + "L"


# MLP kind (a family trait) -> its TransformerConfig entries.
MLP_CONFIG = {"swiglu": dict(gated_linear_unit=True, activation_func=F.silu)}


def _dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def transformer_config(facts: ModelFacts, par: Parallel = Parallel(), precision: str = "fp32",
                       use_cpu_initialization: bool = True, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    family = facts.family
    kw = dict(
        num_layers=facts.num_layers,
        hidden_size=facts.hidden_size,
        num_attention_heads=facts.num_heads,
        num_query_groups=facts.num_kv_heads,
        kv_channels=facts.head_dim,
        ffn_hidden_size=facts.ffn_hidden_size,
        normalization=family.norm,
        layernorm_epsilon=facts.rms_norm_eps,
        **MLP_CONFIG[family.mlp],
        rotary_interleaved=family.rope_interleaved,
        add_bias_linear=False,
        add_qkv_bias=facts.qkv_bias,
        qk_layernorm=facts.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels are GPU-only; the unfused paths are numerically the reference.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sequence_parallel and par.tp > 1,
        params_dtype=_dtype(precision),
        pipeline_dtype=_dtype(precision),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu_initialization=use_cpu_initialization,
        pipeline_model_parallel_layout=pipeline_layout(par.num_layer_list),
        **moe_config(facts, par),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def moe_config(facts: ModelFacts, par: Parallel) -> dict:
    """TransformerConfig entries of an MoE model (none for a dense one), routing as HF routes (SPEC.md section 8):
    softmax over all experts then top-k, renormalised when norm_topk_prob, which is megatron-core's top-k of the
    logits then softmax over the k (moe_router_pre_softmax false); without renormalising, pre_softmax true.
    Dropless (no capacity factor); the allgather dispatcher works on every backend (the trainer may override)."""
    if not facts.num_experts:
        return {}
    return dict(
        num_moe_experts=facts.num_experts,
        moe_router_topk=facts.moe_topk,
        moe_ffn_hidden_size=facts.moe_ffn_hidden_size,
        moe_router_pre_softmax=not facts.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=facts.router_aux_loss_coef,
        moe_token_dispatcher_type="allgather",
        moe_shared_expert_intermediate_size=facts.shared_expert_size or None,
        moe_shared_expert_gate=facts.shared_expert_size > 0,  # Qwen2-MoE: sigmoid(x @ shared_expert_gate.T)
        # megatron-core's own record of which layers are MoE (the layer specs below follow facts.moe_layers)
        moe_layer_freq=[int(i in facts.moe_layers) for i in range(facts.num_layers)],
        expert_model_parallel_size=par.ep,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm (what the local spec builds) that also works with sequence parallel: its weight is
    marked so megatron-core sums its gradient over the TP ranks, each of which saw part of the sequence."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, device="cpu" if config.use_cpu_initialization else None,
                         dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def _post_normed(bda, norm):
    """A bias-dropout-add getter that normalizes the sub-layer's output first: x + dropout(norm(out)).
    The local spec's linears have no bias (add_bias_linear=False), so the norm sees the whole output."""

    def get(training: bool, fused: bool):
        add = bda(training, fused)
        return lambda out_bias, residual, prob: add((norm(out_bias[0]), out_bias[1]), residual, prob)

    return get


def post_norm_layer():
    """megatron-core's TransformerLayer plus GLM-4-0414's post_self_attn_layernorm / post_mlp_layernorm (a norm on
    each sub-layer's output before its residual add), applied inside the layer's own bias-dropout-add steps."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class PostNormTransformerLayer(TransformerLayer):
        def __init__(self, config, submodules, *args, **kwargs):
            super().__init__(config, submodules, *args, **kwargs)
            norm = {"RMSNorm": RMSNorm}[config.normalization]
            self.post_self_attn_layernorm = norm(config, config.hidden_size, eps=config.layernorm_epsilon)
            self.post_mlp_layernorm = norm(config, config.hidden_size, eps=config.layernorm_epsilon)
            self.self_attn_bda = _post_normed(self.self_attn_bda, self.post_self_attn_layernorm)
            self.mlp_bda = _post_normed(self.mlp_bda, self.post_mlp_layernorm)

    return PostNormTransformerLayer


def local_block_spec(config, qk_norm: bool, post_norms: bool = False, moe_layers=()):
    """megatron-core's local layer spec with the config's norm (RMSNorm above) for every norm, SDPA core attention
    and the SwiGLU MLP (same parameter names; other MLP configs take megatron-core's path); post_norms: the
    layer adds GLM-4-0414's two post-sub-layer norms; the HF layers in `moe_layers` get megatron-core's MoE layer
    instead (moe_layer_specs)."""
    from dataclasses import replace

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from ascendfactory.engine.attention import SDPAttention
    from ascendfactory.engine.mlp import SwiGLUMLP

    norm = {"RMSNorm": RMSNorm}[config.normalization]
    layer = get_gpt_layer_local_spec(qk_layernorm=qk_norm)
    attn = layer.submodules.self_attention
    attn_sub = replace(attn.submodules, core_attention=SDPAttention)
    if qk_norm:
        attn_sub = replace(attn_sub, q_layernorm=norm, k_layernorm=norm)
    layer = replace(layer, submodules=replace(layer.submodules, input_layernorm=norm, pre_mlp_layernorm=norm,
                                              self_attention=replace(attn, submodules=attn_sub),
                                              mlp=replace(layer.submodules.mlp, module=SwiGLUMLP)))
    if post_norms:
        layer = replace(layer, module=post_norm_layer())
    n = get_num_layers_to_build(config)  # this process's pipeline stage
    specs = [layer] * n
    if moe_layers:
        specs = moe_layer_specs(layer, config, moe_layers, n)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm))


def moe_layer_specs(dense_layer, config, moe_layers, n: int) -> list:
    """This stage's n layer specs: the dense spec, or for the global layers in moe_layers the same layer with
    megatron-core's MoE layer (router, SequentialMLP experts named local_experts.{i}, or GroupedMLP with the
    config's moe_grouped_gemm, shared experts with their gate) as its MLP."""
    from dataclasses import replace

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    moe = replace(dense_layer, submodules=replace(
        dense_layer.submodules, mlp=get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts,
                                                        moe_grouped_gemm=config.moe_grouped_gemm)))
    offset = get_transformer_layer_offset(config)
    return [moe if offset + j in moe_layers else dense_layer for j in range(n)]


def llama3_inv_freq(dim: int, base: float, scaling: dict) -> torch.Tensor:
    """HF's llama3 rope scaling with the config's own factors (GPTModel hard-codes 1/4/8192)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_gpt_model(facts: ModelFacts, config, pre_process: bool = True, post_process: bool = True,
                    max_sequence_length: int | None = None, vocab_size: int | None = None):
    """GPTModel for one pipeline stage. `config` is from transformer_config() with the model's full layer count:
    megatron-core builds this stage's share (even, or par.num_layer_list's split)."""
    from megatron.core.models.gpt.gpt_model import GPTModel

    check_trainable(facts)
    model = GPTModel(
        config=config,
        transformer_layer_spec=local_block_spec(config, facts.qk_norm, facts.family.post_norms, facts.moe_layers),
        vocab_size=vocab_size or facts.vocab_size,
        max_sequence_length=max_sequence_length or facts.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=facts.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=facts.rope_theta,
        rotary_percent=facts.family.rope_percent,
    )
    if facts.rope_scaling_type == "llama3":
        inv = llama3_inv_freq(facts.head_dim, facts.rope_theta, facts.rope_scaling)
        model.rotary_pos_emb.inv_freq = inv.to(model.rotary_pos_emb.inv_freq.device)
    return model
