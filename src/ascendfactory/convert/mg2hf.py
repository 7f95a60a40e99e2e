"""Megatron checkpoint (any TP/PP, converted or training save, legacy or torch_dist) -> HF sharded safetensors.

Works one layer at a time: the TP rank files of a stage are memory-mapped, that layer's shards are
merged and streamed into the planned output file, and the maps are dropped before the next layer. A torch_dist
checkpoint reads as one TP1 PP1 rank whose global tensors are read from the shards one at a time.
"""

from __future__ import annotations

import json
import shutil
from itertools import groupby
from pathlib import Path

import torch

from ascendfactory.ckpt.reader import CheckpointLayout, read_checkpoint_layout
from ascendfactory.convert.chatglm import ChatGLMWriter, chatglm_plan
from ascendfactory.convert.fingerprint import export_complete, export_fingerprint
from ascendfactory.convert.options import dtype_name, torch_dtype
from ascendfactory.convert.stwriter import ShardedWriter, parse_size
from ascendfactory.convert.target import staged, up_to_date
from ascendfactory.errors import UserError, disk_full_as_error
from ascendfactory.families import hf_shape, is_expert, merged_items, rules_for
from ascendfactory.layout import ShardPlan
from ascendfactory.modelinfo import ModelFacts, is_chatglm_dir, read_model_facts
from ascendfactory.progress import Progress

DEFAULT_SHARD_SIZE = "5GB"
# Copied from --hf-config-dir: everything but weights (config, generation config, tokenizer files, templates).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def check_against(facts: ModelFacts, ck: CheckpointLayout, config_dir) -> None:
    if sum(ck.layers) != facts.num_layers:
        raise UserError(f"{config_dir}/config.json: num_hidden_layers={facts.num_layers} but the checkpoint "
                        f"holds {sum(ck.layers)} layers ({ck.describe()}); pass the config of the trained model")
    if ck.padded_vocab_size < facts.vocab_size:
        raise UserError(f"{config_dir}/config.json: vocab_size={facts.vocab_size} exceeds the checkpoint's "
                        f"{ck.padded_vocab_size} rows; pass the config of the trained model")
    if ck.architecture and ck.architecture != facts.architecture:
        raise UserError(f"{config_dir}/config.json: architecture {facts.architecture} but the checkpoint was "
                        f"converted from {ck.architecture}; pass the config of the trained model")


def _copy_config(config_dir: Path, out: Path, dtype: torch.dtype) -> None:
    for p in sorted(config_dir.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"):
            shutil.copy2(p, out / p.name)
    cfg = json.loads((out / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    key = "dtype" if "dtype" in cfg else "torch_dtype"
    if cfg.get(key) != name:  # say what was written, so dtype="auto" loads it as it is
        cfg[key] = name
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


def megatron_to_hf(mg_dir, hf_dir, hf_config_dir, iteration: int | None = None, dtype: str | None = None,
                   shard_size: str | int = DEFAULT_SHARD_SIZE, *, replace_ours: bool = False,
                   flag: str = "--hf-dir") -> bool:
    """Convert; returns False when hf_dir already holds this exact export (nothing done).

    replace_ours: replace a different export made earlier by us in hf_dir (the pipeline's own folder);
    flag: how error messages name hf_dir."""
    facts = read_model_facts(hf_config_dir)
    size = parse_size(shard_size)
    dtype = dtype_name(dtype)
    ck = read_checkpoint_layout(mg_dir, iteration)
    check_against(facts, ck, hf_config_dir)
    out_dtype = torch_dtype(dtype, ck.dtype)
    fp = export_fingerprint(mg_dir, ck.iteration, hf_config_dir, dtype, size)
    log = Progress("mg2hf")
    if up_to_date(hf_dir, fp, flag, replace_ours, export_complete):
        log.say(f"{hf_dir} already holds this export; nothing to do")
        return False
    layout = ShardPlan(ck.tp, ck.pp, ck.layers, facts.vocab_size, ck.padded_vocab_size, ck.ep)
    rules = [r for r in rules_for(facts, ck.pp) if r.to_hf]
    items = [it for p in range(ck.pp) for it in merged_items(facts, rules, layout, p)]
    plan = [(n, hf_shape(t, facts)) for _, rule, _, names in items for t, n in zip(rule.hf, names)]
    chatglm = is_chatglm_dir(hf_config_dir)  # export in the layout the model came in
    with disk_full_as_error(f"{flag} {hf_dir}"), staged(hf_dir, fp) as tmp:
        if chatglm:
            writer = ChatGLMWriter(ShardedWriter(tmp, chatglm_plan(plan, hf_config_dir), out_dtype, size),
                                   hf_config_dir)
        else:
            writer = ShardedWriter(tmp, plan, out_dtype, size)
        n_done = 0
        for p in range(ck.pp):
            # One group per layer's non-expert tensors, per expert, per embedding / final norm / output layer:
            # the rank files are memory-mapped and dropped after each group, so memory stays bounded whatever
            # the number of layers or experts.
            for (e, _), group in groupby(merged_items(facts, rules, layout, p), key=_group):
                states = [ck.state(t, p, e) for t in range(ck.tp)]
                for _, rule, mg_name, names in group:
                    for name, parts in merge_row(rule, mg_name, names, states, ck, p, e, facts,
                                                 hf_config_dir).items():
                        # in parts straight from the mapped shards: no merged copy (ChatGLM's fused q / k / v
                        # takes whole tensors)
                        if chatglm:
                            writer.write(name, torch.cat(parts))
                        else:
                            writer.write(name, *parts)
                        n_done += 1
                del states
                log.heartbeat(f"stage {p + 1}/{ck.pp}: {n_done}/{len(plan)} tensors")
            log.say(f"stage {p + 1}/{ck.pp} done, {n_done}/{len(plan)} tensors, {log.elapsed():.1f} s")
        files = writer.finish()
        _copy_config(Path(hf_config_dir), tmp, out_dtype)
    log.say(f"wrote {hf_dir} ({len(files)} safetensors files, {writer.total / 2**30:.2f} GiB, "
            f"from {ck.describe()} iteration {ck.iteration}) in {log.elapsed():.1f} s")
    return True


def _group(item) -> tuple[int, list[str]]:
    """(EP rank, decoder.layers.{j}[.mlp.experts.local_experts.{k}]) of a merged_items entry."""
    ep_rank, rule, mg_name, _ = item
    return ep_rank, mg_name.split(".")[:7 if is_expert(rule) else 3]


def merge_row(rule, mg_name: str, names: list[str], states: list[dict], ck: CheckpointLayout, pp_rank: int,
              ep_rank: int, facts: ModelFacts, config_dir, vocab_size: int | None = None
              ) -> dict[str, list[torch.Tensor]]:
    """The HF tensors of one row from its TP shards, each in consecutive row pieces (views of the shards, for a
    writer that streams them); vocab_size: the vocabulary rows kept (default config.json's: the padding dropped)."""
    missing = [ck.file(t, pp_rank, ep_rank) for t, sd in enumerate(states) if mg_name not in sd]
    if missing:
        raise UserError(f"{missing[0]}: tensor {mg_name} missing; the checkpoint does not match "
                        f"{facts.architecture} from {config_dir}")
    try:
        return rule.kind.merge_parts(names, [sd[mg_name] for sd in states], facts, vocab_size or facts.vocab_size)
    except RuntimeError as e:  # shapes that do not fit the config's heads / sizes
        raise UserError(f"{ck.file(0, pp_rank, ep_rank)}: tensor {mg_name} does not fit {config_dir}/config.json "
                        f"({e}); pass the config of the trained model") from None
