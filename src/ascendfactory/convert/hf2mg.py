"""HF safetensors -> Megatron TP/PP shards, one output rank at a time."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ascendfactory.ckpt.files import CHECKPOINT_VERSION, checkpoint_args, rank_dir_name, rank_file, write_tracker
from ascendfactory.families import Rule, hf_shape, rules_for, stage_items
from ascendfactory.convert.fingerprint import conversion_complete, conversion_fingerprint
from ascendfactory.convert.hfread import SafetensorsReader
from ascendfactory.convert.options import ITERATION, dtype_name, torch_dtype
from ascendfactory.layout import ShardPlan, parse_layer_list, plan_layout
from ascendfactory.progress import Progress
from ascendfactory.convert.target import staged, up_to_date
from ascendfactory.errors import UserError
from ascendfactory.modelinfo import ModelFacts


def _check_source(read: SafetensorsReader, hf_dir, facts: ModelFacts, rules: list[Rule], layout: ShardPlan) -> None:
    """Every HF tensor the tables need exists with the shape config.json implies, before anything is written."""
    for p in range(layout.pp):
        for rule, _, names in stage_items(rules, layout, p):
            for template, name in zip(rule.hf, names):
                if name not in read.where:
                    raise UserError(f"{hf_dir}: tensor {name} missing from the safetensors files; "
                                    f"the weights do not match config.json ({facts.architecture})")
                if read.shape(name) != hf_shape(template, facts):
                    raise UserError(f"{read.where[name]}: tensor {name} has shape {read.shape(name)}, config.json "
                                    f"implies {hf_shape(template, facts)}; the weights do not match config.json")


def hf_to_megatron(hf_dir, mg_dir, tp: int, pp: int, num_layer_list=None, dtype: str | None = None,
                   make_vocab_size_divisible_by: int | None = None, *, replace_ours: bool = False,
                   flag: str = "--mg-dir") -> bool:
    """Convert; returns False when mg_dir already holds this exact conversion (nothing done).

    replace_ours: replace a different conversion made earlier by us in mg_dir (the pipeline's own folder);
    flag: how error messages name mg_dir."""
    facts, layout = plan_layout(hf_dir, tp, pp, num_layer_list, make_vocab_size_divisible_by)
    dtype = dtype_name(dtype)
    fp = conversion_fingerprint(hf_dir, layout, dtype)
    log = Progress("hf2mg")
    if up_to_date(mg_dir, fp, flag, replace_ours, lambda d: conversion_complete(d, layout)):
        log.say(f"{mg_dir} already holds this conversion; nothing to do")
        return False
    read = SafetensorsReader(hf_dir)
    rules = rules_for(facts, pp)
    _check_source(read, hf_dir, facts, rules, layout)
    cast = torch_dtype(dtype)
    args = checkpoint_args(tp, pp, parse_layer_list(num_layer_list, "--num-layer-list"), str(Path(hf_dir).resolve()),
                           facts.architecture, facts.vocab_size, layout.padded_vocab_size,
                           tie_word_embeddings=facts.tie_word_embeddings, dtype=dtype)
    with staged(mg_dir, fp) as tmp:
        done = 0
        for p in range(pp):
            items = list(stage_items(rules, layout, p))
            for t in range(tp):
                t0, rank = time.time(), rank_dir_name(t, p, pp)
                sd = {}
                for rule, mg_name, names in items:
                    tensor = rule.kind.shard(names, read, facts, layout, t)
                    sd[mg_name] = (tensor.to(cast) if cast else tensor).contiguous()
                    log.heartbeat(f"{rank}: {len(sd)}/{len(items)} tensors")
                path = rank_file(tmp, ITERATION, t, p, pp)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": ITERATION,
                            "model": sd}, path)
                done += 1
                size = sum(v.numel() * v.element_size() for v in sd.values())
                log.say(f"[{done}/{tp * pp}] {rank}: {len(sd)} tensors, {size / 2**20:.1f} MiB "
                        f"in {time.time() - t0:.1f} s")
                del sd
        write_tracker(tmp, ITERATION)
    log.say(f"wrote {mg_dir} (TP{tp} PP{pp}, layers {list(layout.layers)}, vocab {facts.vocab_size}"
            f"->{layout.padded_vocab_size}) in {log.elapsed():.1f} s")
    return True
