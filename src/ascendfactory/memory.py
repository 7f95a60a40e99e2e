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

    @property
    def terms(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations * self.micro_batches_in_flight + self.logits}

    @property
    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)

    def as_json(self) -> dict:
        return {**asdict(self), "largest": self.largest}


def _linears(facts, tp: int) -> dict[str, tuple[int, int]]:
    """(input, output) features of each linear of a layer on one TP rank, megatron-core's names."""
    h, d = facts.hidden_size, facts.head_dim
    qkv = (facts.num_heads + 2 * facts.num_kv_heads) * d
    fc1 = facts.ffn_hidden_size * (2 if facts.family.mlp == "swiglu" else 1)  # gated: gate and up fused
    return {"linear_qkv": (h, qkv // tp), "linear_proj": (facts.num_heads * d // tp, h),
            "linear_fc1": (h, fc1 // tp), "linear_fc2": (facts.ffn_hidden_size // tp, h)}


def expert_parameters(facts, tp: int, ep: int) -> int:
    """The routed experts' and router's parameters of one layer on a rank (MoE divides experts over EP).
    Dense families have none; the MoE families count theirs here."""
    return 0


def layer_parameters(facts, tp: int, ep: int = 1) -> int:
    lin = _linears(facts, tp)
    norm = facts.hidden_size * (2 if facts.family.norm == "LayerNorm" else 1)
    weights = sum(i * o for i, o in lin.values())
    qkv_bias = lin["linear_qkv"][1] if facts.qkv_bias else 0
    qk_norm = 2 * facts.head_dim if facts.qk_norm else 0
    return weights + qkv_bias + qk_norm + 2 * norm + expert_parameters(facts, tp, ep)


def lora_parameters(facts, tp: int, r: int, targets) -> int:
    """One layer's adapters on a rank, A [r, in] and B [out, r]: a column-parallel linear splits B and keeps A
    whole, a row-parallel one the other way round (engine/lora.py), so each holds its linear's local sizes."""
    return sum(r * (i + o) for name, (i, o) in _linears(facts, tp).items() if name in targets)


def _activation_bytes(s: int, b: int, h: int, a: int, tp: int, cp: int, sp: bool, recompute: str) -> float:
    """One layer, one micro-batch, 16-bit activations."""
    s_local = s / cp
    if recompute == "full":
        return 2 * s_local * b * h / (tp if sp else 1)
    attn_scores = 0 if recompute == "selective" else 5 * a * s_local / h
    if sp:
        return s_local * b * h * (34 + attn_scores) / tp
    return s_local * b * h * (10 + 24 / tp + attn_scores / tp)


def recompute_of(extra_args: dict) -> str:
    granularity = (extra_args or {}).get("recompute_granularity")
    return granularity if granularity in ("full", "selective") else "none"


def estimate(cfg, facts, tp: int, pp: int, cp: int, dp: int, num_microbatches: int, padded_vocab: int,
             layers_per_stage: list[int], precision: str, ep: int = 1) -> Estimate:
    """The estimate on each pipeline stage; the one with the highest peak is returned."""
    h, s, b = facts.hidden_size, cfg.seq_len, cfg.micro_batch_size
    lora = cfg.finetuning_type == "lora"
    pbytes = 4 if precision == "fp32" else 2
    opt_bytes = 8 if precision == "fp32" else 12
    shards = dp * cp if cfg.use_distributed_optimizer else 1
    recompute = recompute_of(cfg.extra_args)
    per_layer = layer_parameters(facts, tp, ep)
    per_layer_lora = lora_parameters(facts, tp, cfg.lora_r, cfg.lora_target_modules) if lora else 0
    embedding = padded_vocab * h // tp
    norm = h * (2 if facts.family.norm == "LayerNorm" else 1)
    act = {k: _activation_bytes(s, b, h, facts.num_heads, tp, cp, cfg.sequence_parallel, k) * pbytes / 2
           for k in ("none", "selective", "full")}
    best = None
    for stage, layers in enumerate(layers_per_stage):
        first, last = stage == 0, stage == pp - 1
        frozen = layers * per_layer + (embedding if first else 0)
        if last:
            # The output layer: its own weights unless tied (and with PP the last stage keeps a tied copy).
            frozen += norm + (embedding if not facts.tie_word_embeddings or pp > 1 else 0)
        adapters = layers * per_layer_lora
        params = frozen + adapters
        trainable = adapters if lora else params
        in_flight = min(pp - stage, num_microbatches)
        # Full recompute keeps each layer's input; the backward recomputes one layer at a time in full.
        full = layers * act["full"] + act["none"]
        chosen = full if recompute == "full" else layers * act[recompute]
        logits = 4 * s * b * padded_vocab // (tp * cp) if last else 0
        weights, grads = params * pbytes, trainable * 4
        optimizer = trainable * opt_bytes // shards
        peak = weights + grads + optimizer + int(chosen) * in_flight + logits
        e = Estimate(stage, params, trainable, weights, grads, optimizer, int(chosen), int(layers * act["none"]),
                     int(full), in_flight, logits, peak, recompute, precision)
        if best is None or e.peak > best.peak:
            best = e
    return best


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


# The shapes of the public models the shipped configs name (their config.json), for a plan made where the model
# files are not (a login node, a laptop): architecture, hidden, layers, heads, kv heads, ffn, vocab, tied, head_dim.
KNOWN_MODELS = {
    "qwen2-0.5b": ("Qwen2ForCausalLM", 896, 24, 14, 2, 4864, 151936, True, None),
    "qwen2-1.5b": ("Qwen2ForCausalLM", 1536, 28, 12, 2, 8960, 151936, True, None),
    "qwen2-7b": ("Qwen2ForCausalLM", 3584, 28, 28, 4, 18944, 152064, False, None),
    "qwen2-72b": ("Qwen2ForCausalLM", 8192, 80, 64, 8, 29568, 152064, False, None),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", 896, 24, 14, 2, 4864, 151936, True, None),
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", 1536, 28, 12, 2, 8960, 151936, True, None),
    "qwen2.5-3b": ("Qwen2ForCausalLM", 2048, 36, 16, 2, 11008, 151936, True, None),
    "qwen2.5-7b": ("Qwen2ForCausalLM", 3584, 28, 28, 4, 18944, 152064, False, None),
    "qwen2.5-14b": ("Qwen2ForCausalLM", 5120, 48, 40, 8, 13824, 152064, False, None),
    "qwen2.5-32b": ("Qwen2ForCausalLM", 5120, 64, 40, 8, 27648, 152064, False, None),
    "qwen2.5-72b": ("Qwen2ForCausalLM", 8192, 80, 64, 8, 29568, 152064, False, None),
    "llama3.1-8b": ("LlamaForCausalLM", 4096, 32, 32, 8, 14336, 128256, False, None),
    "llama3.1-70b": ("LlamaForCausalLM", 8192, 80, 64, 8, 28672, 128256, False, None),
    "llama3.2-1b": ("LlamaForCausalLM", 2048, 16, 32, 8, 8192, 128256, True, 64),
    "llama3.2-3b": ("LlamaForCausalLM", 3072, 28, 24, 8, 8192, 128256, True, 128),
    "qwen3-8b": ("Qwen3ForCausalLM", 4096, 36, 32, 8, 12288, 151936, False, 128),
    "qwen3-14b": ("Qwen3ForCausalLM", 5120, 40, 40, 8, 17408, 151936, False, 128),
    "qwen3-32b": ("Qwen3ForCausalLM", 5120, 64, 64, 8, 25600, 151936, False, 128),
    # GLM: the original checkpoints' shapes (padded_vocab_size, multi_query_group_num, kv_channels)
    "glm4-9b": ("GlmForCausalLM", 4096, 40, 32, 2, 13696, 151552, False, 128),
    "chatglm3-6b": ("GlmForCausalLM", 4096, 28, 32, 2, 13696, 65024, False, 128),
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
    arch, h, layers, heads, kv, ffn, vocab, tied, head_dim = known
    config = {"architectures": [arch], "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab,
              "tie_word_embeddings": tied, "head_dim": head_dim}
    return facts_from_config(config, model_name), f"the public {model_name} shape (config.json not readable here)"


def for_run(cfg, layout, model_name: str) -> tuple[Estimate | None, str]:
    """The estimate for a planned run and where the model's shape came from (None when TP x PP x CP does not
    divide the world: a rule reports it). UserError when the model's shape is not known."""
    from ascendfactory.layout import padded_vocab_size, parse_layer_list, stage_layers

    facts, source = model_facts(cfg, model_name)
    if layout.dp is None:
        return None, source
    layers = stage_layers(facts.num_layers, cfg.pp, parse_layer_list(cfg.num_layer_list),
                          keys=("num_layer_list", "pipeline_model_parallel_size"))
    # `or 1`: the trainer's padding (TP ranks need equal vocabulary slices)
    vocab = padded_vocab_size(facts.vocab_size, cfg.tp, cfg.make_vocab_size_divisible_by or 1)
    precision = default_precision(layout.device) if cfg.precision == "auto" else cfg.precision
    return estimate(cfg, facts, cfg.tp, cfg.pp, cfg.cp, layout.dp, layout.num_microbatches or 1, vocab, layers,
                    precision), source
