"""Core attention for the local layer spec on torch's scaled_dot_product_attention (SDPA).

megatron-core's local DotProductAttention computes baddbmm + masked softmax + bmm and materialises the
[b, heads, s, s] probabilities and GQA-repeated K/V; SDPA runs torch's fused kernel of the device (flash /
memory-efficient on CPU and CUDA) with GQA groups read in place. Same forward contract, no parameters, so
checkpoints are unchanged. Anything the fast path does not cover goes to the original class.

Context parallelism (megatron-core implements it only in Transformer Engine's attention): each CP rank
holds chunks r and 2*CP-1-r of the sequence cut into 2*CP chunks (megatron's load-balanced split); K and
V are all-gathered over the CP group (gradients reduce-scattered back) and put in sequence order, and the
local queries attend to them under the mask of their global positions. K/V memory grows to the whole
sequence; the activations, the MLP and the [s, s] scores stay split.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# SDPA reads GQA groups in place from torch 2.5 (`enable_gqa`); older torch (Ascend images) gets K/V repeated.
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def cp_chunk_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Global positions of the tokens a CP rank holds: chunks r and 2*cp-1-r of 2*cp."""
    chunk = seq_len // (2 * cp)
    starts = (cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk)
    return torch.cat([torch.arange(s, s + chunk) for s in starts])


@functools.lru_cache(maxsize=4)
def _gathered_order(cp: int, device: str) -> torch.Tensor:
    """Index into the gathered chunks [rank 0's two, rank 1's two, ...] of each chunk in sequence order."""
    return torch.tensor([2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)], device=device)


@functools.lru_cache(maxsize=4)
def _cp_causal_mask(seq_len: int, cp: int, cp_rank: int, device: str) -> torch.Tensor:
    """[local queries, all keys], True = masked: causal over global positions. One tensor shared by every layer
    (and kept between steps), so autograd saves it once rather than once per layer."""
    q_pos = cp_chunk_positions(seq_len, cp, cp_rank).to(device)
    return torch.arange(seq_len, device=device)[None, :] > q_pos[:, None]


class SDPAttention(DotProductAttention):
    """DotProductAttention with its forward on SDPA: query [sq, b, np, hn], key/value [sk, b, ng, hn]
    (this TP rank's heads), attention_mask boolean with True = masked out (or None: causal from the
    layer's attn_mask_type) -> [sq, b, np * hn]. Under CP a given mask has this rank's query rows and
    all key columns (megatron's get_batch_on_this_cp_rank).

    One difference, on rows where every key is masked: megatron's -10000 fill averages all values,
    SDPA returns zeros. Neither is meaningful and the trainer's masks never produce such a row (every
    token sees itself)."""

    def __init__(self, config, *args, **kwargs):
        # The parent refuses CP (see the module docstring); this class implements it.
        cp, config.context_parallel_size = config.context_parallel_size, 1
        try:
            super().__init__(config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp
        self.cp_group = parallel_state.get_context_parallel_group() if cp > 1 else None

    def _unsupported(self, query, key, attention_mask, attention_bias, packed_seq_params) -> bool:
        return (attention_bias is not None
                or packed_seq_params is not None
                or self.softmax_offset is not None  # off-by-one / learnable softmax
                or self.scale_mask_softmax.window_size is not None
                or self.config.apply_query_key_layer_scaling
                or (attention_mask is not None and attention_mask.dtype != torch.bool)
                or (attention_mask is None and self.attn_mask_type == AttnMaskType.causal
                    and query.size(0) > 1 and query.size(0) != key.size(0)))

    def _whole_sequence(self, key, value, attention_mask):
        """CP: K/V of the whole sequence in order, and the mask of this rank's queries against it."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        order = _gathered_order(cp, str(key.device))
        key, value = (gather_from_sequence_parallel_region(t, True, self.cp_group) for t in (key, value))
        key, value = (t.view(2 * cp, -1, *t.shape[1:]).index_select(0, order).flatten(0, 1) for t in (key, value))
        if attention_mask is None:
            attention_mask = _cp_causal_mask(key.size(0), cp, rank, str(key.device))
        return key, value, attention_mask

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self._unsupported(query, key, attention_mask, attention_bias, packed_seq_params):
            if self.cp_group is not None:
                raise NotImplementedError("context parallelism supports causal or boolean-mask attention only")
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if self.cp_group is not None:
            key, value, attention_mask = self._whole_sequence(key, value, attention_mask)
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
