"""The mixture-of-experts layer: router, dispatch, experts and auxiliary losses."""

from olmoe.moe.backend import (
    ExpertBackend,
    TorchBackend,
    get_backend,
    register_backend,
    release_cached_blocks,
)
from olmoe.moe.layer import MoELayer, MoEOutput, RoutingPlan, build_routing_plan
from olmoe.moe.losses import load_balancing_loss, router_z_loss, tokens_per_expert
from olmoe.moe.router import RouterOutput, TopKRouter, select_top_k

__all__ = [
    "ExpertBackend",
    "MoELayer",
    "MoEOutput",
    "RouterOutput",
    "RoutingPlan",
    "TopKRouter",
    "TorchBackend",
    "build_routing_plan",
    "get_backend",
    "load_balancing_loss",
    "register_backend",
    "release_cached_blocks",
    "router_z_loss",
    "select_top_k",
    "tokens_per_expert",
]
