"""Grouped GEMM kernels against a per-group fp32 matmul loop (CPU: Triton interpreter, fp32).

Tolerance: the kernel and `torch.mm` both accumulate in fp32 but in different orders, so
entries of size ~sqrt(K) differ by a few ulps times sqrt(K): rtol 1e-5 and atol 1e-4
cover K up to 1001 with randn inputs.
"""

from __future__ import annotations

import pytest
import torch

from kernels import grouped_mm
from kernels.grouped_gemm import grouped_mm_reference
from tests.kernels.helpers import guarded, nan_filled_allocations

FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


def make_inputs(group_sizes: list[int], K: int, M: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    N, E = sum(group_sizes), len(group_sizes)
    x = torch.randn(N, K, generator=generator)
    w = torch.randn(E, K, M, generator=generator)
    grad_out = torch.randn(N, M, generator=generator)
    return x, w, torch.tensor(group_sizes, dtype=torch.int64), grad_out


def loop_reference(x, w, group_sizes, grad_out):
    """Forward, dX and dW with one fp32 matmul per group."""
    out = torch.zeros(x.shape[0], w.shape[2])
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


def run_kernels(x, w, group_sizes, grad_out):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = grouped_mm(x, w, group_sizes)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out)
    return out.detach(), grad_x, grad_w


GROUP_CASES = {
    "sparse-with-empty": [5, 0, 17, 0, 0, 3, 128, 1],
    "only-last-group": [0, 0, 0, 0, 0, 0, 0, 40],
    "all-empty": [0, 0, 0, 0],
    "single-group": [77],
}


@pytest.mark.parametrize("group_sizes", GROUP_CASES.values(), ids=GROUP_CASES.keys())
def test_grouped_mm_matches_loop(group_sizes):
    x, w, sizes, grad_out = make_inputs(group_sizes, K=48, M=40)
    out, grad_x, grad_w = run_kernels(x, w, sizes, grad_out)
    ref_out, ref_grad_x, ref_grad_w = loop_reference(x, w, sizes, grad_out)
    assert out.shape == (sum(group_sizes), 40)
    torch.testing.assert_close(out, ref_out, **FP32_TOLERANCE)
    torch.testing.assert_close(grad_x, ref_grad_x, **FP32_TOLERANCE)
    torch.testing.assert_close(grad_w, ref_grad_w, **FP32_TOLERANCE)
    for e, size in enumerate(group_sizes):
        if size == 0:
            assert torch.equal(grad_w[e], torch.zeros_like(grad_w[e])), f"dW[{e}] of empty group"


@pytest.mark.parametrize("K", [8, 48, 1001])
def test_grouped_mm_ragged_shapes(K):
    # 999 and the group sizes are not multiples of any block size.
    x, w, sizes, grad_out = make_inputs([1, 63, 65, 127], K=K, M=999, seed=K)
    out, grad_x, grad_w = run_kernels(guarded(x), guarded(w), sizes, guarded(grad_out))
    ref_out, ref_grad_x, ref_grad_w = loop_reference(x, w, sizes, grad_out)
    torch.testing.assert_close(out, ref_out, **FP32_TOLERANCE)
    torch.testing.assert_close(grad_x, ref_grad_x, **FP32_TOLERANCE)
    torch.testing.assert_close(grad_w, ref_grad_w, **FP32_TOLERANCE)


def test_grouped_mm_runs_bitwise_identical():
    x, w, sizes, grad_out = make_inputs([1, 63, 0, 65, 127], K=48, M=999, seed=1)
    first = run_kernels(x, w, sizes, grad_out)
    second = run_kernels(x, w, sizes, grad_out)
    for name, a, b in zip(("out", "grad_x", "grad_w"), first, second):
        assert torch.equal(a, b), f"{name} differs between two runs"


@pytest.mark.parametrize("group_sizes", [[5, 0, 17, 0, 0, 3, 128, 1], [0, 0, 0, 0]])
def test_grouped_mm_writes_every_output(group_sizes):
    x, w, sizes, grad_out = make_inputs(group_sizes, K=48, M=40, seed=2)
    with nan_filled_allocations():
        assert torch.isnan(torch.empty(4)).all(), "NaN fill of new tensors is not active"
        out, grad_x, grad_w = run_kernels(x, w, sizes, grad_out)
    ref_out, ref_grad_x, ref_grad_w = loop_reference(x, w, sizes, grad_out)
    assert not torch.isnan(out).any()
    assert not torch.isnan(grad_x).any()
    assert not torch.isnan(grad_w).any()
    torch.testing.assert_close(out, ref_out, **FP32_TOLERANCE)
    torch.testing.assert_close(grad_x, ref_grad_x, **FP32_TOLERANCE)
    torch.testing.assert_close(grad_w, ref_grad_w, **FP32_TOLERANCE)


def test_grouped_mm_int32_group_sizes():
    x, w, sizes, _ = make_inputs([3, 0, 9], K=16, M=24)
    out = grouped_mm(x, w, sizes.to(torch.int32))
    torch.testing.assert_close(out, grouped_mm_reference(x, w, sizes), **FP32_TOLERANCE)


def test_grouped_mm_reference_matches_loop():
    x, w, sizes, grad_out = make_inputs([4, 0, 6], K=8, M=5)
    torch.testing.assert_close(
        grouped_mm_reference(x, w, sizes), loop_reference(x, w, sizes, grad_out)[0]
    )


# -----------------------------------------------------------------------------
# input validation


def test_rejects_wrong_dtype():
    x, w, sizes, _ = make_inputs([2, 3], K=8, M=4)
    with pytest.raises(ValueError, match=r"torch.float64 is not supported"):
        grouped_mm(x.double(), w.double(), sizes)
    with pytest.raises(ValueError, match=r"same dtype.*x \(5, 8\) torch.float32"):
        grouped_mm(x, w.to(torch.bfloat16), sizes)
    with pytest.raises(ValueError, match=r"group_sizes must be int64 or int32"):
        grouped_mm(x, w, sizes.float())


def test_rejects_mismatched_devices():
    x, w, sizes, _ = make_inputs([2, 3], K=8, M=4)
    with pytest.raises(ValueError, match=r"one device.*w \(2, 8, 4\) torch.float32 on meta"):
        grouped_mm(x, w.to("meta"), sizes)
    with pytest.raises(ValueError, match=r"one device"):
        grouped_mm(x, w, sizes.to("meta"))


def test_rejects_sizes_not_summing_to_rows():
    x, w, _, _ = make_inputs([2, 3], K=8, M=4)
    with pytest.raises(ValueError, match=r"sum to 6 but x has N=5 rows"):
        grouped_mm(x, w, torch.tensor([2, 4]))


def test_rejects_negative_sizes():
    x, w, _, _ = make_inputs([2, 3], K=8, M=4)
    with pytest.raises(ValueError, match=r"non-negative; got min -1 in \[6, -1\]"):
        grouped_mm(x, w, torch.tensor([6, -1]))


def test_rejects_shape_mismatch():
    x, w, sizes, _ = make_inputs([2, 3], K=8, M=4)
    with pytest.raises(ValueError, match=r"K must equal w's K.*x \(5, 7\)"):
        grouped_mm(x[:, :7].contiguous(), w, sizes)
    with pytest.raises(ValueError, match=r"len\(group_sizes\).*group_sizes \(3,\)"):
        grouped_mm(x, w, torch.tensor([2, 3, 0]))
    with pytest.raises(ValueError, match=r"expected x \(N, K\)"):
        grouped_mm(x[0], w, sizes)


def test_rejects_non_contiguous():
    x, w, sizes, _ = make_inputs([2, 3], K=8, M=8)
    with pytest.raises(ValueError, match=r"contiguous.*strides"):
        grouped_mm(x, w.transpose(1, 2), sizes)
