"""Gradient clipping on the global norm over all ranks and all expert shards.

Each gradient element may live on one rank (FSDP shards, expert-parallel shards) or be
replicated on several (plain data parallelism). Every rank sums the squares of its local
gradient elements divided by how many ranks hold a copy, then one all-reduce gives the
squared norm of the whole model's gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch.distributed.tensor import DTensor, Replicate

# Set by `olmoe.train.parallel` on parameters that are plain tensors but are not replicated
# on every rank (expert shards): the number of ranks holding the same values.
REPLICAS_ATTR = "_olmoe_replicas"


def _replicas(param: torch.Tensor, world_size: int) -> int:
    if hasattr(param, REPLICAS_ATTR):
        return int(getattr(param, REPLICAS_ATTR))
    if isinstance(param, DTensor):
        mesh_shape = param.device_mesh.shape
        count = 1
        for dim, placement in enumerate(param.placements):
            if isinstance(placement, Replicate):
                count *= mesh_shape[dim]
        return count
    return world_size


def global_grad_norm(parameters) -> torch.Tensor:
    """L2 norm of all gradients as if the model were on one device (fp32, a 0-dim tensor)."""
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = None
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        square_sum = local.float().square().sum() / _replicas(param, world_size)
        total = square_sum if total is None else total + square_sum
    if total is None:
        total = torch.zeros(())
    if world_size > 1:
        # NOTE: one all-reduce per step; every rank must reach this point.
        dist.all_reduce(total)
    return total.sqrt()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global norm is at most `max_norm`; return the norm
    before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(parameters)
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        for param in parameters:
            param.grad.mul_(
                scale.to(param.grad.dtype) if not isinstance(param.grad, DTensor) else float(scale)
            )
    return norm


class GlobalGradClip(Algorithm):
    """Clip (or, with max_norm None, only measure) the global gradient norm after backward."""

    def __init__(self, max_norm: float | None):
        self.max_norm = max_norm
        self.last_norm = math.nan

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        params = list(state.model.parameters())
        if self.max_norm is None:
            norm = global_grad_norm(params)
        else:
            norm = clip_grad_norm(params, self.max_norm)
        self.last_norm = float(norm)
        logger.log_metrics({"train/grad_norm": self.last_norm})
