"""The MoE layer with the Triton backend against the PyTorch backend (CPU: interpreter, fp32).

Tolerance: both backends accumulate in fp32. The Triton kernels sum in a different order
(GEMM K tiles, the k-ordered combine), so outputs and gradients agree to fp32 rounding.
With weights of std 0.3, gradients reach ~30 and differ by up to ~5e-6: rtol 1e-5 and
atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from olmoe.model import MoEConfig
from olmoe.moe import MoELayer, get_backend

FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def make_layer(seed: int = 0, d_model: int = 24, **overrides) -> MoELayer:
    torch.manual_seed(seed)
    config = dict(num_experts=8, top_k=2, expert_hidden=20, backend="torch")
    config.update(overrides)
    layer = MoELayer(MoEConfig(**config), d_model)
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return layer


def forward_backward(layer: MoELayer, backend: str, x: torch.Tensor, token_mask=None):
    """Run the layer with `backend`; return the output and the gradients of x and params."""
    layer.config.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = layer(x, token_mask)
    grad_out = torch.randn(out.hidden.shape, generator=torch.Generator().manual_seed(1))
    loss = (out.hidden * grad_out).sum() + out.lb_loss + out.z_loss
    loss.backward()
    grads = {"x": x.grad}
    grads.update({name: param.grad for name, param in layer.named_parameters()})
    return out, grads


def test_triton_backend_registers_itself():
    backend = get_backend("triton", torch.device("cpu"))
    assert backend.name == "triton"
    assert type(backend).__module__ == "kernels.backend"
    assert get_backend("auto", torch.device("cpu")).name == "torch"


CASES = {
    "dropless": dict(),
    "shared-expert": dict(shared_expert_hidden=16),
    "capacity-drops": dict(capacity_factor=0.5),
    "top-1-one-expert": dict(num_experts=1, top_k=1),
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_layer_triton_equals_torch(overrides):
    layer = make_layer(**overrides)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(2))
    torch_out, torch_grads = forward_backward(layer, "torch", x)
    triton_out, triton_grads = forward_backward(layer, "triton", x)

    torch.testing.assert_close(triton_out.hidden, torch_out.hidden, **FP32_TOLERANCE)
    assert torch.equal(triton_out.num_dropped, torch_out.num_dropped)
    for name, grad in torch_grads.items():
        assert triton_grads[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(triton_grads[name], grad, **FP32_TOLERANCE, msg=name)


def test_layer_with_padding_mask():
    layer = make_layer(seed=3)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(4))
    token_mask = torch.ones(2, 7, dtype=torch.bool)
    token_mask[0, 4:] = False
    token_mask[1, :2] = False
    torch_out, torch_grads = forward_backward(layer, "torch", x, token_mask)
    triton_out, triton_grads = forward_backward(layer, "triton", x, token_mask)

    torch.testing.assert_close(triton_out.hidden, torch_out.hidden, **FP32_TOLERANCE)
    for name, grad in torch_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, **FP32_TOLERANCE, msg=name)


def test_layer_skewed_routing_empty_experts():
    # 15 tokens make 30 assignments, so at least 2 of the 32 experts get no rows.
    layer = make_layer(seed=5, num_experts=32)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(6))
    torch_out, torch_grads = forward_backward(layer, "torch", x)
    triton_out, triton_grads = forward_backward(layer, "triton", x)
    assert (torch_out.tokens_per_expert == 0).any(), "the case needs at least one empty expert"

    torch.testing.assert_close(triton_out.hidden, torch_out.hidden, **FP32_TOLERANCE)
    for name, grad in torch_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, **FP32_TOLERANCE, msg=name)
