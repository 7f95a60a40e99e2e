"""torchrun worker of test_engine_attention.py: SDPAttention against megatron-core's DotProductAttention
at TP1 and TP2 (this rank's heads), written as JSON to argv[1] by rank 0.

Runs in its own processes because device.setup("cpu") patches torch for the life of the process.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

S, B, HEADS, GROUPS, HN = 32, 3, 4, 2, 16


def _config(tp: int, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = {"num_layers": 1, "hidden_size": HEADS * HN, "num_attention_heads": HEADS, "num_query_groups": GROUPS,
            "kv_channels": HN, "tensor_model_parallel_size": tp, "attention_dropout": 0.0,
            "masked_softmax_fusion": False, "use_cpu_initialization": True}
    return TransformerConfig(**{**base, **kw})


def _pair(tp: int, **kw):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ascendfactory.engine.attention import SDPAttention

    cfg = _config(tp, **kw)
    return tuple(cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
                 for cls in (DotProductAttention, SDPAttention))


def _inputs(tp: int, seed: int = 0):
    """q [s, b, np, hn], k/v [s, b, ng, hn]: this TP rank's slice of the full heads."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(seed)
    r = ps.get_tensor_model_parallel_rank()
    q = torch.randn(S, B, HEADS, HN, generator=g).chunk(tp, dim=2)[r]
    k = torch.randn(S, B, GROUPS, HN, generator=g).chunk(tp, dim=2)[r]
    v = torch.randn(S, B, GROUPS, HN, generator=g).chunk(tp, dim=2)[r]
    return [t.contiguous().requires_grad_() for t in (q, k, v)]


def packed_mask() -> torch.Tensor:
    """[b, 1, s, s] True = masked: packed bins of 3, 2 and 1 samples (and padding) as SFTData builds them,
    padded by the trainer's collate() to S."""
    from ascendfactory.engine.data import collate

    samples = []
    for seg in ([1] * 10 + [2] * 12 + [3] * 6, [1] * 20 + [2] * 4 + [0] * 4, [1] * 28):
        seg = torch.tensor(seg)
        same = seg[:, None] == seg[None, :]
        n = len(seg)
        samples.append({"tokens": torch.zeros(n, dtype=torch.long), "labels": torch.zeros(n, dtype=torch.long),
                        "loss_mask": torch.ones(n), "position_ids": torch.arange(n),
                        "attention_mask": ~(same & torch.ones_like(same).tril()).unsqueeze(0)})
    return collate(samples, pad_to=S)["attention_mask"]


def _max_diff(ref_mod, new_mod, tp: int, mask) -> dict:
    """Max abs difference of the outputs and of the q/k/v gradients (same upstream gradient)."""
    outs, grads = [], []
    for mod in (ref_mod, new_mod):
        q, k, v = _inputs(tp)
        out = mod(q, k, v, mask)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    return {"shape": list(outs[1].shape),
            "out": (outs[0] - outs[1]).abs().max().item(),
            "grad": max((a - b).abs().max().item() for a, b in zip(*grads))}


def checks(tp: int) -> dict:
    from megatron.core import tensor_parallel

    from ascendfactory.engine import attention

    res = {}
    ref, new = _pair(tp)
    res["causal"] = _max_diff(ref, new, tp, None)
    res["packed"] = _max_diff(ref, new, tp, packed_mask())
    attention.SDPA_GQA = False  # the path of torch < 2.5: K/V groups repeated
    res["packed_repeated_kv"] = _max_diff(ref, new, tp, packed_mask())
    attention.SDPA_GQA = True
    # a mask only the original class handles (off-by-one softmax) must be computed by it
    ref1, new1 = _pair(tp, softmax_type="off-by-one")
    res["fallback"] = _max_diff(ref1, new1, tp, None)
    q, k, v = _inputs(tp)
    res["off_by_one_vs_vanilla"] = (new1(q, k, v, None) - new(q, k, v, None)).abs().max().item()

    # dropout: drawn in megatron's tracker stream (reproducible from its seed, default RNG untouched)
    _, drop = _pair(tp, attention_dropout=0.2)
    drop.train()
    runs = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        before = torch.get_rng_state()
        runs.append(drop(q, k, v, None).detach())
        res["default_rng_untouched"] = torch.equal(before, torch.get_rng_state())
    res["dropout_repeatable"] = torch.equal(runs[0], runs[1])
    res["dropout_changes_output"] = (runs[0] - new(q, k, v, None)).abs().max().item()
    drop.eval()
    res["dropout_eval_diff"] = (drop(q, k, v, None) - new(q, k, v, None)).abs().max().item()
    return res


def state_dict_keys_match() -> bool:
    """Our GPTModel (SDPA spec) holds exactly the keys and shapes of megatron-core's local spec GPTModel."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from ascendfactory.engine.model import Parallel, build_gpt_model, transformer_config
    from ascendfactory.modelinfo import ModelFacts

    facts = ModelFacts("Qwen3ForCausalLM", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, ffn_hidden_size=128, vocab_size=100, max_position_embeddings=64,
                       rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False, qkv_bias=True, qk_norm=True)
    cfg = transformer_config(facts, Parallel(), "fp32")
    ours = build_gpt_model(facts, cfg).state_dict()
    stock = GPTModel(cfg, get_gpt_layer_local_spec(qk_layernorm=True), vocab_size=100, max_sequence_length=64,
                     position_embedding_type="rope").state_dict()
    return _shapes(ours) == _shapes(stock)


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("_extra_state")}


def main(out: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from ascendfactory.engine import device

    device.setup("cpu")
    dist.init_process_group("gloo")
    results = {}
    try:
        for tp in (1, 2):
            ps.initialize_model_parallel(tp)
            tensor_parallel.model_parallel_cuda_manual_seed(1234)
            results[f"tp{tp}"] = checks(tp)
            if tp == 1:
                results["state_dict_keys_match"] = state_dict_keys_match()
            ps.destroy_model_parallel()
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
