"""The routing-statistics callback: counts per layer and domain, one process and ep=2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import torch.distributed as dist

from olmoe.analysis.callback import RoutingStatsCallback, domain_expert_counts
from olmoe.analysis.stats import load_routing_stats
from olmoe.train.parallel import parallelize
from tests.train._dist import run_distributed
from tests.train.test_expert_parallel import build_model

NUM_EXPERTS, TOP_K = 4, 2
# Every token prefers experts 2 and 3, which live on rank 1 under ep=2: rank 0 sends all of
# its tokens to the other rank and rank 1 sends none to rank 0.
CROSS_RANK_BIAS = [-30.0, -30.0, 30.0, 29.0]


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randint(0, 128, (2, 3, 8), generator=generator)
    domains = torch.tensor([[0, 1, 1], [1, 0, 0]])
    return inputs, domains


def _record(callback: RoutingStatsCallback, model, inputs, domains, step: int) -> None:
    """Drive the callback as the Trainer would: one train forward, one eval batch."""
    out = model(inputs)
    callback.after_forward(SimpleNamespace(outputs=out), None)
    with torch.no_grad():
        eval_out = model(inputs, output_routing=True)
    callback.eval_batch_end(SimpleNamespace(outputs=eval_out, batch={"domain_id": domains}), None)
    callback.eval_end(SimpleNamespace(), None)
    timestamp = SimpleNamespace(batch=step)
    callback.batch_end(SimpleNamespace(timestamp=timestamp), None)


def _records_on_rank(run_dir: str) -> None:
    rank = dist.get_rank()
    inputs, domains = _batches()
    model = build_model(NUM_EXPERTS, CROSS_RANK_BIAS)
    parallelize(model, ep=2)
    callback = RoutingStatsCallback(run_dir, interval=1, domains=["a", "b"])
    _record(callback, model, inputs[rank], domains[rank], step=1)


def test_domain_expert_counts_against_loop():
    torch.manual_seed(0)
    indices = [torch.randint(0, 5, (3, 4, 2)) for _ in range(2)]
    domains = torch.tensor([1, 0, 1])
    counts = domain_expert_counts(indices, domains, num_domains=2, num_experts=5)
    assert counts.shape == (2, 2, 5)
    for layer, layer_indices in enumerate(indices):
        for b in range(3):
            for s in range(4):
                for k in range(2):
                    expert = layer_indices[b, s, k]
                    counts[domains[b], layer, expert] -= 1
    assert torch.count_nonzero(counts) == 0


def test_expert_parallel_counts_equal_one_process(tmp_path):
    inputs, domains = _batches()
    single_dir = tmp_path / "single"
    model = build_model(NUM_EXPERTS, CROSS_RANK_BIAS)
    _record(
        RoutingStatsCallback(single_dir, interval=1, domains=["a", "b"]),
        model,
        inputs.reshape(6, 8),
        domains.reshape(6),
        step=1,
    )
    ep_dir = tmp_path / "ep"
    run_distributed(_records_on_rank, 2, args=(str(ep_dir),), timeout_s=120.0)

    single = json.loads((single_dir / "routing_stats.jsonl").read_text())
    parallel = json.loads((ep_dir / "routing_stats.jsonl").read_text())
    assert parallel["layer_counts"] == single["layer_counts"]
    assert parallel["domain_counts"] == single["domain_counts"]
    tokens = inputs.numel()
    for layer in single["layer_counts"]:
        assert sum(layer) == TOP_K * tokens
        assert layer[:2] == [0, 0]
    stats = load_routing_stats(ep_dir / "routing_stats.jsonl")
    assert stats.layer_counts.shape == (1, 2, NUM_EXPERTS)
