"""Top-k token-choice router.

Dims: T = tokens, E = experts, K = top-k, D = d_model.

Tie rule: experts are ranked by probability with a stable descending sort, so among
experts with bit-identical probabilities the lowest expert index ranks first. A sort
(unlike `torch.topk`, whose order on ties is unspecified) always returns K distinct
experts, also for constant or very negative logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from olmoe.model.config import MoEConfig


@dataclass
class RouterOutput:
    logits: torch.Tensor
    """(T, E) router logits in the input dtype."""
    probs: torch.Tensor
    """(T, E) fp32 softmax over all experts."""
    expert_indices: torch.Tensor
    """(T, K) int64 selected experts in rank order (highest probability first)."""
    expert_probs: torch.Tensor
    """(T, K) fp32 softmax probabilities of the selected experts."""
    combine_weights: torch.Tensor
    """(T, K) fp32 weights applied to expert outputs (renormalized if norm_topk_prob)."""


def select_top_k(probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the K most probable experts per row; on exact ties the lowest index wins."""
    sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return sorted_probs[:, :top_k], sorted_indices[:, :top_k]


class TopKRouter(nn.Module):
    """Linear router without bias, fp32 softmax over all E experts, then top-k."""

    def __init__(self, config: MoEConfig, d_model: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter = config.router_jitter
        self.weight = nn.Parameter(torch.empty(config.num_experts, d_model))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # x: (T, D)
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x = x * noise

        # shape: (T, E)
        logits = nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)

        # shape: (T, K) each
        expert_probs, expert_indices = select_top_k(probs, self.top_k)
        combine_weights = expert_probs
        if self.norm_topk_prob:
            combine_weights = expert_probs / expert_probs.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, expert_indices, expert_probs, combine_weights)
