"""The decode step's fused helpers compute what the unfused reference computes.

``RMSNorm.add_norm`` (residual add and norm in one call, the add in place) and
``silu_and_mul`` (SwiGLU's activation on the merged gate/up output, the product written over
the SiLU's output) must give the reference's values bit for bit: the fp32 path is held to
transformers token for token, and these run in every layer of every step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models.layers import RMSNorm, silu_and_mul

DTYPES = [torch.float32, torch.bfloat16]


def reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers writes it: fp32 statistics, scaled in x's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def norm_of(dtype: torch.dtype, size: int = 576) -> RMSNorm:
    norm = RMSNorm(size, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(size) + 0.5)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8])
def test_add_norm_equals_the_sum_then_the_norm(dtype, rows):
    torch.manual_seed(rows)
    norm = norm_of(dtype)
    x, residual = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    want_sum = residual + x
    want = norm(want_sum)
    got, got_sum = norm.add_norm(x, residual)
    assert got_sum is residual  # added in place
    assert torch.equal(got_sum, want_sum)
    assert torch.equal(got, want)
    assert got.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_norm_of_the_first_layer_takes_x_as_the_stream(dtype):
    torch.manual_seed(1)
    norm = norm_of(dtype)
    x = torch.randn(3, 576).to(dtype)
    got, stream = norm.add_norm(x, None)
    assert stream is x
    assert torch.equal(got, norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_follows_the_reference_order(dtype):
    torch.manual_seed(2)
    norm = norm_of(dtype)
    x = (torch.randn(4, 576) * 3).to(dtype)
    want = reference_norm(x, norm.weight.detach(), norm.eps)
    # The fused kernel: the same formula in its own summation order (rounding apart).
    torch.testing.assert_close(norm(x), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8])
def test_silu_and_mul_equals_silu_of_gate_times_up(dtype, rows):
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536).to(dtype) * 4
    gate, up = gate_up.split(1536, dim=-1)
    want = F.silu(gate) * up
    got = silu_and_mul(gate_up, 1536)
    assert torch.equal(got, want)
    assert got.is_contiguous() and got.shape == (rows, 1536)
    assert torch.equal(gate_up[:, :1536], gate)  # the merged output is left alone
