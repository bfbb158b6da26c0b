"""The fused per-expert path of the PyTorch backend against the three-step path and a loop.

Tolerance: both paths compute in fp32 with the same GEMMs per expert, but the fused path
sums a token's K expert outputs in expert order and gets the combine-weight gradient as
<dL/d(hidden), hidden> instead of <dL/dy, y>, so results agree to fp32 rounding.
With weights of std 0.3 the gradients reach ~30: rtol 1e-5, atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from olmoe.model import MoEConfig
from olmoe.moe import MoELayer, TorchBackend, register_backend
from olmoe.moe.backend import _RoutedSwiGLU
from tests.helpers import swiglu_token_loop

FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


class UnfusedBackend:
    """TorchBackend without `routed_swiglu`: the layer takes the permute/mm/unpermute path."""

    name = "torch-unfused-test"

    def __init__(self):
        torch_backend = TorchBackend()
        self.permute = torch_backend.permute
        self.grouped_mm = torch_backend.grouped_mm
        self.unpermute = torch_backend.unpermute


register_backend(UnfusedBackend())


def make_layer(seed=0, d_model=24, **overrides) -> MoELayer:
    torch.manual_seed(seed)
    config = dict(num_experts=8, top_k=2, expert_hidden=20, backend="torch")
    config.update(overrides)
    layer = MoELayer(MoEConfig(**config), d_model)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return layer


def forward_backward(layer, backend, x, token_mask=None):
    layer.config.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = layer(x, token_mask)
    grad_out = torch.randn(out.hidden.shape, generator=torch.Generator().manual_seed(1))
    ((out.hidden * grad_out).sum() + out.lb_loss + out.z_loss).backward()
    grads = {"x": x.grad}
    grads.update({name: param.grad for name, param in layer.named_parameters()})
    return out, grads


CASES = {
    "dropless": dict(),
    "top-1": dict(top_k=1),
    "shared-expert": dict(shared_expert_hidden=16),
    "capacity-drops": dict(capacity_factor=0.5),
    "one-expert": dict(num_experts=1, top_k=1),
    "renormalized": dict(norm_topk_prob=True),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_fused_equals_unfused(overrides):
    layer = make_layer(**overrides)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(2))
    fused_out, fused_grads = forward_backward(layer, "torch", x)
    plain_out, plain_grads = forward_backward(layer, UnfusedBackend.name, x)

    torch.testing.assert_close(fused_out.hidden, plain_out.hidden, **FP32_TOLERANCE)
    assert torch.equal(fused_out.num_dropped, plain_out.num_dropped)
    for name, grad in plain_grads.items():
        assert fused_grads[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(fused_grads[name], grad, **FP32_TOLERANCE, msg=name)


def test_fused_with_padding_mask():
    layer = make_layer(seed=3)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(4))
    token_mask = torch.ones(2, 7, dtype=torch.bool)
    token_mask[0, 4:] = False
    token_mask[1, :2] = False
    fused_out, fused_grads = forward_backward(layer, "torch", x, token_mask)
    plain_out, plain_grads = forward_backward(layer, UnfusedBackend.name, x, token_mask)

    torch.testing.assert_close(fused_out.hidden, plain_out.hidden, **FP32_TOLERANCE)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **FP32_TOLERANCE, msg=name)


def test_fused_empty_experts_zero_gradient():
    # 15 tokens make 30 assignments, so at least 2 of the 32 experts get no rows.
    layer = make_layer(seed=5, num_experts=32)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(6))
    fused_out, fused_grads = forward_backward(layer, "torch", x)
    empty = fused_out.tokens_per_expert == 0
    assert empty.any(), "the case needs at least one empty expert"
    assert torch.count_nonzero(fused_grads["experts.gate_up_weight"][empty]) == 0
    assert torch.count_nonzero(fused_grads["experts.down_weight"][empty]) == 0
    plain_out, plain_grads = forward_backward(layer, UnfusedBackend.name, x)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **FP32_TOLERANCE, msg=name)


def test_routed_swiglu_matches_token_loop():
    torch.manual_seed(7)
    T, K, E, D, H = 11, 3, 5, 6, 4
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E)
    combine_weights = torch.softmax(logits, -1).topk(K).values.requires_grad_()
    expert_indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    gate_up_weight = torch.randn(E, D, 2 * H, requires_grad=True)
    down_weight = torch.randn(E, H, D, requires_grad=True)
    flat = expert_indices.reshape(-1)
    row_ids = torch.sort(flat, stable=True).indices
    group_sizes = torch.bincount(flat, minlength=E)

    inputs = [x, combine_weights, gate_up_weight, down_weight]
    out = _RoutedSwiGLU.apply(x, combine_weights, gate_up_weight, down_weight, row_ids, group_sizes)
    ref = swiglu_token_loop(x, combine_weights, expert_indices, gate_up_weight, down_weight)
    torch.testing.assert_close(out, ref, **FP32_TOLERANCE)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, grad)
    expected = torch.autograd.grad(ref, inputs, grad)
    names = ["x", "combine_weights", "gate_up_weight", "down_weight"]
    for name, g, r in zip(names, got, expected):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4, msg=name)


def test_routed_swiglu_weight_grads_only():
    # Gradients for the weights alone (x and the combine weights frozen) match.
    torch.manual_seed(8)
    T, K, E, D, H = 9, 2, 4, 6, 5
    x = torch.randn(T, D)
    combine_weights = torch.rand(T, K)
    expert_indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    gate_up_weight = torch.randn(E, D, 2 * H, requires_grad=True)
    down_weight = torch.randn(E, H, D, requires_grad=True)
    flat = expert_indices.reshape(-1)
    row_ids = torch.sort(flat, stable=True).indices
    group_sizes = torch.bincount(flat, minlength=E)
    out = _RoutedSwiGLU.apply(x, combine_weights, gate_up_weight, down_weight, row_ids, group_sizes)
    ref = swiglu_token_loop(x, combine_weights, expert_indices, gate_up_weight, down_weight)
    got = torch.autograd.grad(out.sum(), [gate_up_weight, down_weight])
    expected = torch.autograd.grad(ref.sum(), [gate_up_weight, down_weight])
    for g, r in zip(got, expected):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


def test_fused_path_skipped_for_replaced_experts():
    layer = make_layer()
    backend = TorchBackend()
    x = torch.randn(4, 24)
    assert layer._can_fuse(backend, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._can_fuse(backend, x)
    layer.experts = torch.nn.Identity()
    assert not layer._can_fuse(backend, x)
