"""RMSNorm and rotary embeddings against the plain expressions they replace.

The forwards are the same arithmetic, so outputs must match bitwise. RMSNorm's own
backward is checked against autograd through the plain expression in fp64: fp32 rounding
only, rtol 1e-5 and atol 1e-6 for gradients of order 1.
"""

from __future__ import annotations

import pytest
import torch

from olmoe.model.layers import RMSNorm, apply_rotary, rotary_cos_sin


def plain_rms_norm(x, weight, eps):
    """The textbook expression: fp32 statistics, weight applied in the input dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def plain_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_rms_norm_forward_is_the_plain_expression():
    torch.manual_seed(0)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 48) * torch.rand(3, 5, 1) * 10
    assert torch.equal(norm(x), plain_rms_norm(x, norm.weight, norm.eps))


@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 5, 32)])
def test_rms_norm_backward_matches_autograd_in_fp64(shape):
    torch.manual_seed(1)
    x = (torch.randn(shape) * 3).requires_grad_()
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.normal_()
    grad = torch.randn(shape)
    norm(x).backward(grad)

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    plain_rms_norm(x64, w64, norm.eps).backward(grad.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w64.grad.float(), rtol=1e-5, atol=1e-6)


def test_rms_norm_bf16_input_with_fp32_weight():
    # As under autocast: statistics in fp32, the result promoted by the fp32 weight.
    torch.manual_seed(2)
    x = torch.randn(6, 32).to(torch.bfloat16).requires_grad_()
    norm = RMSNorm(32)
    out = norm(x)
    want = plain_rms_norm(x.detach(), norm.weight.detach(), norm.eps)
    assert out.dtype == want.dtype == torch.float32
    assert torch.equal(out, want)
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


def test_rotary_matches_plain_rotation():
    torch.manual_seed(3)
    cos, sin = rotary_cos_sin(9, 16, 10000.0, torch.device("cpu"), torch.float32)
    # (B, heads, S, hd) from a transposed view, as attention passes it
    x = torch.randn(2, 9, 3, 16).transpose(1, 2).requires_grad_()
    grad = torch.randn(2, 3, 9, 16)
    out = apply_rotary(x, cos, sin)
    (got,) = torch.autograd.grad(out, x, grad)
    want_out = plain_rotary(x, cos, sin)
    (want,) = torch.autograd.grad(want_out, x, grad)
    assert torch.equal(out, want_out)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
