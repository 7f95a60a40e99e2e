"""Megatron checkpoint (legacy or torch_dist, any TP/PP/EP) -> the same weights at another TP/PP/EP and/or in the
other format (`convert reshard`, and the weights-only load of a legacy checkpoint of another layout).

Streams through the mapping kinds (sharding.py) as hf2mg does: each tensor's HF tensors are merged from the
source's TP shards (mg2hf's merge, keeping the vocabulary padding), then cut for the target rank (hf2mg's shard);
legacy output is written one rank file at a time by hf2mg's writer, torch_dist output one global tensor at a time
(ckpt/dist.py). Only slicing and concatenation: the weights are bit-exact. A training checkpoint (optimizer state,
scheduler, RNG) is resharded in full by the engine through megatron-core instead (engine/reshard.py), unless
weights_only.
"""

from __future__ import annotations

from pathlib import Path

from ascendfactory.ckpt import dist
from ascendfactory.ckpt.files import (
    CHECKPOINT_VERSION,
    TRACKER,
    checkpoint_args,
    iter_dir_name,
    problem_of,
    read_tracker,
    write_tracker,
)
from ascendfactory.ckpt.reader import CheckpointLayout, read_checkpoint_layout
from ascendfactory.convert.fingerprint import conversion_complete, reshard_fingerprint
from ascendfactory.convert.hf2mg import write_ranks
from ascendfactory.convert.mg2hf import check_against, merge_row
from ascendfactory.convert.options import ITERATION
from ascendfactory.convert.target import staged, up_to_date
from ascendfactory.errors import UserError, disk_full_as_error
from ascendfactory.families import merged_items, model_items, rules_for
from ascendfactory.layout import ShardPlan, check_ep, check_tp, parse_layer_list, stage_layers
from ascendfactory.modelinfo import ModelFacts, read_model_facts
from ascendfactory.progress import Progress

FORMATS = ("legacy", "torch_dist")


class _Held:
    """sharding.Reader over HF tensors already in memory (one mapping row's)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __call__(self, name, rows=None, cols=None):
        t = self.tensors[name]
        if rows:
            t = t[rows[0]:rows[1]]
        return t[:, cols[0]:cols[1]] if cols else t

    def shape(self, name):
        return tuple(self.tensors[name].shape)


class _Source:
    """A checkpoint's weights by HF names: hf(rule, names) merges that row's TP shards (vocabulary padding kept),
    from the rank files of one stage / EP rank at a time (memory-mapped; a torch_dist checkpoint is one rank)."""

    def __init__(self, ck: CheckpointLayout, facts: ModelFacts, config_dir):
        self.ck, self.facts, self.config_dir = ck, facts, config_dir
        layout = ShardPlan(ck.tp, ck.pp, ck.layers, ck.padded_vocab_size, ck.padded_vocab_size, ck.ep)
        self.where: dict[tuple[str, ...], tuple[int, int, str]] = {}
        for p in range(ck.pp):
            for e in range(ck.ep):
                for _, mg_name, names in model_items(facts, rules_for(facts, ck.pp), layout, p, e):
                    self.where.setdefault(tuple(names), (p, e, mg_name))  # a tied output copy: the embedding
        self._open: tuple = (None, None)

    def _states(self, p: int, e: int, meta: bool) -> list:
        if self._open[0] != (p, e, meta):  # the previous stage's maps are dropped
            # meta: shapes only, so adapters stay unfolded (folding reads them)
            self._open = ((p, e, meta), [self.ck.state(t, p, e, fold_adapters=not meta) for t in range(self.ck.tp)])
        return self._open[1]

    def hf(self, rule, names: list[str], meta: bool = False) -> dict:
        import torch

        p, e, mg_name = self.where[tuple(names)]
        states = self._states(p, e, meta)
        if meta:
            states = [{mg_name: _meta(sd, mg_name)} if mg_name in sd else {} for sd in states]
        merged = merge_row(rule, mg_name, names, states, self.ck, p, e, self.facts, self.config_dir,
                           vocab_size=self.ck.padded_vocab_size)
        return {n: parts[0] if len(parts) == 1 else torch.cat(parts) for n, parts in merged.items()}


def _meta(state, name: str):
    """A tensor's shape and dtype without reading it (torch_dist: from the index; legacy: a memory-mapped one)."""
    import torch

    if isinstance(state, dist.DistState):
        parts, index = state.where(name)
        shape = state.index.size(parts[0])[len(index):]
        shape = (shape[0] * len(parts), *shape[1:])
        return torch.empty(shape, dtype=state.index.dtype(parts[0]), device="meta")
    return state[name].to("meta")


def _facts(ck: CheckpointLayout, hf_config_dir) -> tuple[ModelFacts, Path]:
    """config.json of the checkpoint's model: --hf-config-dir, else the source model its args record."""
    config_dir = Path(hf_config_dir) if hf_config_dir else Path(ck.source_model) if ck.source_model else None
    if config_dir is None or not (config_dir / "config.json").is_file():
        where = f"its source model {ck.source_model} has no config.json here" if ck.source_model else \
            "its args name no source model"
        if hf_config_dir:
            where = f"{hf_config_dir}/config.json missing"
        raise UserError(f"{ck.path / iter_dir_name(ck.iteration)}: {where}; pass --hf-config-dir with the model's "
                        "config.json")
    facts = read_model_facts(config_dir)
    check_against(facts, ck, config_dir)
    return facts, config_dir


def target_layout(facts: ModelFacts, padded_vocab: int, tp: int, pp: int, ep: int, num_layer_list) -> ShardPlan:
    """The layout rules hf2mg applies, with the checkpoint's padded vocabulary kept (its padding rows too)."""
    if tp >= 1 and padded_vocab % tp:
        raise UserError(f"--tp: {tp} does not divide the checkpoint's {padded_vocab} vocabulary rows; choose a "
                        f"divisor of {padded_vocab}")
    check_tp(facts, tp, padded_vocab)
    check_ep(facts, ep)
    layers = stage_layers(facts.num_layers, pp, parse_layer_list(num_layer_list, "--num-layer-list"))
    return ShardPlan(tp, pp, tuple(layers), padded_vocab, padded_vocab, ep)


def _complete(target: Path, layout: ShardPlan, ckpt_format: str, full: bool) -> bool:
    if full:  # the engine's save: tracker and manifest
        return (target / TRACKER).is_file() and problem_of(target / iter_dir_name(read_tracker(target)), True) is None
    if ckpt_format == "legacy":
        return conversion_complete(target, layout)
    return (target / TRACKER).is_file() and problem_of(target / iter_dir_name(ITERATION), False) is None


def reshard(mg_dir, out_dir, tp: int, pp: int, ep: int = 1, num_layer_list=None, ckpt_format: str = "legacy",
            hf_config_dir=None, iteration: int | None = None, *, weights_only: bool = False,
            replace_ours: bool = False, flag: str = "--out-dir") -> bool:
    """Write mg_dir's checkpoint at TP/PP/EP in ckpt_format into out_dir: a training checkpoint in full (its
    iteration, resumable with ckpt_load_type 2), otherwise or with weights_only its weights (iteration 1, as
    converted weights); returns False when out_dir already holds this exact result (nothing done).
    replace_ours / flag: as hf_to_megatron's."""
    if ckpt_format not in FORMATS:
        raise UserError(f"--ckpt-format: {ckpt_format!r}; use legacy or torch_dist")
    ck = read_checkpoint_layout(mg_dir, iteration)
    facts, config_dir = _facts(ck, hf_config_dir)
    layout = target_layout(facts, ck.padded_vocab_size, tp, pp, ep, num_layer_list)
    it_dir = ck.path / iter_dir_name(ck.iteration)
    if Path(out_dir).resolve() == Path(mg_dir).resolve():
        raise UserError(f"{flag} {out_dir}: is the source checkpoint; choose another folder")
    full = not weights_only and ck.resume_problem() is None
    if full and iteration is not None and iteration != read_tracker(ck.path):
        raise UserError(f"--iteration {iteration}: a training checkpoint is resharded in full from its tracker's "
                        "iteration; add --weights-only to take the weights of another one")
    fp = reshard_fingerprint(ck.path, ck.iteration, (tp, pp, ep, layout.layers), ckpt_format, config_dir, full)
    log = Progress("reshard")
    if up_to_date(out_dir, fp, flag, replace_ours, lambda d: _complete(Path(d), layout, ckpt_format, full)):
        log.say(f"{out_dir} already holds this conversion; nothing to do")
        return False
    if full:
        from ascendfactory.engine.reshard import reshard_full

        log.say(f"{it_dir} holds optimizer state: resharding it in full (weights, optimizer, scheduler, "
                "iteration) with the engine on CPU")
        with disk_full_as_error(f"{flag} {out_dir}"), staged(out_dir, fp) as tmp:
            reshard_full(ck.path, tmp, tp, pp, ep, ckpt_format, model_dir=hf_config_dir,
                         num_layer_list=list(layout.layers) if num_layer_list else None)
        log.say(f"wrote {out_dir} ({ckpt_format}, TP{tp} PP{pp}{f' EP{ep}' if ep > 1 else ''}, resumable with "
                f"ckpt_load_type 2) from {ck.describe()} iteration {ck.iteration} in {log.elapsed():.1f} s")
        return True
    source = _Source(ck, facts, config_dir)
    args = checkpoint_args(tp, pp, parse_layer_list(num_layer_list, "--num-layer-list"), ck.source_model or
                           str(config_dir.resolve()), facts.architecture, facts.vocab_size, ck.padded_vocab_size, ep,
                           facts.num_experts, tie_word_embeddings=facts.tie_word_embeddings)
    with disk_full_as_error(f"{flag} {out_dir}"), staged(out_dir, fp) as tmp:
        if ckpt_format == "legacy":
            rules = rules_for(facts, pp)
            write_ranks(tmp, layout, lambda p, e: model_items(facts, rules, layout, p, e),
                        lambda rule, names, meta: _Held(source.hf(rule, names, meta)), facts, args, None, log)
        else:
            _write_dist(tmp / iter_dir_name(ITERATION), source, facts, args, log)
        write_tracker(tmp, ITERATION)
    ep_part = f" EP{ep}" if ep > 1 else ""
    log.say(f"wrote {out_dir} ({ckpt_format}, TP{tp} PP{pp}{ep_part}, layers {list(layout.layers)}) from "
            f"{ck.describe()} iteration {ck.iteration} in {log.elapsed():.1f} s")
    return True


def _write_dist(iter_path: Path, source: _Source, facts: ModelFacts, args: dict, log: Progress) -> None:
    """The global tensors (the TP1 PP1 EP1 state) under megatron-core's keys, each built when written."""
    whole = ShardPlan(1, 1, (facts.num_layers,), source.ck.padded_vocab_size, source.ck.padded_vocab_size, 1)
    rows = {mg_name: (rule, names) for _, rule, mg_name, names in merged_items(facts, rules_for(facts, 1), whole, 0)}

    def build(name: str, meta: bool = False):
        rule, names = rows[name]
        return rule.kind.shard(names, _Held(source.hf(rule, names, meta)), facts, whole, 0)

    entries = [(name, t.shape, t.dtype) for name in rows for t in (build(name, meta=True),)]
    done = [0]

    def fetch(name: str):
        done[0] += 1
        log.heartbeat(f"{done[0]}/{len(entries)} tensors")
        return build(name).contiguous()

    # megatron-core stacks the layers of a homogeneous block only; an MoE model's (moe_layer_freq) are one key each
    dist.write(iter_path, entries, fetch, stacked=not facts.num_experts,
               common={"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": ITERATION})
    log.say(f"{iter_path.name}: {len(entries)} tensors")

