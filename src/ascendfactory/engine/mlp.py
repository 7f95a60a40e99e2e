"""SwiGLU MLP for the local layer spec without megatron-core's per-step copies.

megatron-core's unfused gated MLP computes `silu(x_glu) * (x_linear + glu_linear_offset)` on the two
chunks of linear_fc1's output: the `+ 0.0` is a full-size add, and autograd joins the two chunk
gradients with a cat. SwiGLU below writes both gradient halves straight into one buffer with the same
kernels (silu, mul, silu_backward), so values and gradients are bit-identical. Same parameters, so
checkpoints are unchanged; anything the fast path does not cover goes to the original class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class SwiGLU(torch.autograd.Function):
    """silu(a) * b for x = [a | b] on the last dimension."""

    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=-1)
        silu_a = F.silu(a)
        ctx.save_for_backward(x, silu_a)
        return silu_a * b

    @staticmethod
    def backward(ctx, grad_out):
        x, silu_a = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        grad = torch.empty_like(x)
        grad_a, grad_b = grad.chunk(2, dim=-1)
        torch.mul(grad_out, silu_a, out=grad_b)
        torch.ops.aten.silu_backward.grad_input(grad_out * b, a, grad_input=grad_a)
        return grad


class SwiGLUMLP(MLP):
    """megatron-core's MLP with the gated silu activation on SwiGLU; same forward contract."""

    def _fast(self, per_token_scale) -> bool:
        c = self.config
        return (c.gated_linear_unit and self.activation_func is F.silu and per_token_scale is None
                and not getattr(c, "use_te_activation_func", False) and not c.bias_activation_fusion
                and getattr(c, "activation_func_clamp_value", None) is None
                and getattr(c, "glu_linear_offset", 0.0) == 0.0)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._fast(per_token_scale):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(SwiGLU.apply(intermediate))
