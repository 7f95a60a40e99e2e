"""Core attention for the local layer spec on torch's scaled_dot_product_attention (SDPA).

megatron-core's local DotProductAttention computes baddbmm + masked softmax + bmm and materialises the
[b, heads, s, s] probabilities and GQA-repeated K/V; SDPA runs torch's fused kernel of the device (flash /
memory-efficient on CPU and CUDA) with GQA groups read in place. Same forward contract, no parameters, so
checkpoints are unchanged. Anything the fast path does not cover goes to the original class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# SDPA reads GQA groups in place from torch 2.5 (`enable_gqa`); older torch (Ascend images) gets K/V repeated.
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class SDPAttention(DotProductAttention):
    """DotProductAttention with its forward on SDPA: query [sq, b, np, hn], key/value [sk, b, ng, hn]
    (this TP rank's heads), attention_mask boolean with True = masked out (or None: causal from the
    layer's attn_mask_type) -> [sq, b, np * hn].

    One difference, on rows where every key is masked: megatron's -10000 fill averages all values,
    SDPA returns zeros. Neither is meaningful and the trainer's masks never produce such a row (every
    token sees itself)."""

    def _unsupported(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        return (attention_bias is not None
                or packed_seq_params is not None
                or self.softmax_offset is not None  # off-by-one / learnable softmax
                or self.scale_mask_softmax.window_size is not None
                or self.config.apply_query_key_layer_scaling
                or (attention_mask is not None and attention_mask.dtype != torch.bool)
                or (attention_mask is None and self.attn_mask_type == AttnMaskType.causal
                    and query.size(0) > 1 and query.size(0) != key.size(0)))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self._unsupported(query, key, attention_mask, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        # Like the original, the layer's mask type decides (the forward argument is ignored) and a given
        # mask is used as is; a single query (KV cache) needs no causal mask.
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal and query.size(0) > 1
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        p = self.attention_dropout.p if self.training else 0.0
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        gqa = {}
        if k.size(1) != q.size(1):
            if SDPA_GQA:
                gqa = {"enable_gqa": True}
            else:
                k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                  scale=self.softmax_scale, **gqa)

        # Dropout draws from megatron's tracker stream, as the original does, so TP ranks and
        # recomputation see reproducible masks; with no dropout nothing is drawn and the fork is skipped.
        if p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
