"""Per-device memory estimate for a run's layout, model, precision, optimizer and sequence length (SPEC.md
section 10): a pure function of the config, the model facts and the parallel layout, in bytes per term.
No torch import: `plan` prints it for every experiment in well under a second.

Static memory, P = parameters on the rank (after TP/PP), T = the trainable ones among them:
weights P x (2 in bf16/fp16, 4 in fp32); gradients T x 4 (megatron-core's fp32 grad buffer); optimizer T x 12
(fp32 main weights + two Adam moments; 8 in fp32, where the weights are the main weights), divided by DP x CP
with the distributed optimizer (megatron-core shards it over every replica). Activations per layer and
micro-batch by Korthikanti et al. 2022, in 16-bit: s*b*h*(34 + 5*a*s/h)/TP with sequence parallel (without it
s*b*h*(10 + 24/TP + 5*a*s/(h*TP))), 34/TP with selective recompute, 2*s*b*h(/TP with SP) with full recompute,
all divided by CP; under 1F1B stage k holds min(PP - k, micro-batches) micro-batches in flight.
Mixture-of-Experts: an MoE layer holds the router, E / EP experts and any shared expert (layer_parameters); the
experts' optimizer state is sharded over the expert DP ranks (DP x CP / EP); the routed top-k copies of each token
replace the dense MLP's activations (_activation_bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30


def default_precision(device_kind: str) -> str:
    """precision: auto -> what the device trains in."""
    return "fp32" if device_kind == "cpu" else "bf16"


@dataclass(frozen=True)
class Estimate:
    """Bytes per device on the pipeline stage that needs the most (all ranks of a stage need the same)."""

    stage: int
    parameters: int  # on this rank
    trainable_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # one micro-batch, with the run's recompute setting
    activations_no_recompute: int
    activations_full_recompute: int
    micro_batches_in_flight: int
    logits: int  # the output layer's fp32 logits of one micro-batch (last stage)
    peak: int
    recompute: str  # none | selective | full
    precision: str
    expert_parameters: int = 0  # the routed experts' (and their adapters') among `parameters`

    @property
    def terms(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations * self.micro_batches_in_flight + self.logits}

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)

    def as_json(self) -> dict:
        return {**asdict(self), "largest": self.largest}


def _mlp_linears(facts, ffn: int, tp: int) -> dict[str, tuple[int, int]]:
    fc1 = ffn * (2 if facts.family.mlp == "swiglu" else 1)  # gated: gate and up fused
    return {"linear_fc1": (facts.hidden_size, fc1 // tp), "linear_fc2": (ffn // tp, facts.hidden_size)}


def _linears(facts, tp: int) -> dict[str, tuple[int, int]]:
    """(input, output) features of each linear of a dense layer on one TP rank, megatron-core's names."""
    h, d = facts.hidden_size, facts.head_dim
    qkv = (facts.num_heads + 2 * facts.num_kv_heads) * d
    return {"linear_qkv": (h, qkv // tp), "linear_proj": (facts.num_heads * d // tp, h),
            **_mlp_linears(facts, facts.ffn_hidden_size, tp)}


def _weights(linears: dict[str, tuple[int, int]]) -> int:
    return sum(i * o for i, o in linears.values())


def _adapters(linears: dict[str, tuple[int, int]], r: int, targets) -> int:
    """LoRA A [r, in] and B [out, r] of the target linears: a column-parallel linear splits B and keeps A whole,
    a row-parallel one the other way round (engine/lora.py), so each holds its linear's local sizes."""
    return sum(r * (i + o) for name, (i, o) in linears.items() if name in targets)


@dataclass(frozen=True)
class LayerParams:
    """One decoder layer's parameters on a rank: `dense` = everything megatron-core all-reduces over DP x CP
    (attention, norms, a dense MLP, the router, the shared expert), `experts` = the routed experts of this EP rank
    (reduced over the expert DP ranks only); the LoRA adapters of each (engine/lora.py adapts every linear_fc1 /
    linear_fc2 of the layer, the experts' included)."""

    dense: int
    experts: int
    dense_lora: int = 0
    experts_lora: int = 0


def layer_parameters(facts, tp: int, ep: int = 1, moe: bool = False, lora_r: int = 0, targets=()) -> LayerParams:
    """A dense layer (moe=False) or an MoE layer (SPEC.md section 8): the router [E, H] replicated, E / EP experts
    each TP-split like a dense MLP of the expert size, Qwen2-MoE's shared expert split likewise and its [1, H]
    gate replicated."""
    lin = _linears(facts, tp)
    attention = {k: lin[k] for k in ("linear_qkv", "linear_proj")}
    mlp = {k: lin[k] for k in ("linear_fc1", "linear_fc2")}
    norm = facts.hidden_size * (2 if facts.family.norm == "LayerNorm" else 1)
    qkv_bias = lin["linear_qkv"][1] if facts.qkv_bias else 0
    qk_norm = 2 * facts.head_dim if facts.qk_norm else 0
    base = _weights(attention) + qkv_bias + qk_norm + 2 * norm
    if not moe:
        return LayerParams(base + _weights(mlp), 0, _adapters(lin, lora_r, targets))
    expert = _mlp_linears(facts, facts.moe_ffn_hidden_size, tp)
    shared = _mlp_linears(facts, facts.shared_expert_size, tp) if facts.shared_expert_size else {}
    router, shared_gate = facts.num_experts * facts.hidden_size, facts.hidden_size if shared else 0
    local = facts.num_experts // ep
    return LayerParams(base + router + _weights(shared) + shared_gate, local * _weights(expert),
                       _adapters(attention, lora_r, targets) + _adapters(shared, lora_r, targets),
                       local * _adapters(expert, lora_r, targets))


def _activation_bytes(facts, s: int, b: int, tp: int, cp: int, sp: bool, recompute: str, moe: bool = False) -> float:
    """One layer, one micro-batch, 16-bit activations (Korthikanti et al. 2022, whose MLP is 4h wide).

    Their dense MLP keeps 19*s*b*h bytes: its input 2sbh (whole on every TP rank without SP), the fc1 output and
    the activation's output 16sbh (/TP) and the dropout mask sbh. An MoE layer (dropless, routing balanced over the
    EP ranks) keeps instead, per routed copy of a token (top-k of them): the expert's input 2sbh (whole on each TP
    rank even with SP: the dispatcher gathers the sequence for the experts) and the intermediates 16sbh scaled from
    4h to the expert's MLP size F_e, i.e. 4*F_e*s*b bytes (/TP); the shared expert (F_s) like a dense MLP of its
    size; the router's logits and probabilities, 2 x 2 bytes x E per token (/TP with SP); the dropout mask as
    before. With h = hidden, a = heads, k = top-k, E = experts, r = 1/TP with SP else 1:
        MoE MLP = s*b*(k*(2h + 4*F_e/TP) + [F_s: 2h*r + 4*F_s/TP] + 4*E*r + h*r)
    """
    h, a = facts.hidden_size, facts.num_heads
    s_local = s / cp
    sbh = s_local * b * h
    if recompute == "full":
        return 2 * sbh / (tp if sp else 1)
    attn_scores = 0 if recompute == "selective" else 5 * a * s_local / h
    if sp:
        layer = sbh * (34 + attn_scores) / tp
    else:
        layer = sbh * (10 + 24 / tp + attn_scores / tp)
    if not moe:
        return layer
    r = 1 / tp if sp else 1
    dense_mlp = sbh * (2 * r + 16 / tp)  # the dropout mask h*r stays
    routed = facts.moe_topk * s_local * b * (2 * h + 4 * facts.moe_ffn_hidden_size / tp)
    shared = s_local * b * (2 * h * r + 4 * facts.shared_expert_size / tp) if facts.shared_expert_size else 0
    router = 4 * s_local * b * facts.num_experts * r
    return layer - dense_mlp + routed + shared + router


def recompute_of(extra_args: dict) -> str:
    granularity = (extra_args or {}).get("recompute_granularity")
    return granularity if granularity in ("full", "selective") else "none"


def stage_estimates(cfg, facts, tp: int, pp: int, cp: int, dp: int, num_microbatches: int, padded_vocab: int,
                    layers_per_stage: list[int], precision: str, ep: int = 1) -> list[Estimate]:
    """The estimate on each pipeline stage."""
    h, s, b = facts.hidden_size, cfg.seq_len, cfg.micro_batch_size
    lora = cfg.finetuning_type == "lora"
    pbytes = 4 if precision == "fp32" else 2
    opt_bytes = 8 if precision == "fp32" else 12
    # The distributed optimizer shards each parameter's state over the ranks that all-reduce its gradient:
    # DP x CP for the dense ones, the expert DP ranks (DP x CP / EP) for the routed experts (megatron-core).
    shards = dp * cp if cfg.use_distributed_optimizer else 1
    expert_shards = max(1, dp * cp // ep) if cfg.use_distributed_optimizer else 1
    recompute = recompute_of(cfg.extra_args)
    lora_r, targets = (cfg.lora_r, cfg.lora_target_modules) if lora else (0, ())
    kinds = {moe: layer_parameters(facts, tp, ep, moe, lora_r, targets) for moe in (False, True)}
    embedding = padded_vocab * h // tp
    norm = h * (2 if facts.family.norm == "LayerNorm" else 1)
    act = {(k, moe): _activation_bytes(facts, s, b, tp, cp, cfg.sequence_parallel, k, moe) * pbytes / 2
           for k in ("none", "selective", "full") for moe in (False, True)}
    stages = []
    for stage, layers in enumerate(layers_per_stage):
        first, last = stage == 0, stage == pp - 1
        start = sum(layers_per_stage[:stage])
        moe = [i in facts.moe_layers for i in range(start, start + layers)]
        held = [kinds[m] for m in moe]
        dense = sum(p.dense for p in held) + (embedding if first else 0)
        if last:
            # The output layer: its own weights unless tied (and with PP the last stage keeps a tied copy).
            dense += norm + (embedding if not facts.tie_word_embeddings or pp > 1 else 0)
        experts = sum(p.experts for p in held)
        dense_lora, experts_lora = sum(p.dense_lora for p in held), sum(p.experts_lora for p in held)
        params = dense + experts + dense_lora + experts_lora
        trainable_dense, trainable_experts = (dense_lora, experts_lora) if lora else (dense, experts)
        trainable = trainable_dense + trainable_experts
        in_flight = min(pp - stage, num_microbatches)
        per_layer = {k: sum(act[k, m] for m in moe) for k in ("none", "selective", "full")}
        # Full recompute keeps each layer's input; the backward recomputes one layer at a time in full.
        full = per_layer["full"] + max((act["none", m] for m in moe), default=0)
        chosen = full if recompute == "full" else per_layer[recompute]
        logits = 4 * s * b * padded_vocab // (tp * cp) if last else 0
        weights, grads = params * pbytes, trainable * 4
        optimizer = trainable_dense * opt_bytes // shards + trainable_experts * opt_bytes // expert_shards
        peak = weights + grads + optimizer + int(chosen) * in_flight + logits
        stages.append(Estimate(stage, params, trainable, weights, grads, optimizer, int(chosen),
                               int(per_layer["none"]), int(full), in_flight, logits, peak, recompute, precision,
                               experts + experts_lora))
    return stages


def estimate(*args, **kw) -> Estimate:
    """stage_estimates' stage with the highest peak (the first of equal ones)."""
    return max(stage_estimates(*args, **kw), key=lambda e: e.peak)


KNOBS = {
    "weights": "raise tensor_model_parallel_size or pipeline_model_parallel_size (or finetuning_type: lora)",
    "gradients": "raise tensor_model_parallel_size or pipeline_model_parallel_size",
    "optimizer": "set use_distributed_optimizer: true (divides it by DP), or raise tensor_model_parallel_size / "
                 "pipeline_model_parallel_size",
    "activations": "full recompute (extra_args: {recompute_granularity: full, recompute_method: uniform, "
                   "recompute_num_layers: 1}), a lower micro_batch_size, sequence_parallel: true, or a larger "
                   "context_parallel_size",
}


def over_memory_warning(e: Estimate, device_bytes: int | None, source: str) -> str | None:
    """The warning when the estimate exceeds the device memory (estimates are estimates: never a refusal)."""
    if device_bytes is None or e.peak <= device_bytes:
        return None
    term = e.largest
    return (f"memory estimate {gib(e.peak)} per device (pipeline stage {e.stage}) exceeds the device's "
            f"{gib(device_bytes)} ({source}); the largest term is {term} ({gib(e.terms[term])}); to cut it: "
            f"{KNOBS[term]}")


def gib(n: int) -> str:
    """Bytes for a person: GiB, MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def summary_line(e: Estimate, device_bytes: int | None, source: str | None) -> str:
    dev = f" of {gib(device_bytes)} ({source})" if device_bytes is not None else " (device memory unknown: set " \
                                                                                 "device_memory_gb)"
    full = "" if e.recompute == "full" else f", {gib(e.activations_full_recompute)} with full recompute"
    return (f"peak {gib(e.peak)}{dev} on pipeline stage {e.stage}: weights {gib(e.weights)}, gradients "
            f"{gib(e.gradients)}, optimizer {gib(e.optimizer)}, activations {gib(e.activations)} per micro-batch "
            f"x {e.micro_batches_in_flight} in flight (recompute {e.recompute}{full}), logits {gib(e.logits)}; "
            f"{e.parameters:,} parameters ({e.trainable_parameters:,} trainable), {e.precision}")


def device_memory(cfg, device_kind: str) -> tuple[int | None, str | None]:
    """(bytes per device, where that came from): device_memory_gb, else the device itself (npu / cuda)."""
    if cfg.device_memory_gb is not None:
        return int(cfg.device_memory_gb * GIB), "device_memory_gb"
    try:
        if device_kind == "npu":
            import torch
            import torch_npu  # noqa: F401  (imported only where the device is one: plan stays fast elsewhere)

            return int(torch.npu.get_device_properties(0).total_memory), "torch_npu"
        if device_kind == "cuda":
            import torch

            return int(torch.cuda.get_device_properties(0).total_memory), "torch.cuda"
    except Exception:  # no driver here (plan on a login node): unknown, like the CPU's
        pass
    return None, None


def _shape(arch: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int, tied: bool = False,
           **more) -> dict:
    """A partial config.json: the keys facts_from_config reads, by their config.json names in `more`."""
    return {"architectures": [arch], "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": ffn, "vocab_size": vocab,
            "tie_word_embeddings": tied, **more}


_QWEN2, _LLAMA, _QWEN3, _GLM = "Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "GlmForCausalLM"
# The shapes of the public models the shipped configs name (their config.json), for a plan made where the model
# files are not (a login node, a laptop).
KNOWN_MODELS = {
    "qwen2-0.5b": _shape(_QWEN2, 896, 24, 14, 2, 4864, 151936, tied=True),
    "qwen2-1.5b": _shape(_QWEN2, 1536, 28, 12, 2, 8960, 151936, tied=True),
    "qwen2-7b": _shape(_QWEN2, 3584, 28, 28, 4, 18944, 152064),
    "qwen2-72b": _shape(_QWEN2, 8192, 80, 64, 8, 29568, 152064),
    "qwen2.5-0.5b": _shape(_QWEN2, 896, 24, 14, 2, 4864, 151936, tied=True),
    "qwen2.5-1.5b": _shape(_QWEN2, 1536, 28, 12, 2, 8960, 151936, tied=True),
    "qwen2.5-3b": _shape(_QWEN2, 2048, 36, 16, 2, 11008, 151936, tied=True),
    "qwen2.5-7b": _shape(_QWEN2, 3584, 28, 28, 4, 18944, 152064),
    "qwen2.5-14b": _shape(_QWEN2, 5120, 48, 40, 8, 13824, 152064),
    "qwen2.5-32b": _shape(_QWEN2, 5120, 64, 40, 8, 27648, 152064),
    "qwen2.5-72b": _shape(_QWEN2, 8192, 80, 64, 8, 29568, 152064),
    "llama3.1-8b": _shape(_LLAMA, 4096, 32, 32, 8, 14336, 128256),
    "llama3.1-70b": _shape(_LLAMA, 8192, 80, 64, 8, 28672, 128256),
    "llama3.2-1b": _shape(_LLAMA, 2048, 16, 32, 8, 8192, 128256, tied=True, head_dim=64),
    "llama3.2-3b": _shape(_LLAMA, 3072, 28, 24, 8, 8192, 128256, tied=True, head_dim=128),
    "qwen3-8b": _shape(_QWEN3, 4096, 36, 32, 8, 12288, 151936, head_dim=128),
    "qwen3-14b": _shape(_QWEN3, 5120, 40, 40, 8, 17408, 151936, head_dim=128),
    "qwen3-32b": _shape(_QWEN3, 5120, 64, 64, 8, 25600, 151936, head_dim=128),
    # GLM: the original checkpoints' shapes (padded_vocab_size, multi_query_group_num, kv_channels)
    "glm4-9b": _shape(_GLM, 4096, 40, 32, 2, 13696, 151552, head_dim=128),
    "chatglm3-6b": _shape(_GLM, 4096, 28, 32, 2, 13696, 65024, head_dim=128),
    # Mixture-of-Experts: every layer MoE (no mlp_only_layers, decoder_sparse_step 1)
    "qwen3-30b-a3b": _shape("Qwen3MoeForCausalLM", 2048, 48, 32, 4, 6144, 151936, head_dim=128, num_experts=128,
                            num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "qwen3-235b-a22b": _shape("Qwen3MoeForCausalLM", 4096, 94, 64, 4, 12288, 151936, head_dim=128,
                              num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
                              norm_topk_prob=True),
    "mixtral-8x7b": _shape("MixtralForCausalLM", 4096, 32, 32, 8, 14336, 32000, num_local_experts=8,
                           num_experts_per_tok=2, rope_theta=1e6),
    "qwen2-57b-a14b": _shape("Qwen2MoeForCausalLM", 3584, 28, 28, 4, 18944, 151936, num_experts=64,
                             num_experts_per_tok=8, moe_intermediate_size=2560,
                             shared_expert_intermediate_size=20480),
}


def model_facts(cfg, model_name: str):
    """(facts, where from): the model's config.json, else the known shape of the model block's name.
    UserError when neither is there."""
    from ascendfactory.errors import UserError
    from ascendfactory.modelinfo import facts_from_config, read_model_facts

    try:
        return read_model_facts(cfg.model_name_or_path), "config.json"
    except UserError:
        known = KNOWN_MODELS.get(model_name.lower())
        if known is None:
            raise
    return facts_from_config(known, model_name), f"the public {model_name} shape (config.json not readable here)"


def for_run(cfg, layout, model_name: str) -> tuple[Estimate | None, str]:
    """The estimate for a planned run and where the model's shape came from (None when TP x PP x CP does not
    divide the world, or EP does not divide DP x CP or the experts: a rule reports it). UserError when the model's
    shape is not known."""
    from ascendfactory.layout import padded_vocab_size, parse_layer_list, stage_layers

    facts, source = model_facts(cfg, model_name)
    if layout.dp is None or layout.expert_dp is None or facts.num_experts % cfg.ep:
        return None, source
    layers = stage_layers(facts.num_layers, cfg.pp, parse_layer_list(cfg.num_layer_list),
                          keys=("num_layer_list", "pipeline_model_parallel_size"))
    # `or 1`: the trainer's padding (TP ranks need equal vocabulary slices)
    vocab = padded_vocab_size(facts.vocab_size, cfg.tp, cfg.make_vocab_size_divisible_by or 1)
    precision = default_precision(layout.device) if cfg.precision == "auto" else cfg.precision
    return estimate(cfg, facts, cfg.tp, cfg.pp, cfg.cp, layout.dp, layout.num_microbatches or 1, vocab, layers,
                    precision, cfg.ep), source
