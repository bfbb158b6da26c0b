"""The fused CPU path's worker threads and its reused gradient blocks.

The threaded results are compared with a token-by-token loop through autograd (the slow,
obvious reference in `tests/helpers.py`) at 1, 2 and 3 workers. Tolerance as there:
fp32 sums in a different order, rtol 1e-5 and atol 1e-4 for gradients that reach ~30.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from olmoe.model import MoEConfig
from olmoe.moe import MoELayer
from olmoe.moe.backend import (
    _BLOCK_CACHE,
    _EXPERT_THREADS,
    _expert_order,
    _RoutedSwiGLU,
    release_cached_blocks,
)
from tests.helpers import swiglu_token_loop


@contextlib.contextmanager
def intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def routed_problem(seed: int, T=40, K=3, E=7, D=12, H=10):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=generator)
    logits = torch.randn(T, E, generator=generator)
    combine_weights, expert_indices = torch.softmax(logits, -1).topk(K)
    gate_up_weight = torch.randn(E, D, 2 * H, generator=generator) * 0.5
    down_weight = torch.randn(E, H, D, generator=generator) * 0.5
    return x, combine_weights, expert_indices, gate_up_weight, down_weight


def run_fused(x, combine_weights, expert_indices, gate_up_weight, down_weight, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (x, combine_weights)]
    weights = [t.detach().clone().requires_grad_() for t in (gate_up_weight, down_weight)]
    flat = expert_indices.reshape(-1)
    row_ids = torch.sort(flat, stable=True).indices
    group_sizes = torch.bincount(flat, minlength=gate_up_weight.shape[0])
    out = _RoutedSwiGLU.apply(*inputs, *weights, row_ids, group_sizes)
    grads = torch.autograd.grad(out, inputs + weights, grad)
    return out, grads


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threaded_fused_path_matches_token_loop(workers):
    problem = routed_problem(seed=workers)
    x, combine_weights, expert_indices, gate_up_weight, down_weight = problem
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    with intra_op_threads(workers):
        out, grads = run_fused(*problem, grad)

    leaves = [t.clone().requires_grad_() for t in (x, combine_weights)]
    leaves += [t.clone().requires_grad_() for t in (gate_up_weight, down_weight)]
    ref = swiglu_token_loop(leaves[0], leaves[1], expert_indices, leaves[2], leaves[3])
    expected = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(["x", "combine_weights", "gate_up", "down"], grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=name)


def test_threaded_results_repeat_bitwise():
    problem = routed_problem(seed=11, T=64, E=9)
    grad = torch.randn(64, 12, generator=torch.Generator().manual_seed(12))
    with intra_op_threads(2):
        first_out, first_grads = run_fused(*problem, grad)
        for _ in range(3):
            out, grads = run_fused(*problem, grad)
            assert torch.equal(out, first_out)
            for got, want in zip(grads, first_grads):
                assert torch.equal(got, want)


def test_caller_thread_count_is_kept():
    problem = routed_problem(seed=13)
    grad = torch.randn(40, 12)
    for workers in (3, 2):
        with intra_op_threads(workers):
            run_fused(*problem, grad)
            assert torch.get_num_threads() == workers


def test_results_independent_of_worker_count():
    # Each expert writes only its own rows, and rows are summed per token afterwards.
    problem = routed_problem(seed=14, T=64, E=9)
    grad = torch.randn(64, 12, generator=torch.Generator().manual_seed(15))
    results = []
    for workers in (1, 2, 3):
        with intra_op_threads(workers):
            results.append(run_fused(*problem, grad))
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for got, want in zip(grads, results[0][1]):
            assert torch.equal(got, want)


def test_workers_keep_one_intra_op_thread():
    # torch sets up a thread's count lazily at its first parallel op. A worker that did
    # not run that setup first would switch back to the process-wide count there.
    big = torch.randn(1 << 17)
    counts = []
    with intra_op_threads(2):
        _EXPERT_THREADS.run(
            lambda e: counts.append((torch.nn.functional.silu(big), torch.get_num_threads())[1]),
            list(range(8)),
            workers=2,
        )
        assert torch.get_num_threads() == 2
    assert counts == [1] * 8


@pytest.mark.parametrize(
    "sizes, order",
    [
        ([5, 0, 17, 0, 0, 3, 128, 1], [6, 2, 0, 5, 7]),
        ([4, 4, 9, 4], [2, 0, 1, 3]),
        ([0, 0, 0], []),
    ],
)
def test_expert_order_is_largest_first_without_empty_experts(sizes, order):
    assert _expert_order(sizes) == order


def make_layer(seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=6, top_k=2, expert_hidden=10, backend="torch"), 16)
    for param in layer.parameters():
        # Gradients of order 1-100, so that a lost or doubled term shows up.
        torch.nn.init.normal_(param, std=0.3)
    return layer


def step(layer, x, set_to_none=True):
    if set_to_none:
        layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out.hidden.square().sum() + out.lb_loss).backward()


def test_weight_gradients_reuse_memory_after_zero_grad():
    release_cached_blocks()
    layer = make_layer()
    x = torch.randn(30, 16)
    step(layer, x)
    cached = {block.data_ptr() for blocks in _BLOCK_CACHE.blocks.values() for block in blocks}
    first_ptr = layer.experts.gate_up_weight.grad.data_ptr()
    assert first_ptr in cached, "autograd copied the gradient instead of keeping the block"
    first = layer.experts.gate_up_weight.grad.clone()
    step(layer, x)
    # Same memory, and the same values as a fresh gradient would hold.
    assert layer.experts.gate_up_weight.grad.data_ptr() == first_ptr
    assert torch.equal(layer.experts.gate_up_weight.grad, first)


def test_kept_gradient_never_overwritten():
    release_cached_blocks()
    layer = make_layer(seed=1)
    x1, x2 = torch.randn(30, 16), torch.randn(30, 16)
    step(layer, x1)
    kept_grad = layer.experts.down_weight.grad
    kept_values = kept_grad.clone()
    step(layer, x2)
    assert torch.equal(kept_grad, kept_values), "a gradient the caller kept was written"
    assert layer.experts.down_weight.grad.data_ptr() != kept_grad.data_ptr()

    reference = make_layer(seed=1)
    step(reference, x2)
    assert torch.equal(layer.experts.down_weight.grad, reference.experts.down_weight.grad)


def test_gradients_accumulate_without_zero_grad():
    release_cached_blocks()
    x1, x2 = torch.randn(30, 16), torch.randn(30, 16)
    layer = make_layer(seed=2)
    step(layer, x1)
    step(layer, x2, set_to_none=False)
    separate = []
    for x in (x1, x2):
        other = make_layer(seed=2)
        step(other, x)
        separate.append({n: p.grad.clone() for n, p in other.named_parameters()})
    for name, param in layer.named_parameters():
        expected = separate[0][name] + separate[1][name]
        assert not torch.allclose(expected, 2 * separate[1][name], rtol=1e-3), name
        torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-4, msg=name)


def test_release_cached_blocks_empties_the_cache():
    layer = make_layer(seed=3)
    step(layer, torch.randn(30, 16))
    assert _BLOCK_CACHE.blocks
    release_cached_blocks()
    assert not _BLOCK_CACHE.blocks
    # Gradients already handed out stay valid.
    assert torch.isfinite(layer.experts.gate_up_weight.grad).all()
