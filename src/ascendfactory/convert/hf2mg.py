"""HF safetensors -> Megatron TP/PP shards, one output rank at a time."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ascendfactory.ckpt.files import CHECKPOINT_VERSION, checkpoint_args, rank_dir_name, rank_file, write_tracker
from ascendfactory.convert.chatglm import open_reader
from ascendfactory.convert.fingerprint import conversion_complete, conversion_fingerprint
from ascendfactory.convert.hfread import SafetensorsReader
from ascendfactory.convert.options import ITERATION, dtype_name, torch_dtype
from ascendfactory.convert.target import staged, up_to_date
from ascendfactory.errors import UserError, disk_full_as_error
from ascendfactory.families import Rule, hf_shape, model_items, rules_for
from ascendfactory.layout import ShardPlan, parse_layer_list, plan_layout
from ascendfactory.modelinfo import ModelFacts
from ascendfactory.progress import Progress


def _check_source(read: SafetensorsReader, hf_dir, facts: ModelFacts, rules: list[Rule], layout: ShardPlan) -> None:
    """Every HF tensor the tables need exists with the shape config.json implies, before anything is written."""
    for p, e in ((p, e) for p in range(layout.pp) for e in range(layout.ep)):
        for rule, _, names in model_items(facts, rules, layout, p, e):
            for template, name in zip(rule.hf, names):
                if name not in read.where:
                    raise UserError(f"{hf_dir}: tensor {name} missing from the safetensors files; "
                                    f"the weights do not match config.json ({facts.architecture})")
                if read.shape(name) != hf_shape(template, facts):
                    raise UserError(f"{read.where[name]}: tensor {name} has shape {read.shape(name)}, config.json "
                                    f"implies {hf_shape(template, facts)}; the weights do not match config.json")


def write_ranks(tmp: Path, layout: ShardPlan, items_of, shard, args: dict, cast, log: Progress,
                iteration: int = ITERATION) -> None:
    """The rank files of `layout` under tmp, one at a time: items_of(p, e) lists a rank's (rule, megatron name,
    HF names), shard(rule, HF names, t) builds TP rank t's tensor of one; cast: the dtype to write (None: as
    built)."""
    done, tp, pp, ep = 0, layout.tp, layout.pp, layout.ep
    # One rank file at a time, each built from only its own slices (its experts, its TP part): memory is one
    # rank's share, whatever the number of experts or layers.
    for p, e in ((p, e) for p in range(pp) for e in range(ep)):
        items = list(items_of(p, e))
        for t in range(tp):
            t0, rank = time.time(), rank_dir_name(t, p, pp, e, ep)
            sd = {}
            for rule, mg_name, names in items:
                tensor = shard(rule, names, t)
                sd[mg_name] = (tensor.to(cast) if cast else tensor).contiguous()
                log.heartbeat(f"{rank}: {len(sd)}/{len(items)} tensors")
            path = rank_file(tmp, iteration, t, p, pp, e, ep)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:  # a Python file: a full disk surfaces as its OSError
                torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
                            "model": sd}, f)
            done += 1
            size = sum(v.numel() * v.element_size() for v in sd.values())
            log.say(f"[{done}/{tp * pp * ep}] {rank}: {len(sd)} tensors, {size / 2**20:.1f} MiB "
                    f"in {time.time() - t0:.1f} s")
            del sd


def hf_to_megatron(hf_dir, mg_dir, tp: int, pp: int, num_layer_list=None, dtype: str | None = None,
                   make_vocab_size_divisible_by: int | None = None, *, ep: int = 1, replace_ours: bool = False,
                   flag: str = "--mg-dir") -> bool:
    """Convert; returns False when mg_dir already holds this exact conversion (nothing done).
    ep: expert parallel size (MoE): each EP rank's folder holds its num_experts / ep experts.

    replace_ours: replace a different conversion made earlier by us in mg_dir (the pipeline's own folder);
    flag: how error messages name mg_dir."""
    facts, layout = plan_layout(hf_dir, tp, pp, num_layer_list, make_vocab_size_divisible_by, ep)
    dtype = dtype_name(dtype)
    fp = conversion_fingerprint(hf_dir, layout, dtype)
    log = Progress("hf2mg")
    if up_to_date(mg_dir, fp, flag, replace_ours, lambda d: conversion_complete(d, layout)):
        log.say(f"{mg_dir} already holds this conversion; nothing to do")
        return False
    read = open_reader(hf_dir, facts)
    rules = rules_for(facts, pp)
    _check_source(read, hf_dir, facts, rules, layout)
    cast = torch_dtype(dtype)
    args = checkpoint_args(tp, pp, parse_layer_list(num_layer_list, "--num-layer-list"), str(Path(hf_dir).resolve()),
                           facts.architecture, facts.vocab_size, layout.padded_vocab_size, ep,
                           facts.num_experts, tie_word_embeddings=facts.tie_word_embeddings, dtype=dtype)
    with disk_full_as_error(f"{flag} {mg_dir}"), staged(mg_dir, fp) as tmp:
        write_ranks(tmp, layout, lambda p, e: model_items(facts, rules, layout, p, e),
                    lambda rule, names, t: rule.kind.shard(names, read, facts, layout, t), args, cast, log)
        write_tracker(tmp, ITERATION)
    ep_part = f" EP{ep}" if ep > 1 else ""
    log.say(f"wrote {mg_dir} (TP{tp} PP{pp}{ep_part}, layers {list(layout.layers)}, vocab {facts.vocab_size}"
            f"->{layout.padded_vocab_size}) in {log.elapsed():.1f} s")
    return True
