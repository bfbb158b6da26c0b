"""Permute and unpermute kernels against Python-loop references (CPU: Triton interpreter).

Index results (row ids, group sizes, gathered rows) must match exactly. Weighted sums use
the fp32 tolerance of `torch.testing.assert_close` (rtol 1.3e-6, atol 1e-5): the kernel
sums the K products in k order, the reference in row order.
"""

from __future__ import annotations

import pytest
import torch

from kernels import permute, permute_reference, permute_rows, unpermute, unpermute_reference
from kernels.permute import routing_plan
from olmoe.moe.backend import TorchBackend
from tests.kernels.helpers import guarded, nan_filled_allocations


def make_routing(T: int, K: int, E: int, seed: int = 0, used_experts: int | None = None):
    """Random distinct experts per token, drawn from the first `used_experts` of E."""
    generator = torch.Generator().manual_seed(seed)
    used = E if used_experts is None else used_experts
    scores = torch.rand(T, used, generator=generator)
    expert_indices = scores.argsort(dim=1)[:, :K]
    return expert_indices


def make_tensor(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


PLAN_CASES = {
    "dense": (37, 4, 8, None),
    "empty-experts": (29, 2, 8, 3),
    "top-1": (16, 1, 4, None),
    "no-tokens": (0, 2, 4, None),
}


@pytest.mark.parametrize("T, K, E, used", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_permute_matches_reference_exactly(T, K, E, used):
    x = make_tensor(T, 40, seed=T)
    expert_indices = make_routing(T, K, E, seed=T, used_experts=used)
    result = permute(x, expert_indices, E)
    expected = permute_reference(x, expert_indices, E)
    assert torch.equal(result.row_ids, expected.row_ids)
    assert torch.equal(result.group_sizes, expected.group_sizes)
    assert torch.equal(result.routed, expected.routed)


def test_routing_plan_infers_num_experts():
    expert_indices = make_routing(11, 2, 6, seed=3)
    result = permute(make_tensor(11, 8), expert_indices)
    expected = routing_plan(expert_indices, int(expert_indices.max()) + 1)
    assert torch.equal(result.row_ids, expected[0])
    assert torch.equal(result.group_sizes, expected[1])


def test_permute_backward_sums_copies():
    T, K, E, D = 23, 3, 6, 33
    x = make_tensor(T, D, seed=1)
    expert_indices = make_routing(T, K, E, seed=1)
    grad_routed = make_tensor(T * K, D, seed=2)

    x_kernel = x.clone().requires_grad_()
    routed = permute(x_kernel, expert_indices, E).routed
    (grad_x,) = torch.autograd.grad(routed, x_kernel, grad_routed)

    x_ref = x.clone().requires_grad_()
    routed_ref = permute_reference(x_ref, expert_indices, E).routed
    (grad_x_ref,) = torch.autograd.grad(routed_ref, x_ref, grad_routed)
    torch.testing.assert_close(grad_x, grad_x_ref)


def dropped_row_ids(T: int, K: int, E: int, keep_every: int, seed: int = 0) -> torch.Tensor:
    """Row ids of a routing plan with every `keep_every`-th row dropped, as capacity does."""
    row_ids, _ = routing_plan(make_routing(T, K, E, seed=seed), E)
    keep = torch.arange(row_ids.numel()) % keep_every != 0
    return row_ids[keep]


UNPERMUTE_CASES = {
    "dropless": (31, 4, 8, None),
    "dropped-slots": (31, 4, 8, 3),
    "top-1": (12, 1, 4, None),
}


@pytest.mark.parametrize("T, K, E, keep_every", UNPERMUTE_CASES.values(), ids=UNPERMUTE_CASES)
def test_unpermute_matches_reference(T, K, E, keep_every):
    D = 45
    if keep_every is None:
        row_ids, _ = routing_plan(make_routing(T, K, E, seed=T), E)
    else:
        row_ids = dropped_row_ids(T, K, E, keep_every, seed=T)
    y = make_tensor(row_ids.numel(), D, seed=1)
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(2))
    grad_out = make_tensor(T, D, seed=3)

    y_kernel, w_kernel = y.clone().requires_grad_(), weights.clone().requires_grad_()
    out = unpermute(y_kernel, row_ids, w_kernel)
    grad_y, grad_w = torch.autograd.grad(out, (y_kernel, w_kernel), grad_out)

    y_ref, w_ref = y.clone().requires_grad_(), weights.clone().requires_grad_()
    out_ref = unpermute_reference(y_ref, row_ids, w_ref)
    grad_y_ref, grad_w_ref = torch.autograd.grad(out_ref, (y_ref, w_ref), grad_out)

    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad_y, grad_y_ref)
    torch.testing.assert_close(grad_w, grad_w_ref)


@pytest.mark.parametrize("keep_every", [None, 3], ids=["dropless", "dropped-slots"])
def test_matches_torch_backend(keep_every):
    T, K, E, D = 26, 2, 5, 20
    if keep_every is None:
        row_ids, _ = routing_plan(make_routing(T, K, E, seed=4), E)
    else:
        row_ids = dropped_row_ids(T, K, E, keep_every, seed=4)
    x, weights = make_tensor(T, D, seed=5), torch.rand(T, K)
    torch_backend = TorchBackend()
    routed = permute_rows(x, row_ids, K)
    assert torch.equal(routed, torch_backend.permute(x, row_ids, K))
    torch.testing.assert_close(
        unpermute(routed, row_ids, weights), torch_backend.unpermute(routed, row_ids, weights)
    )


def test_unpermute_all_slots_dropped():
    weights = torch.rand(5, 2).requires_grad_()
    y = torch.zeros(0, 7, requires_grad=True)
    out = unpermute(y, torch.zeros(0, dtype=torch.int64), weights)
    assert torch.equal(out, torch.zeros(5, 7))
    grad_y, grad_w = torch.autograd.grad(out, (y, weights), torch.ones(5, 7))
    assert grad_y.shape == (0, 7)
    assert torch.equal(grad_w, torch.zeros(5, 2))


def test_runs_bitwise_identical_and_write_every_output():
    T, K, E, D = 19, 3, 7, 300
    row_ids = dropped_row_ids(T, K, E, keep_every=4, seed=6)
    x = guarded(make_tensor(T, D, seed=7))
    weights = torch.rand(T, K, generator=torch.Generator().manual_seed(8))
    grad_out = make_tensor(T, D, seed=9)

    def run():
        x_leaf, w_leaf = x.detach().requires_grad_(), weights.clone().requires_grad_()
        routed = permute_rows(x_leaf, row_ids, K)
        out = unpermute(routed * 2.0, row_ids, w_leaf)
        grads = torch.autograd.grad(out, (x_leaf, w_leaf), grad_out)
        return (routed.detach(), out.detach(), *grads)

    first = run()
    with nan_filled_allocations():
        assert torch.isnan(torch.empty(4)).all(), "NaN fill of new tensors is not active"
        second = run()
    for name, a, b in zip(("routed", "out", "grad_x", "grad_weights"), first, second):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        assert torch.equal(a, b), f"{name} differs between two runs"


# -----------------------------------------------------------------------------
# input validation


def test_rejects_wrong_dtype():
    row_ids = torch.arange(4)
    with pytest.raises(ValueError, match=r"x \(2, 3\) torch.int64 .* is not supported"):
        permute_rows(torch.zeros(2, 3, dtype=torch.int64), row_ids, 2)
    with pytest.raises(ValueError, match=r"row_ids must be 1-D int64; got row_ids \(4,\) "):
        permute_rows(torch.zeros(2, 3), row_ids.int(), 2)
    with pytest.raises(ValueError, match=r"combine_weights must be a \(T, K\) float"):
        unpermute(torch.zeros(4, 3), row_ids, torch.ones(2, 2, dtype=torch.int64))


def test_rejects_mismatched_devices():
    row_ids = torch.arange(4)
    with pytest.raises(ValueError, match=r"x \(2, 3\) torch.float32 on meta must be on cpu"):
        permute_rows(torch.zeros(2, 3, device="meta"), row_ids, 2)
    with pytest.raises(ValueError, match=r"combine_weights must be contiguous and on cpu"):
        unpermute(torch.zeros(4, 3), row_ids, torch.ones(2, 2, device="meta"))
    with pytest.raises(ValueError, match=r"x on cpu and expert_indices on meta"):
        permute(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.int64, device="meta"), 2)


def test_rejects_invalid_row_ids():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"\[0, T \* K = 4\); got min 0, max 4"):
        permute_rows(x, torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match=r"distinct; 1 of 3 are repeats"):
        permute_rows(x, torch.tensor([1, 1, 2]), 2)
    with pytest.raises(ValueError, match=r"more rows than the 4 slots"):
        permute_rows(x, torch.arange(5), 2)
    with pytest.raises(ValueError, match=r"top_k must be a positive int; got 0"):
        permute_rows(x, torch.arange(2), 0)
    with pytest.raises(ValueError, match=r"one row per row id; got 3 row ids"):
        unpermute(torch.zeros(4, 3), torch.arange(3), torch.ones(2, 2))


def test_rejects_invalid_expert_indices():
    with pytest.raises(ValueError, match=r"expert indices must lie in \[0, 3\); got min 0, max 3"):
        permute(torch.zeros(2, 3), torch.tensor([[0], [3]]), 3)
    with pytest.raises(ValueError, match=r"T = x.shape\[0\]; got x \(2, 3\)"):
        permute(torch.zeros(2, 3), torch.tensor([[0], [1], [2]]), 3)


def test_rejects_non_contiguous():
    with pytest.raises(ValueError, match=r"contiguous.*strides \(1, 2\)"):
        permute_rows(torch.zeros(3, 2).T, torch.arange(4), 2)
