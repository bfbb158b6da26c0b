"""A Composer callback that records routing counts during training.

Every `interval` steps, rank 0 appends one line to `<run_dir>/routing_stats.jsonl`: the
training tokens routed to each expert per layer since the previous line (summed over all
ranks and microbatches), the same counts per validation domain from the latest
evaluation, and the load imbalance. Under expert parallelism every rank routes its own
tokens over the global expert ids, so the all-reduced counts cover all experts and ranks
and sum to K times the tokens seen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from olmoe.analysis.stats import append_routing_stats

STATS_FILE = "routing_stats.jsonl"


def domain_expert_counts(
    expert_indices: list[torch.Tensor], domain_ids: torch.Tensor, num_domains: int, num_experts: int
) -> torch.Tensor:
    """(num_domains, L, E) top-k assignments per domain from per-layer (B, S, K) indices."""
    counts = []
    for indices in expert_indices:
        B, S, K = indices.shape
        # shape: (B * S * K,) flat (domain, expert) bins
        domains = domain_ids.view(B, 1, 1).expand(B, S, K).reshape(-1)
        bins = domains * num_experts + indices.reshape(-1)
        layer = torch.bincount(bins, minlength=num_domains * num_experts)
        counts.append(layer.view(num_domains, num_experts))
    return torch.stack(counts, dim=1)


class RoutingStatsCallback(Callback):
    def __init__(self, run_dir: str | Path, interval: int, domains: list[str]):
        self.path = Path(run_dir) / STATS_FILE
        self.interval = interval
        self.domains = list(domains)
        self._train_counts: torch.Tensor | None = None
        self._eval_counts: torch.Tensor | None = None
        self._latest_domain_counts: torch.Tensor | None = None

    def after_forward(self, state: State, logger: Logger) -> None:
        counts = state.outputs.tokens_per_expert.detach().to(torch.int64)
        self._train_counts = counts if self._train_counts is None else self._train_counts + counts

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        outputs = state.outputs
        if not getattr(outputs, "expert_indices", None):
            return
        num_experts = outputs.tokens_per_expert.shape[1]
        counts = domain_expert_counts(
            outputs.expert_indices, state.batch["domain_id"], len(self.domains), num_experts
        )
        self._eval_counts = counts if self._eval_counts is None else self._eval_counts + counts

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._eval_counts is None:
            return
        counts = self._eval_counts.float()
        # NOTE: collective across ranks; every rank evaluates, so every rank reaches it.
        dist.all_reduce(counts)
        self._latest_domain_counts = counts.to(torch.int64)
        self._eval_counts = None

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step % self.interval != 0 or self._train_counts is None:
            return
        counts = self._train_counts.float()
        dist.all_reduce(counts)
        self._train_counts = None
        if dist.get_global_rank() != 0:
            return
        domain_counts = None
        if self._latest_domain_counts is not None:
            domain_counts = {
                name: self._latest_domain_counts[i].cpu().numpy()
                for i, name in enumerate(self.domains)
            }
        append_routing_stats(self.path, step, counts.to(torch.int64).cpu().numpy(), domain_counts)
