"""engine/mlp.py: the SwiGLU activation gives bit-identical values and input gradients to megatron-core's
unfused gated path (silu(chunk 0) * chunk 1 under autograd). The model built with it is checked against HF
logits in test_convert_logits.py and trained in test_engine_train.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ascendfactory.engine.mlp import SwiGLU


@pytest.mark.parametrize("shape", [(16, 3, 2 * 40), (7, 2 * 5)])
def test_swiglu_bit_identical_to_autograd(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    out = SwiGLU.apply(x)
    a, b = ref_x.chunk(2, dim=-1)
    ref = F.silu(a) * b
    grad_out = torch.randn(ref.shape, generator=g)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert torch.equal(out, ref)
    assert torch.equal(x.grad, ref_x.grad)

