"""The layout vocabulary, each kind defined once (no torch: `plan` reads it). ClusterLayout: nodes, devices per
node, world. ParallelLayout: TP, PP, CP, DP, micro-batches, EP and
expert DP. RunLayout: both, as launch/cluster.py reads them.
ShardPlan and the TP/PP layout rules of a conversion: layer split, vocab padding, divisibility. A checkpoint's
recorded layout is ckpt.reader.CheckpointLayout (read with torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ascendfactory.errors import UserError
from ascendfactory.modelinfo import ModelFacts, read_model_facts


@dataclass(frozen=True)
class ClusterLayout:
    device: str
    world_size: int
    nnodes: int
    nproc_per_node: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str = "single node"


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pp: int
    cp: int
    dp: int | None  # None when TP*PP*CP does not divide the world size (a rule reports it)
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int | None
    ep: int = 1  # expert parallel (MoE)
    expert_dp: int | None = None  # expert data parallel: DP x CP / EP (expert TP = TP); None when EP does not divide


def parallel_layout(cfg, world_size: int) -> ParallelLayout:
    model_par = cfg.tp * cfg.pp * cfg.cp
    dp = world_size // model_par if model_par > 0 and world_size % model_par == 0 else None
    mbs, gbs = cfg.micro_batch_size, cfg.global_batch_size
    nmb = gbs // (mbs * dp) if dp and mbs > 0 and gbs % (mbs * dp) == 0 else None
    # megatron-core's expert groups: the DP x CP ranks of a TP x PP position split into EP x expert-DP
    expert_dp = dp * cfg.cp // cfg.ep if dp and cfg.ep > 0 and dp * cfg.cp % cfg.ep == 0 else None
    return ParallelLayout(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, dp=dp, micro_batch_size=mbs, global_batch_size=gbs,
                          num_microbatches=nmb, ep=cfg.ep, expert_dp=expert_dp)


@dataclass(frozen=True)
class RunLayout:
    cluster: ClusterLayout
    parallel: ParallelLayout

    def __getattr__(self, name: str):
        # layout.world_size, layout.dp; __dict__, not self.cluster: no recursion in copy()
        for part in self.__dict__.values():
            if name in part.__dataclass_fields__:
                return getattr(part, name)
        raise AttributeError(name)

    def as_json(self) -> dict:
        cluster = asdict(self.cluster)
        cluster.pop("source")
        return {**cluster, **asdict(self.parallel)}


def parse_layer_list(value: str | list[int] | None, key: str = "num_layer_list") -> list[int] | None:
    """Layers per pipeline stage, from `10,12,10` or a list; None when not given. `key`: how errors name it."""
    if value is None or value == "" or value == []:
        return None
    try:
        layers = [int(x) for x in (value.replace(" ", "").split(",") if isinstance(value, str) else value) if x != ""]
    except (TypeError, ValueError):
        raise UserError(f"{key} = {value!r}: not a comma-separated list of integers, e.g. 10,12,10") from None
    if min(layers, default=0) < 1:
        raise UserError(f"{key} = {value!r}: every pipeline stage needs at least 1 layer, e.g. 10,12,10")
    return layers


def stage_layers(num_layers: int, pp: int, num_layer_list: list[int] | None = None,
                 keys: tuple[str, str] = ("--num-layer-list", "--pp")) -> list[int]:
    """Layers held by each pipeline stage: the explicit list, or an even split. `keys`: how errors name the
    list and the PP size (CLI flags here, config keys for the trainer)."""
    list_key, pp_key = keys
    if pp < 1:
        raise UserError(f"{pp_key}: must be >= 1, got {pp}")
    if num_layer_list is not None:
        if len(num_layer_list) != pp or any(n < 1 for n in num_layer_list) or sum(num_layer_list) != num_layers:
            raise UserError(f"{list_key}: {','.join(map(str, num_layer_list))} must have {pp} positive "
                            f"entries (one per PP stage) summing to num_hidden_layers={num_layers}")
        return list(num_layer_list)
    if num_layers % pp:
        raise UserError(f"{pp_key}: {pp} does not divide num_hidden_layers={num_layers}; choose a divisor of "
                        f"{num_layers} or use {list_key}")
    return [num_layers // pp] * pp


def padded_vocab_size(vocab: int, tp: int, divisible_by: int | None) -> int:
    """Megatron's padding: a multiple of divisible_by * TP; no padding without the option."""
    if divisible_by is None:
        return vocab
    if divisible_by < 1:
        raise UserError(f"--make-vocab-size-divisible-by: must be >= 1, got {divisible_by}")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def check_tp(facts: ModelFacts, tp: int, padded_vocab: int) -> None:
    if tp < 1:
        raise UserError(f"--tp: must be >= 1, got {tp}")
    sizes = [("num_attention_heads", facts.num_heads), ("num_key_value_heads", facts.num_kv_heads),
             ("intermediate_size", facts.ffn_hidden_size)]
    if facts.num_experts:  # experts and the shared expert are TP-split like a dense MLP (expert TP = TP)
        sizes += [("moe_intermediate_size", facts.moe_ffn_hidden_size),
                  ("shared_expert_intermediate_size", facts.shared_expert_size)]
    for what, n in sizes:
        if n % tp:
            raise UserError(f"--tp: {tp} does not divide {what}={n} of config.json; choose a divisor of {n}")
    if padded_vocab % tp:
        raise UserError(f"--tp: {tp} does not divide vocab_size={padded_vocab}; pass "
                        f"--make-vocab-size-divisible-by (e.g. 128) to pad the vocabulary")


def check_ep(facts: ModelFacts, ep: int) -> None:
    if ep < 1:
        raise UserError(f"--ep: must be >= 1, got {ep}")
    if ep > 1 and not facts.num_experts:
        raise UserError(f"--ep: {ep} needs a Mixture-of-Experts model; {facts.architecture} has no experts "
                        "(use --ep 1)")
    if facts.num_experts % ep:
        raise UserError(f"--ep: {ep} does not divide the {facts.num_experts} experts of config.json; choose a "
                        f"divisor of {facts.num_experts}")


@dataclass(frozen=True)
class ShardPlan:
    tp: int
    pp: int
    layers: tuple[int, ...]  # layers per PP stage
    vocab_size: int
    padded_vocab_size: int
    ep: int = 1  # expert parallel: each EP rank holds num_experts / ep experts

    def first_layer(self, pp_rank: int) -> int:
        return sum(self.layers[:pp_rank])


def make_layout(facts: ModelFacts, tp: int, pp: int, num_layer_list: list[int] | None = None,
                make_vocab_size_divisible_by: int | None = None, ep: int = 1) -> ShardPlan:
    padded = padded_vocab_size(facts.vocab_size, tp, make_vocab_size_divisible_by)
    check_tp(facts, tp, padded)
    check_ep(facts, ep)
    layers = stage_layers(facts.num_layers, pp, num_layer_list)
    return ShardPlan(tp, pp, tuple(layers), facts.vocab_size, padded, ep)


def plan_layout(hf_dir, tp: int, pp: int, num_layer_list=None, make_vocab_size_divisible_by=None, ep: int = 1
                ) -> tuple[ModelFacts, ShardPlan]:
    """Facts + validated layout (UserError on any bad combination); reads config.json only."""
    facts = read_model_facts(hf_dir)
    return facts, make_layout(facts, tp, pp, parse_layer_list(num_layer_list, "--num-layer-list"),
                              make_vocab_size_divisible_by, ep)
