"""The dropless MoE layer against slow references and degenerate equivalences."""

import pytest
import torch
import torch.nn.functional as F

from olmoe.model import MoEConfig
from olmoe.moe import MoELayer, TorchBackend, build_routing_plan
from olmoe.moe.backend import grouped_mm_reference


def _layer(seed=0, d_model=16, **kwargs) -> MoELayer:
    torch.manual_seed(seed)
    config = dict(num_experts=8, top_k=2, expert_hidden=12)
    config.update(kwargs)
    layer = MoELayer(MoEConfig(**config), d_model)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return layer


def _reference_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop: sum_k w_k * expert_{e_k}(x_t)."""
    route = layer.router(x)
    H = layer.experts.hidden
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(layer.top_k):
            e = route.expert_indices[t, k]
            gate_up = x[t] @ layer.experts.gate_up_weight[e]
            h = F.silu(gate_up[:H]) * gate_up[H:]
            out[t] += route.combine_weights[t, k] * (h @ layer.experts.down_weight[e])
    return out


def test_forward_matches_token_loop():
    layer = _layer()
    x = torch.randn(30, 16)
    assert torch.allclose(layer(x).hidden, _reference_forward(layer, x), atol=1e-5)


def test_one_expert_equals_dense_swiglu():
    layer = _layer(num_experts=1, top_k=1)
    H = layer.experts.hidden
    gate = layer.experts.gate_up_weight[0, :, :H].detach().clone().requires_grad_()
    up = layer.experts.gate_up_weight[0, :, H:].detach().clone().requires_grad_()
    down = layer.experts.down_weight[0].detach().clone().requires_grad_()
    x = torch.randn(2, 9, 16, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()

    out = layer(x).hidden
    dense = (F.silu(x_dense @ gate) * (x_dense @ up)) @ down
    assert torch.allclose(out, dense, atol=1e-6)

    grad = torch.randn_like(out)
    out.backward(grad)
    dense.backward(grad)
    assert torch.allclose(x.grad, x_dense.grad, atol=1e-6)
    assert torch.allclose(layer.experts.gate_up_weight.grad[0, :, :H], gate.grad, atol=1e-5)
    assert torch.allclose(layer.experts.gate_up_weight.grad[0, :, H:], up.grad, atol=1e-5)
    assert torch.allclose(layer.experts.down_weight.grad[0], down.grad, atol=1e-5)
    # One expert: softmax is constant 1, so the router gets no gradient from the output.
    assert torch.count_nonzero(layer.router.weight.grad) == 0


def test_dropless_equals_large_capacity():
    dropless = _layer(top_k=3)
    capacity = _layer(top_k=3, capacity_factor=8.0 / 3.0)
    capacity.load_state_dict(dropless.state_dict())
    x = torch.randn(40, 16, requires_grad=True)
    a = dropless(x)
    b = capacity(x)
    assert b.num_dropped.item() == 0
    assert torch.equal(a.hidden, b.hidden)
    ga = torch.autograd.grad(a.hidden.sum(), [x, *dropless.parameters()])
    gb = torch.autograd.grad(b.hidden.sum(), [x, *capacity.parameters()])
    for g1, g2 in zip(ga, gb):
        assert torch.equal(g1, g2)


def test_capacity_drops_later_tokens():
    layer = _layer(d_model=8, num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, 8))
    # Twelve tokens: 9 to expert 0, 3 to expert 1; capacity = ceil(12 * 1 / 4) = 3.
    x = torch.zeros(12, 8)
    x[:9, 0] = 5.0
    x[9:, 1] = 5.0
    out = layer(x)
    assert out.num_dropped.item() == 6
    assert out.tokens_per_expert.tolist() == [9, 3, 0, 0]
    # The first three tokens of expert 0 are kept (token order), the rest output zero.
    assert (out.hidden[:3].abs().sum(-1) > 0).all()
    assert torch.equal(out.hidden[3:9], torch.zeros(6, 8))
    assert (out.hidden[9:].abs().sum(-1) > 0).all()


def test_routing_plan_matches_reference():
    torch.manual_seed(0)
    T, K, E = 25, 3, 6
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    mask = torch.rand(T) > 0.3
    plan = build_routing_plan(indices, E, mask)
    expected = [
        t * K + k
        for e in range(E)
        for t in range(T)
        for k in range(K)
        if mask[t] and indices[t, k] == e
    ]
    assert plan.row_ids.tolist() == expected
    counts = [
        sum(1 for t in range(T) for k in range(K) if mask[t] and indices[t, k] == e)
        for e in range(E)
    ]
    assert plan.group_sizes.tolist() == counts


def _forced_layer(group_sizes):
    """A k=1 layer whose router sends exactly group_sizes[e] tokens to expert e."""
    E = len(group_sizes)
    layer = _layer(d_model=E, num_experts=E, top_k=1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
    targets = torch.repeat_interleave(torch.arange(E), torch.tensor(group_sizes))
    targets = targets[torch.randperm(targets.numel())]
    x = F.one_hot(targets, E).float() * 10 + torch.randn(targets.numel(), E) * 0.01
    return layer, x


@pytest.mark.parametrize(
    "group_sizes",
    [[5, 0, 17, 0, 0, 3, 128, 1], [0, 0, 0, 0, 0, 0, 0, 40], [0] * 8],
    ids=["skewed", "one-expert", "empty-batch"],
)
def test_empty_experts_get_zero_gradient(group_sizes):
    layer, x = _forced_layer(group_sizes)
    x.requires_grad_()
    out = layer(x)
    assert out.tokens_per_expert.tolist() == group_sizes
    out.hidden.sum().backward()
    for e, size in enumerate(group_sizes):
        gate_up_grad = layer.experts.gate_up_weight.grad[e]
        down_grad = layer.experts.down_weight.grad[e]
        if size == 0:
            assert torch.count_nonzero(gate_up_grad) == 0
            assert torch.count_nonzero(down_grad) == 0
        else:
            assert torch.isfinite(gate_up_grad).all()
            assert gate_up_grad.abs().sum() > 0
    assert torch.isfinite(layer.router.weight.grad).all()


def test_empty_batch_forward_backward():
    layer = _layer()
    x = torch.zeros(0, 16, requires_grad=True)
    out = layer(x)
    assert out.hidden.shape == (0, 16)
    (out.hidden.sum() + out.lb_loss + out.z_loss).backward()
    assert torch.count_nonzero(layer.experts.gate_up_weight.grad) == 0


def test_torch_grouped_mm_matches_reference():
    torch.manual_seed(0)
    sizes = torch.tensor([5, 0, 17, 0, 0, 3, 128, 1])
    x = torch.randn(int(sizes.sum()), 24, requires_grad=True)
    w = torch.randn(8, 24, 10, requires_grad=True)
    out = TorchBackend().grouped_mm(x, w, sizes)
    ref = grouped_mm_reference(x, w, sizes)
    assert torch.allclose(out, ref, atol=1e-5)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, [x, w], grad)
    rx, rw = torch.autograd.grad(ref, [x, w], grad)
    assert torch.allclose(gx, rx, atol=1e-5)
    assert torch.allclose(gw, rw, atol=1e-4)


def test_shared_expert_added():
    layer = _layer(shared_expert_hidden=6)
    x = torch.randn(10, 16)
    routed = _reference_forward(layer, x)
    shared = layer.shared_expert
    expected = routed + shared.down_proj(F.silu(shared.gate_proj(x)) * shared.up_proj(x))
    assert torch.allclose(layer(x).hidden, expected, atol=1e-5)
