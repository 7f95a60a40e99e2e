"""Model facts from an HF `config.json`, read without importing torch or transformers.

The layout rules, the model builder and the converter all take their shapes from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ascendfactory.errors import UserError

# The family records (traits, mapping table, tiny test model), by config.json architecture name.
from ascendfactory.families import ARCHITECTURES, Family, supported_architectures


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: dict | None = field(default=None, hash=False)
    torch_dtype: str | None = None
    # Mixture-of-Experts (0 / empty for a dense model): experts per MoE layer, routed per token, one expert's MLP
    # size, renormalised top-k weights, the shared expert's MLP size, the HF indices of the MoE layers.
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_size: int = 0
    moe_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0

    @property
    def family(self) -> Family:
        return ARCHITECTURES[self.architecture]

    @property
    def rope_scaling_type(self) -> str | None:
        if not self.rope_scaling:
            return None
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type")


# RoPE variants the training model reproduces (conversion itself is independent of RoPE).
TRAINABLE_ROPE = (None, "default", "llama3")


def _moe_facts(cfg: dict, family: Family, layers: int) -> dict:
    """The MoE entries of ModelFacts from config.json (Qwen's num_experts, Mixtral's num_local_experts). A layer
    is MoE unless listed in mlp_only_layers or off the decoder_sparse_step grid, as HF's decoder layers decide."""
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if not experts:
        return {}
    dense, step = set(cfg.get("mlp_only_layers") or ()), int(cfg.get("decoder_sparse_step") or 1)
    norm = bool(cfg.get(family.norm_topk_prob_key, family.norm_topk_prob)) if family.norm_topk_prob_key \
        else family.norm_topk_prob
    return dict(
        num_experts=experts,
        moe_topk=int(cfg["num_experts_per_tok"]),
        moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        norm_topk_prob=norm,
        shared_expert_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        moe_layers=tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0),
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )


def check_trainable(facts: ModelFacts, source: str = "config.json") -> None:
    """What conversion accepts but training cannot build exactly, refused before any stage runs."""
    if facts.rope_scaling_type not in TRAINABLE_ROPE:
        raise UserError(f"{source}: rope_scaling type {facts.rope_scaling_type!r} is not supported for training "
                        "(supported: llama3, or none); remove rope_scaling or use another model")


def config_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / "config.json"


def load_config_json(model_dir: str | Path) -> dict:
    path = config_path(model_dir)
    if not Path(model_dir).is_dir():
        raise UserError(f"model_name_or_path: {model_dir} is not a directory; point it at an HF model folder")
    if not path.is_file():
        raise UserError(f"{path}: config.json not found; model_name_or_path must be an HF model folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object of model settings, found a {type(cfg).__name__}; "
                        "restore the model's config.json")
    return cfg


def positive_int(cfg: dict, key: str, source: str, default: int | None = None) -> int:
    """A size from config.json; 0, negative or non-integer sizes are refused here, naming the key, instead
    of failing later in whatever divides by them (the tokenizer, the model builder)."""
    value = cfg.get(key)
    if value is None:  # HF writes null for "derive it" (num_key_value_heads, head_dim)
        if default is None:
            raise KeyError(key)
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{source}: {key} = {json.dumps(value)}: must be a positive integer; "
                        "restore the model's config.json")
    return value


def facts_from_config(cfg: dict, source: str = "config.json") -> ModelFacts:
    if is_chatglm(cfg):  # the original GLM layout: its config.json read as GLM's
        try:
            cfg = glm_config(cfg, source)
        except KeyError as e:
            raise UserError(f"{source}: missing key {e.args[0]!r}; is this a ChatGLM / GLM-4 config.json?") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad value ({e})") from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UserError(
            f"{source}: unsupported architecture {archs or '(none)'}; supported: {supported_architectures()}"
        )
    family = ARCHITECTURES[arch]
    try:
        heads = positive_int(cfg, "num_attention_heads", source)
        hidden = positive_int(cfg, "hidden_size", source)
        qkv_bias = family.qkv_bias
        if family.qkv_bias_key:
            qkv_bias = bool(cfg.get(family.qkv_bias_key, qkv_bias))
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or (
            rope_params if rope_params.get("rope_type") not in (None, "default") else None)
        return ModelFacts(
            architecture=arch,
            hidden_size=hidden,
            num_layers=positive_int(cfg, "num_hidden_layers", source),
            num_heads=heads,
            num_kv_heads=positive_int(cfg, "num_key_value_heads", source, default=heads),
            head_dim=positive_int(cfg, "head_dim", source, default=hidden // heads),
            ffn_hidden_size=positive_int(cfg, "intermediate_size", source),
            vocab_size=positive_int(cfg, "vocab_size", source),
            max_position_embeddings=positive_int(cfg, "max_position_embeddings", source, default=4096),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=family.qk_norm,
            rope_scaling=scaling,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            **_moe_facts(cfg, family, int(cfg["num_hidden_layers"])),
        )
    except KeyError as e:
        raise UserError(f"{source}: missing key {e.args[0]!r}; is this an HF causal-LM config.json?") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: bad value ({e})") from None


def read_model_facts(model_dir: str | Path) -> ModelFacts:
    return facts_from_config(load_config_json(model_dir), source=str(config_path(model_dir)))


# The original remote-code GLM layout (model_type chatglm): its config.json is read as GlmForCausalLM's, as data
# (convert/chatglm.py maps its weight names).
CHATGLM_ARCHITECTURES = ("ChatGLMModel", "ChatGLMForConditionalGeneration")


def is_chatglm(cfg: dict) -> bool:
    return cfg.get("model_type") == "chatglm" or any(a in CHATGLM_ARCHITECTURES for a in cfg.get("architectures") or [])


def is_chatglm_dir(model_dir: str | Path) -> bool:
    path = Path(model_dir) / "config.json"
    try:
        return is_chatglm(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False  # read_model_facts reports a missing / broken config.json with its own message


# chatglm config keys whose other values mean another architecture than the one GLM's names describe
_FIXED = {"rmsnorm": True, "add_bias_linear": False, "apply_residual_connection_post_layernorm": False,
          "post_layer_norm": True}


def glm_config(cfg: dict, source: str = "config.json") -> dict:
    """The GlmForCausalLM config.json equivalent of a chatglm config.json (KeyError for a missing key)."""
    for key, want in _FIXED.items():
        if cfg.get(key, want) != want:
            raise UserError(f"{source}: {key}={cfg[key]!r} is not supported (the GLM layout needs {want!r}); "
                            "this checkpoint is not ChatGLM2/3 or GLM-4")
    heads = int(cfg["num_attention_heads"])
    return {
        "architectures": ["GlmForCausalLM"],
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads,
        "head_dim": cfg.get("kv_channels") or int(cfg["hidden_size"]) // heads,
        "intermediate_size": cfg["ffn_hidden_size"],
        "vocab_size": cfg["padded_vocab_size"],
        "max_position_embeddings": cfg.get("seq_length", 8192),
        "rms_norm_eps": cfg.get("layernorm_epsilon", 1e-5),
        "rope_theta": 10000.0 * float(cfg.get("rope_ratio") or 1),
        "partial_rotary_factor": 0.5,
        "attention_bias": bool(cfg.get("add_qkv_bias", False)),
        "tie_word_embeddings": False,
        "torch_dtype": cfg.get("torch_dtype"),
    }
