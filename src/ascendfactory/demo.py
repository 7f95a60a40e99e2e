"""Build the embedded demo's inputs offline: a tiny Qwen2-shaped model, a tiny Qwen3-MoE one (4 experts, top 2) +
their tokenizers and a small instruction dataset of our own, under `demo_work/` (paths used by configs/demo.yaml).

    python -m ascendfactory.demo [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ascendfactory import tiny


def build(out_dir: str | Path = "demo_work") -> Path:
    out = Path(out_dir)
    model = out / "qwen2-tiny"
    if not (model / "config.json").exists():
        tiny.make_tiny_model(model, "qwen2", seed=0, hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    moe = out / "qwen3-moe-tiny"
    if not (moe / "config.json").exists():
        tiny.make_tiny_model(moe, "qwen3_moe", seed=0, hidden_size=128, moe_intermediate_size=128, num_experts=4,
                             num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=4)
    data = out / "data" / "alpaca_demo.jsonl"
    if not data.exists():
        tiny.write_instruction_data(data, n=512, style="alpaca")
    pretrain = out / "data" / "pretrain_demo.jsonl"
    if not pretrain.exists():
        tiny.write_pretrain_data(pretrain, n=512)
    print(f"demo inputs ready in {out}: models {model}, {moe}, data {data.parent}")
    return out


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "demo_work")
