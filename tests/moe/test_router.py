"""Top-k selection: distinct experts, the lowest-index tie rule, degenerate logits."""

import pytest
import torch

from olmoe.model import MoEConfig
from olmoe.moe import TopKRouter, select_top_k

E, K = 64, 8


def _route_logits(logits: torch.Tensor, norm_topk_prob: bool = False):
    router = TopKRouter(MoEConfig(num_experts=E, top_k=K, norm_topk_prob=norm_topk_prob), E)
    # Identity router: logits = x @ I^T, so the input rows are the logits.
    router.weight = torch.nn.Parameter(torch.eye(E, dtype=logits.dtype))
    return router(logits)


def _check_valid(out):
    idx = out.expert_indices
    assert idx.shape[1] == K
    for row in idx.tolist():
        assert len(set(row)) == K
    assert torch.isfinite(out.combine_weights).all()
    assert (out.combine_weights >= 0).all()


@pytest.mark.parametrize(
    "logits",
    [
        torch.full((5, E), -50.0) + torch.randn(5, E) * 1e-3,
        torch.full((5, E), -50.0),
        torch.full((5, E), 7.0),
        torch.zeros(5, E),
    ],
    ids=["near-minus-50", "constant-minus-50", "constant-7", "zeros"],
)
def test_degenerate_logits_give_k_distinct(logits):
    out = _route_logits(logits)
    _check_valid(out)
    again = _route_logits(logits)
    assert torch.equal(out.expert_indices, again.expert_indices)
    assert torch.equal(out.combine_weights, again.combine_weights)


def test_constant_row_picks_lowest_indices():
    out = _route_logits(torch.zeros(3, E))
    assert out.expert_indices.tolist() == [list(range(K))] * 3


def test_ties_at_k_boundary_lowest_index_wins():
    logits = torch.zeros(1, E)
    top = [50, 3, 40, 7, 12, 60, 33]  # seven clear winners
    logits[0, top] = torch.arange(10.0, 3.0, -1.0)
    # Experts 5, 20 and 63 tie exactly for the eighth place.
    logits[0, [5, 20, 63]] = 1.0
    out = _route_logits(logits)
    assert out.expert_indices[0].tolist() == top + [5]
    _check_valid(out)


def test_rank_order_matches_sorted_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(32, E)
    out = _route_logits(logits)
    probs = torch.softmax(logits, dim=-1)
    expected = torch.sort(probs, dim=-1, descending=True).values[:, :K]
    assert torch.equal(out.expert_probs, expected)
    assert (out.expert_probs[:, :-1] >= out.expert_probs[:, 1:]).all()


def test_norm_topk_prob_sums_to_one():
    torch.manual_seed(0)
    out = _route_logits(torch.randn(16, E), norm_topk_prob=True)
    assert torch.allclose(out.combine_weights.sum(-1), torch.ones(16), atol=1e-6)


def test_softmax_is_fp32_for_bf16_input():
    out = _route_logits(torch.randn(4, E).to(torch.bfloat16))
    assert out.probs.dtype == torch.float32
    assert out.combine_weights.dtype == torch.float32


def test_jitter_only_in_training():
    router = TopKRouter(MoEConfig(num_experts=E, top_k=K, router_jitter=0.1), 16)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(8, 16)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    router.train()
    assert not torch.equal(router(x).logits, router(x).logits)


def test_select_top_k_reference_loop():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randint(-2, 3, (20, 16)).float(), dim=-1)
    values, indices = select_top_k(probs, 4)
    for row, (vals, idx) in enumerate(zip(values.tolist(), indices.tolist())):
        ranked = sorted(range(16), key=lambda e: (-probs[row, e].item(), e))[:4]
        assert idx == ranked
        assert vals == [probs[row, e].item() for e in ranked]
