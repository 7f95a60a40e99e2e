"""A LoRA training checkpoint's adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
which peft / vLLM load on top of the original HF model.

HF keeps q/k/v and gate/up as separate linears where megatron-core fuses them, but the fused adapter splits
exactly: the delta of q_proj is B_q A, with B_q the q rows of the fused B (the same rows the conversion table
takes from the fused weight) and the shared A. So each HF linear gets lora_A = A and its own rows of B, and a
row-parallel linear (o_proj, down_proj) gets its A columns gathered from the TP ranks; same rank and scale.
Each mapping kind owns its split (sharding.py: split_adapter).
"""

from __future__ import annotations

import json

from ascendfactory.ckpt.lora import LORA_A, LORA_B
from ascendfactory.ckpt.reader import read_checkpoint_layout
from ascendfactory.convert import chatglm
from ascendfactory.convert.fingerprint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_complete, adapter_fingerprint
from ascendfactory.convert.target import staged, up_to_date
from ascendfactory.errors import UserError
from ascendfactory.families import merged_items, rules_for
from ascendfactory.layout import ShardPlan
from ascendfactory.modelinfo import is_chatglm_dir, read_model_facts
from ascendfactory.progress import Progress


def export_peft_adapter(mg_dir, out_dir, hf_config_dir, iteration: int | None = None, *,
                        replace_ours: bool = False, flag: str = "--peft-dir") -> bool:
    """Write the adapters of a LoRA checkpoint; False when out_dir already holds this export. UserError for a
    checkpoint without adapters."""
    from safetensors.torch import save_file

    facts = read_model_facts(hf_config_dir)
    ck = read_checkpoint_layout(mg_dir, iteration)
    args = ck.args()
    if args.get("finetuning_type") != "lora":
        raise UserError(f"{ck.path}: iteration {ck.iteration} holds no LoRA adapters (not a finetuning_type lora "
                        "checkpoint); export it with mg2hf")
    fp = adapter_fingerprint(mg_dir, ck.iteration, hf_config_dir)
    log = Progress("peft")
    if up_to_date(out_dir, fp, flag, replace_ours, adapter_complete):
        log.say(f"{out_dir} already holds this adapter; nothing to do")
        return False
    layout = ShardPlan(ck.tp, ck.pp, ck.layers, facts.vocab_size, ck.padded_vocab_size, ck.ep)
    chatglm_layout = is_chatglm_dir(hf_config_dir)
    tensors, modules = {}, set()
    for p in range(ck.pp):
        by_ep = {}  # EP rank -> its TP ranks' states (MoE: an expert's adapters are in its EP rank's files)
        for e, rule, mg_name, names in merged_items(facts, rules_for(facts, ck.pp), layout, p):
            if e not in by_ep:
                by_ep[e] = [ck.state(t, p, e, fold_adapters=False) for t in range(ck.tp)]
            states = by_ep[e]
            stem = mg_name.removesuffix("weight")
            if stem + LORA_A not in states[0]:
                continue
            pairs = rule.kind.split_adapter(names, [sd[stem + LORA_A] for sd in states],
                                            [sd[stem + LORA_B] for sd in states], facts)
            if chatglm_layout:  # the adapter goes on the model as it came, under its own linear names
                pairs = chatglm.adapter_pairs(pairs)
            for name, (a, b) in pairs.items():
                module = name.removesuffix(".weight")
                # clones: the fused A is every split linear's own A, and safetensors stores no shared memory
                tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()
                tensors[f"base_model.model.{module}.lora_B.weight"] = b.clone()
                modules.add(module.rsplit(".", 1)[-1])
        del states, by_ep
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(hf_config_dir),
        "r": int(args["lora_r"]), "lora_alpha": float(args["lora_alpha"]),
        "lora_dropout": float(args.get("lora_dropout", 0.0)), "target_modules": sorted(modules), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None,
    }
    with staged(out_dir, fp) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    log.say(f"wrote {out_dir} (PEFT LoRA adapter: r {config['r']}, {len(tensors) // 2} linears, "
            f"{', '.join(config['target_modules'])}; from {ck.describe()} iteration {ck.iteration})")
    return True
