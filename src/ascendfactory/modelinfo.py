"""Model facts from an HF `config.json`, read without importing torch or transformers.

The layout rules, the model builder and the converter all take their shapes from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# The family records (traits, mapping table, tiny test model), by config.json architecture name.
from ascendfactory.families import ARCHITECTURES, Family, supported_architectures
from ascendfactory.errors import UserError


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
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in (None, "default") else None)
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
        )
    except KeyError as e:
        raise UserError(f"{source}: missing key {e.args[0]!r}; is this an HF causal-LM config.json?") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: bad value ({e})") from None


def read_model_facts(model_dir: str | Path) -> ModelFacts:
    return facts_from_config(load_config_json(model_dir), source=str(config_path(model_dir)))
