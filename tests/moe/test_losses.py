"""Load-balancing and z-loss: known values, gradients and padding masks."""

import math

import torch

from olmoe.model import MoEConfig
from olmoe.moe import MoELayer, load_balancing_loss, router_z_loss, tokens_per_expert


def _lb_from_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    indices = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    counts = tokens_per_expert(indices, logits.shape[1])
    return load_balancing_loss(probs, counts, top_k)


def test_lb_collapsed_routing_is_num_experts():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]]).repeat(32, 1)
    lb = _lb_from_logits(logits, top_k=1)
    p0 = math.exp(10) / (math.exp(10) + 3)
    assert abs(lb.item() - 4.0 * p0) < 1e-5
    assert abs(lb.item() - 4.0) < 1e-3


def test_lb_even_routing_is_exactly_one():
    lb = _lb_from_logits(torch.zeros(64, 8), top_k=2)
    assert lb.item() == 1.0


def test_lb_reference_formula():
    torch.manual_seed(0)
    T, E, K = 50, 6, 3
    logits = torch.randn(T, E)
    lb = _lb_from_logits(logits, top_k=K)
    probs = torch.softmax(logits.double(), dim=-1)
    expected = 0.0
    for e in range(E):
        count = sum(e in torch.topk(probs[t], K).indices.tolist() for t in range(T))
        expected += count * probs[:, e].mean().item()
    expected *= E / (T * K)
    assert abs(lb.item() - expected) < 1e-6


def test_lb_gradients_reach_every_router_column():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=8, top_k=2, expert_hidden=4), 16)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.5)
    out = layer(torch.randn(40, 16))
    out.lb_loss.backward()
    grad = layer.router.weight.grad
    assert grad is not None
    for e in range(8):
        assert grad[e].abs().sum() > 0, f"expert {e} router row has no gradient"


def test_z_loss_zero_logits_e64():
    z = router_z_loss(torch.zeros(10, 64))
    assert abs(z.item() - math.log(64) ** 2) < 1e-5
    assert abs(z.item() - 17.2963) < 1e-4


def test_z_loss_bf16_large_logits_finite():
    torch.manual_seed(0)
    logits = (torch.rand(64, 64) * 200 + 100).to(torch.bfloat16)
    z = router_z_loss(logits)
    expected = torch.logsumexp(logits.double(), dim=-1).square().mean()
    assert torch.isfinite(z)
    assert abs(z.item() - expected.item()) / expected.item() < 1e-3


def test_z_loss_divided_by_top_k_option():
    torch.manual_seed(0)
    x = torch.randn(12, 16)
    plain = MoELayer(MoEConfig(num_experts=8, top_k=4, expert_hidden=4), 16)
    divided = MoELayer(
        MoEConfig(num_experts=8, top_k=4, expert_hidden=4, z_loss_divide_by_top_k=True), 16
    )
    torch.nn.init.normal_(plain.router.weight)
    divided.load_state_dict(plain.state_dict())
    assert torch.allclose(divided(x).z_loss * 4, plain(x).z_loss)


def test_padding_excluded_from_losses_and_counts():
    torch.manual_seed(0)
    D, E = 16, 8
    layer = MoELayer(MoEConfig(num_experts=E, top_k=2, expert_hidden=8), D)
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(2, 16, D)
    # Padded states pushed hard toward expert 0.
    x[1, 8:] = layer.router.weight[0].detach() * 50
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 8:] = False

    masked = layer(x, mask)
    real = torch.cat([x[0], x[1, :8]])
    alone = layer(real)
    assert torch.allclose(masked.lb_loss, alone.lb_loss, atol=1e-6)
    assert torch.allclose(masked.z_loss, alone.z_loss, atol=1e-6)
    assert torch.equal(masked.tokens_per_expert, alone.tokens_per_expert)
    assert masked.tokens_per_expert.sum().item() == 24 * 2
    out_real = masked.hidden.reshape(32, D)[mask.reshape(-1)]
    assert torch.allclose(out_real, alone.hidden, atol=1e-6)

    x_random = x.clone()
    x_random[1, 8:] = torch.randn(8, D) * 100
    randomized = layer(x_random, mask)
    assert torch.equal(randomized.lb_loss, masked.lb_loss)
    assert torch.equal(randomized.z_loss, masked.z_loss)
    assert torch.equal(randomized.tokens_per_expert, masked.tokens_per_expert)
    assert torch.equal(randomized.hidden[mask], masked.hidden[mask])
