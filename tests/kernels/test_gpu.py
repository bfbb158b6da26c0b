"""GPU-only kernel checks: bf16 (wrong in the Triton interpreter) and compiled fp32 kernels.

Run with `pytest -m gpu tests/kernels`. Tolerances:
- fp32: TF32 is off (as for torch.mm by default), so rtol 1e-5 and atol 1e-4 as on the CPU.
- bf16: the output is rounded to bf16 (relative step 2^-8 = 0.4%) after fp32
  accumulation, so the relative Frobenius error against an fp32 reference of the same
  bf16 inputs stays below 1e-2, and elementwise rtol 1.6e-2 holds with atol 1e-2 * scale.
"""

from __future__ import annotations

import pytest
import torch

from kernels import grouped_mm, permute, unpermute, unpermute_reference
from kernels.permute import routing_plan

pytestmark = pytest.mark.gpu

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str):
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4, msg=name)
        return
    assert relative_error(actual, expected) < 1e-2, name
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=1.6e-2, atol=1e-2 * scale, msg=name
    )


def loop_reference(x, w, group_sizes, grad_out):
    """Forward, dX and dW in fp32 with one matmul per group."""
    x, w, grad_out = x.float(), w.float(), grad_out.float()
    out = torch.zeros(x.shape[0], w.shape[2], device=x.device)
    grad_x = torch.zeros_like(x)
    grad_w = torch.zeros_like(w)
    start = 0
    for e, size in enumerate(group_sizes.tolist()):
        rows = slice(start, start + size)
        out[rows] = x[rows] @ w[e]
        grad_x[rows] = grad_out[rows] @ w[e].T
        grad_w[e] = x[rows].T @ grad_out[rows]
        start += size
    return out, grad_x, grad_w


GROUP_CASES = {
    "sparse-with-empty": [5, 0, 17, 0, 0, 3, 128, 1],
    "ragged": [1, 63, 65, 127, 0, 1000],
    "all-empty": [0, 0, 0],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_sizes", GROUP_CASES.values(), ids=GROUP_CASES.keys())
def test_grouped_mm_gpu(group_sizes, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    N, E, K, M = sum(group_sizes), len(group_sizes), 1001, 999
    x = torch.randn(N, K, device="cuda", generator=generator).to(dtype).requires_grad_()
    w = torch.randn(E, K, M, device="cuda", generator=generator).to(dtype).requires_grad_()
    grad_out = torch.randn(N, M, device="cuda", generator=generator).to(dtype)
    sizes = torch.tensor(group_sizes, device="cuda")

    out = grouped_mm(x, w, sizes)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out)
    ref_out, ref_grad_x, ref_grad_w = loop_reference(x.detach(), w.detach(), sizes, grad_out)
    assert_matches(out, ref_out, dtype, "out")
    assert_matches(grad_x, ref_grad_x, dtype, "grad_x")
    assert_matches(grad_w, ref_grad_w, dtype, "grad_w")
    for e, size in enumerate(group_sizes):
        if size == 0:
            assert torch.equal(grad_w[e], torch.zeros_like(grad_w[e])), f"dW[{e}]"

    again = grouped_mm(x, w, sizes)
    assert torch.equal(out, again), "two runs differ"


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_unpermute_gpu(dtype):
    T, K, E, D = 1000, 8, 64, 2048
    generator = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, D, device="cuda", generator=generator).to(dtype)
    expert_indices = torch.rand(T, E, device="cuda", generator=generator).argsort(1)[:, :K]
    weights = torch.rand(T, K, device="cuda", generator=generator)

    result = permute(x, expert_indices, E)
    cpu_row_ids, cpu_sizes = routing_plan(expert_indices.cpu(), E)
    assert torch.equal(result.row_ids.cpu(), cpu_row_ids)
    assert torch.equal(result.group_sizes.cpu(), cpu_sizes)
    assert torch.equal(result.routed, x[result.row_ids // K])

    out = unpermute(result.routed, result.row_ids, weights)
    expected = unpermute_reference(result.routed, result.row_ids, weights)
    assert_matches(out, expected, dtype, "unpermute")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_triton_equals_torch_gpu(dtype):
    from olmoe.model import MoEConfig
    from olmoe.moe import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(num_experts=16, top_k=4, expert_hidden=256), 512).cuda()
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.05)
    layer = layer.to(dtype)
    x = torch.randn(4, 128, 512, device="cuda", dtype=dtype)

    outputs = {}
    for backend in ("torch", "triton"):
        layer.config.backend = backend
        layer.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        hidden = layer(x_leaf).hidden
        hidden.float().square().sum().backward()
        outputs[backend] = (hidden.detach(), x_leaf.grad, layer.experts.gate_up_weight.grad)
    names = ("hidden", "grad_x", "grad_gate_up")
    for name, actual, expected in zip(names, outputs["triton"], outputs["torch"]):
        assert_matches(actual, expected.float(), dtype, name)
