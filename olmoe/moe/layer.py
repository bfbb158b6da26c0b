"""The dropless mixture-of-experts feed-forward layer.

Dims: B = batch, S = sequence, T = tokens (B * S), E = experts, K = top-k, D = d_model,
H = expert hidden, N = routed rows (T * K in dropless mode).

Forward:
    1. route: fp32 softmax over E experts, top-k per token (see `router.py`)
    2. plan: a stable sort of the T * K assignments by expert gives `row_ids` and
       `group_sizes`; masked tokens and, in capacity mode, overflow are dropped here
    3. permute: gather each token's K copies into expert order
    4. experts: grouped SwiGLU over contiguous per-expert slices
    5. unpermute: weighted sum of each token's K expert outputs
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from olmoe.model.config import MoEConfig
from olmoe.moe.backend import ExpertBackend, get_backend
from olmoe.moe.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from olmoe.moe.router import RouterOutput, TopKRouter


@dataclass
class RoutingPlan:
    row_ids: torch.Tensor
    """(N,) int64 flattened assignment index t * K + k of each expert-sorted row."""
    group_sizes: torch.Tensor
    """(E,) int64 rows per expert; sums to N."""
    num_dropped: torch.Tensor
    """() int64 assignments of real tokens dropped by the capacity limit."""


@dataclass
class MoEOutput:
    hidden: torch.Tensor
    """Layer output, same shape and dtype as the input."""
    lb_loss: torch.Tensor
    """() fp32 load-balancing loss of this layer."""
    z_loss: torch.Tensor
    """() fp32 router z-loss of this layer (divided by K if configured)."""
    tokens_per_expert: torch.Tensor
    """(E,) int64 top-k assignments of real tokens per expert, before any capacity drop."""
    num_dropped: torch.Tensor
    """() int64 assignments dropped by the capacity limit (0 when dropless)."""
    router: RouterOutput
    """The router's logits, probabilities and selections, for analysis."""


def build_routing_plan(
    expert_indices: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    capacity: int | None = None,
) -> RoutingPlan:
    """Sort the (T, K) assignments by expert, keeping token order within each expert."""
    T, K = expert_indices.shape
    # shape: (T * K,)
    flat_experts = expert_indices.reshape(-1)
    if token_mask is not None:
        # Masked tokens get the sentinel expert E, which sorts last and is cut off below.
        keep_token = token_mask.reshape(T, 1).expand(T, K).reshape(-1)
        flat_experts = torch.where(keep_token, flat_experts, num_experts)
    sorted_experts, row_ids = torch.sort(flat_experts, stable=True)
    group_sizes = torch.bincount(flat_experts, minlength=num_experts + 1)[:num_experts]
    if token_mask is not None:
        # NOTE: data-dependent output size; slicing by a tensor length syncs with the host.
        num_real = int(group_sizes.sum())
        row_ids = row_ids[:num_real]
        sorted_experts = sorted_experts[:num_real]

    num_dropped = torch.zeros((), dtype=torch.int64, device=expert_indices.device)
    if capacity is not None:
        # Position of each row within its expert's group; rows at or past capacity drop.
        group_starts = torch.cumsum(group_sizes, 0) - group_sizes
        position = torch.arange(row_ids.numel(), device=row_ids.device)
        position = position - group_starts[sorted_experts]
        keep = position < capacity
        # NOTE: data-dependent output size (host sync).
        row_ids = row_ids[keep]
        clipped = group_sizes.clamp(max=capacity)
        num_dropped = (group_sizes - clipped).sum()
        group_sizes = clipped
    return RoutingPlan(row_ids=row_ids, group_sizes=group_sizes, num_dropped=num_dropped)


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts stored stacked: out = (silu(x W_gate) * (x W_up)) W_down per expert."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden = hidden
        # Columns [:H] are the gate projection, [H:] the up projection.
        self.gate_up_weight = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def forward(
        self, routed_input: torch.Tensor, group_sizes: torch.Tensor, backend: ExpertBackend
    ) -> torch.Tensor:
        # shape: (N, 2H)
        gate_up = backend.grouped_mm(routed_input, self.gate_up_weight, group_sizes)
        gate, up = gate_up.chunk(2, dim=-1)
        # shape: (N, H)
        hidden = F.silu(gate) * up
        # shape: (N, D)
        return backend.grouped_mm(hidden, self.down_weight, group_sizes)


class SwiGLU(nn.Module):
    """A dense SwiGLU feed-forward block without biases (the shared expert)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoELayer(nn.Module):
    """Top-k token-choice routing over E SwiGLU experts, dropless unless a capacity is set."""

    def __init__(self, config: MoEConfig, d_model: int):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router = TopKRouter(config, d_model)
        self.experts = SwiGLUExperts(config.num_experts, d_model, config.expert_hidden)
        self.shared_expert = (
            SwiGLU(d_model, config.shared_expert_hidden)
            if config.shared_expert_hidden > 0
            else None
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) truncated at 3 std for the router, expert and shared weights."""
        for param in self.parameters():
            torch.nn.init.trunc_normal_(param, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def capacity(self, num_tokens: int) -> int | None:
        """Rows each expert may take in capacity mode: ceil(cf * T * K / E)."""
        if self.config.capacity_factor is None:
            return None
        return math.ceil(self.config.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _can_fuse(self, backend: ExpertBackend, x: torch.Tensor) -> bool:
        """Return whether `backend.routed_swiglu` may replace permute, experts and unpermute.

        Only for the plain `SwiGLUExperts` (expert parallelism swaps in a module with its
        own forward) and outside autocast, where the unfused path casts per operation.
        """
        return (
            hasattr(backend, "routed_swiglu")
            and type(self.experts) is SwiGLUExperts
            and not torch.is_autocast_enabled(x.device.type)
        )

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> MoEOutput:
        """Route `x` (..., D); `token_mask` (...) is True for real tokens, False for padding."""
        input_shape = x.shape
        # shape: (T, D)
        x = x.reshape(-1, input_shape[-1])
        mask = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)

        # 1. route
        route = self.router(x)
        counts = tokens_per_expert(route.expert_indices, self.num_experts, mask)
        lb_loss = load_balancing_loss(route.probs, counts, self.top_k, mask)
        z_loss = router_z_loss(route.logits, mask)
        if self.config.z_loss_divide_by_top_k:
            z_loss = z_loss / self.top_k

        # 2. plan
        num_real = x.shape[0] if mask is None else None
        if num_real is None and self.config.capacity_factor is not None:
            # NOTE: host sync to size the capacity on real tokens only.
            num_real = int(mask.sum())
        plan = build_routing_plan(
            route.expert_indices, self.num_experts, mask, self.capacity(num_real or 0)
        )
        backend = get_backend(self.config.backend, x.device)

        # 3-5. permute, experts, unpermute
        if self._can_fuse(backend, x):
            # shape: (T, D), the same three steps fused per expert by the backend
            out = backend.routed_swiglu(
                x,
                plan.row_ids,
                plan.group_sizes,
                route.combine_weights,
                self.experts.gate_up_weight,
                self.experts.down_weight,
            )
        else:
            # shape: (N, D)
            routed_input = backend.permute(x, plan.row_ids, self.top_k)
            routed_output = self.experts(routed_input, plan.group_sizes, backend)
            # shape: (T, D)
            out = backend.unpermute(routed_output, plan.row_ids, route.combine_weights)

        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return MoEOutput(
            hidden=out.to(x.dtype).reshape(input_shape),
            lb_loss=lb_loss,
            z_loss=z_loss,
            tokens_per_expert=counts,
            num_dropped=plan.num_dropped,
            router=route,
        )
