"""The original remote-code GLM checkpoint layout (model_type `chatglm`: chatglm3-6b, glm-4-9b, glm-4-9b-chat) as a
naming / config translation onto GlmForCausalLM's (SPEC.md section 9), in both directions.

No remote code is imported or run: config.json is read as data and translated to GLM's keys; the weights are read
under GLM's names (q / k / v are row ranges of query_key_value) and written back under the original names, so an
export keeps the layout the model came in (mg2hf copies its config.json and *.py files unchanged).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ascendfactory.convert.hfread import SafetensorsReader
from ascendfactory.modelinfo import glm_config, is_chatglm_dir

if TYPE_CHECKING:
    import torch

    from ascendfactory.modelinfo import ModelFacts

QKV = ("q_proj", "k_proj", "v_proj")  # row blocks of query_key_value, in this order
# ChatGLM's RotaryEmbedding buffer: derived from the config, not read; written on export as the original holds it.
INV_FREQ = "transformer.rotary_pos_emb.inv_freq"

_L, _C = "model.layers.{i}", "transformer.encoder.layers.{i}"
# HF GLM name -> chatglm name ({i}: layer); q / k / v map to query_key_value below.
NAMES = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    f"{_L}.input_layernorm.weight": f"{_C}.input_layernorm.weight",
    f"{_L}.self_attn.o_proj.weight": f"{_C}.self_attention.dense.weight",
    f"{_L}.post_attention_layernorm.weight": f"{_C}.post_attention_layernorm.weight",
    f"{_L}.mlp.gate_up_proj.weight": f"{_C}.mlp.dense_h_to_4h.weight",
    f"{_L}.mlp.down_proj.weight": f"{_C}.mlp.dense_4h_to_h.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
    **{f"{_L}.self_attn.{p}.{w}": f"{_C}.self_attention.query_key_value.{w}" for p in QKV for w in ("weight", "bias")},
}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_TO_CHATGLM = [(_pattern(h), c) for h, c in NAMES.items()]


def _rows(facts: ModelFacts) -> dict[str, tuple[int, int]]:
    """q / k / v: (first row, rows) inside query_key_value."""
    q, kv = facts.num_heads * facts.head_dim, facts.num_kv_heads * facts.head_dim
    return {"q_proj": (0, q), "k_proj": (q, kv), "v_proj": (q + kv, kv)}


def to_chatglm(name: str) -> str:
    for pattern, template in _TO_CHATGLM:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    raise KeyError(name)


def _qkv_part(name: str) -> str | None:
    part = name.split(".")[-2]
    return part if part in QKV else None


class ChatGLMReader:
    """sharding.Reader under GLM's names over a chatglm-layout folder."""

    def __init__(self, model_dir: str | Path, facts: ModelFacts):
        self.raw = SafetensorsReader(model_dir)
        self.rows = _rows(facts)
        self.source: dict[str, tuple[str, int | None, int | None]] = {}  # GLM name -> (chatglm name, first, rows)
        names = [h for h in NAMES if "{i}" not in h]
        names += [h.format(i=i) for i in range(facts.num_layers) for h in NAMES if "{i}" in h]
        for name in names:
            c = to_chatglm(name)
            if c in self.raw.where:  # a missing tensor: hf2mg's check names it under GLM's name
                part = _qkv_part(name)
                self.source[name] = (c, *self.rows[part]) if part else (c, None, None)
        self.where = {h: self.raw.where[c] for h, (c, _, _) in self.source.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        c, _, rows = self.source[name]
        shape = self.raw.shape(c)
        return shape if rows is None else (rows, *shape[1:])

    def __call__(self, name: str, rows=None, cols=None) -> torch.Tensor:
        c, first, n = self.source[name]
        if first is None:
            return self.raw(c, rows, cols)
        a, b = rows or (0, n)
        t = self.raw(c, rows=(first + a, first + b))
        return t if cols is None else t[:, cols[0]:cols[1]]


def glm_model(model_dir: str | Path):
    """transformers' GlmForCausalLM holding a chatglm-layout folder's weights (fp32): what --verify compares to."""
    import transformers

    from ascendfactory.modelinfo import read_model_facts

    cfg = glm_config(json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")))
    model = transformers.GlmForCausalLM(transformers.GlmConfig(
        pad_token_id=None, **{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}))
    read = ChatGLMReader(model_dir, read_model_facts(model_dir))
    model.load_state_dict({name: read(name) for name in read.source}, strict=True)
    return model.float()


def open_reader(model_dir: str | Path, facts: ModelFacts):
    return ChatGLMReader(model_dir, facts) if is_chatglm_dir(model_dir) else SafetensorsReader(model_dir)


def inv_freq(config_dir: str | Path) -> torch.Tensor:
    """ChatGLM's RotaryEmbedding(kv_channels // 2) buffer as its __init__ computes it (base 10000, in the config's
    dtype; its forward uses the config's rope_ratio instead)."""
    import torch

    cfg = json.loads((Path(config_dir) / "config.json").read_text(encoding="utf-8"))
    dim = (cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]) // 2
    dtype = getattr(torch, cfg.get("torch_dtype") or "float32")
    return 1.0 / (10000 ** (torch.arange(0, dim, 2).to(dtype=dtype) / dim))


def chatglm_plan(plan: list[tuple[str, tuple[int, ...]]], config_dir) -> list[tuple[str, tuple[int, ...]]]:
    """mg2hf's output plan (GLM names, in writing order) in chatglm names: q / k / v become one query_key_value."""
    out: dict[str, tuple[int, ...]] = {INV_FREQ: tuple(inv_freq(config_dir).shape)}
    for name, shape in plan:
        c = to_chatglm(name)
        out[c] = (out[c][0] + shape[0], *shape[1:]) if c in out else shape
    return list(out.items())


def adapter_pairs(pairs: dict[str, tuple]) -> dict[str, tuple]:
    """PEFT adapters under GLM's linear names -> under the chatglm ones: q / k / v share A (one fused linear), so
    query_key_value's adapter is that A with their B rows stacked in q, k, v order."""
    import torch

    out = {}
    for name, (a, b) in pairs.items():
        part = _qkv_part(name)
        if part is None:
            out[to_chatglm(name)] = (a, b)
        elif part == QKV[0]:
            out[to_chatglm(name)] = (a, torch.cat([pairs[name.replace(part, p)][1] for p in QKV]))
    return out


class ChatGLMWriter:
    """Takes GLM-named tensors in plan order and writes them to a ShardedWriter under chatglm names, q / k / v
    concatenated into query_key_value."""

    def __init__(self, writer, config_dir):
        self.writer = writer
        self.parts: list[torch.Tensor] = []
        writer.write(INV_FREQ, inv_freq(config_dir))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if _qkv_part(name) is None:
            self.writer.write(to_chatglm(name), tensor)
            return
        self.parts.append(tensor)
        if len(self.parts) == len(QKV):
            self.writer.write(to_chatglm(name), torch.cat(self.parts))
            self.parts = []

    def finish(self) -> list[str]:
        return self.writer.finish()

    @property
    def total(self) -> int:
        return self.writer.total
