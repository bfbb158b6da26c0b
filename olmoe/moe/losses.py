"""Auxiliary router losses: load balancing and z-loss, per layer, with padding masks.

Dims: T = tokens, E = experts, K = top-k.

`token_mask` is (T,) bool, True for real tokens. Masked positions are left out of the
expert counts, the mean probabilities and the z-loss, so padding cannot move either loss.
"""

from __future__ import annotations

import torch


def tokens_per_expert(
    expert_indices: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Count top-k assignments per expert over real tokens: (E,) int64."""
    indices = expert_indices if token_mask is None else expert_indices[token_mask]
    return torch.bincount(indices.flatten(), minlength=num_experts)


def load_balancing_loss(
    probs: torch.Tensor,
    expert_counts: torch.Tensor,
    top_k: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """LB = E / (T * K) * sum_e c_e * mean_t p_{t,e}; 1.0 under perfectly even routing.

    `probs` is the full (T, E) softmax (not the renormalized top-k weights), `expert_counts`
    the (E,) top-k assignment counts c_e. Gradients flow through `probs` only.
    """
    num_experts = probs.shape[-1]
    probs = probs.float()
    if token_mask is not None:
        probs = probs[token_mask]
    num_tokens = probs.shape[0]
    if num_tokens == 0:
        return probs.sum() * 0.0
    mean_probs = probs.mean(dim=0)
    counts = expert_counts.to(mean_probs.dtype)
    return num_experts / (num_tokens * top_k) * torch.dot(counts, mean_probs)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2, computed in fp32."""
    if token_mask is not None:
        logits = logits[token_mask]
    if logits.shape[0] == 0:
        return logits.float().sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
