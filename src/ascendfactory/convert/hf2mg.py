"""HF safetensors -> Megatron TP/PP shards, one output rank at a time."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ascendfactory.ckpt.files import CHECKPOINT_VERSION, checkpoint_args, rank_dir_name, rank_file, write_tracker
from ascendfactory.ckpt.torchfile import Planned, TorchFileWriter
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
from ascendfactory.sharding import Reader


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


def write_ranks(tmp: Path, layout: ShardPlan, items_of, reader_of, facts: ModelFacts, args: dict, cast,
                log: Progress, iteration: int = ITERATION) -> None:
    """The rank files of `layout` under tmp, one at a time, each streamed tensor by tensor: items_of(p, e) lists a
    rank's (rule, megatron name, HF names); reader_of(rule, HF names, meta) is the Reader of one row's HF tensors
    (meta: shapes and dtypes only, to plan a file before its data); cast: the dtype to write (None: as read).
    Memory is one tensor (one expert's), whatever the number of experts or layers."""
    done, tp, pp, ep = 0, layout.tp, layout.pp, layout.ep
    for p, e in ((p, e) for p in range(pp) for e in range(ep)):
        items = list(items_of(p, e))
        for t in range(tp):
            t0, rank = time.time(), rank_dir_name(t, p, pp, e, ep)
            path = rank_file(tmp, iteration, t, p, pp, e, ep)
            path.parent.mkdir(parents=True, exist_ok=True)
            size = write_rank_file(path, args, items, reader_of, facts, layout, t, cast, iteration, log)
            done += 1
            log.say(f"[{done}/{tp * pp * ep}] {rank}: {len(items)} tensors, {size / 2**20:.1f} MiB "
                    f"in {time.time() - t0:.1f} s")


def write_rank_file(path: Path, args: dict, items: list, reader_of, facts: ModelFacts, layout: ShardPlan,
                    tp_rank: int, cast: torch.dtype | None, iteration: int = ITERATION,
                    log: Progress | None = None) -> int:
    """TP rank `tp_rank`'s file of `items` ((rule, megatron name, HF names), a stage's or an EP rank's), with the
    bytes torch.save writes for {"args", "checkpoint_version", "iteration", "model"}; returns its tensor bytes.
    The pickle is planned from shapes alone (the kinds run on meta tensors), then each tensor is read and
    written in its parts, one at a time."""
    model = {}
    for rule, mg_name, names in items:
        m = rule.kind.shard(names, reader_of(rule, names, True), facts, layout, tp_rank)
        model[mg_name] = Planned(m.shape, cast or m.dtype)
    state = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model}
    # a Python file: a full disk surfaces as its OSError
    with open(path, "wb") as f, TorchFileWriter(f, state) as w:
        for k, (rule, _, names) in enumerate(items):
            w.write(*(part.to(cast) if cast else part for part in
                      rule.kind.shard_parts(names, reader_of(rule, names, False), facts, layout, tp_rank)))
            if log:
                log.heartbeat(f"{path.parent.name}: {k + 1}/{len(items)} tensors")
    return sum(p.nbytes for p in model.values())


class _MetaReader:
    """A Reader giving meta tensors of the real one's shapes and dtypes: plans a shard without its data."""

    def __init__(self, read: Reader):
        self.read, self.dtypes = read, {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.read.shape(name)

    def __call__(self, name: str, rows=None, cols=None) -> torch.Tensor:
        shape = list(self.read.shape(name))
        if name not in self.dtypes:  # the dtype from a read of no rows (no data read)
            self.dtypes[name] = self.read(name, rows=(0, 0)).dtype
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        if cols is not None:
            shape[1] = cols[1] - cols[0]
        return torch.empty(shape, dtype=self.dtypes[name], device="meta")


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
        meta = _MetaReader(read)
        write_ranks(tmp, layout, lambda p, e: model_items(facts, rules, layout, p, e),
                    lambda rule, names, planning: meta if planning else read, facts, args, cast, log)
        write_tracker(tmp, ITERATION)
    ep_part = f" EP{ep}" if ep > 1 else ""
    log.say(f"wrote {mg_dir} (TP{tp} PP{pp}{ep_part}, layers {list(layout.layers)}, vocab {facts.vocab_size}"
            f"->{layout.padded_vocab_size}) in {log.elapsed():.1f} s")
    return True
