"""Expert parallelism: each rank of an expert-parallel (EP) group stores E / ep experts per
layer, and an all-to-all sends each routed row to the rank storing its expert and back.

Dims: E = experts, D = d_model, H = expert hidden, ep = ranks in the EP group,
L = E / ep local experts per rank, N = routed rows this rank sends (rows of its own tokens),
R = rows this rank receives for its local experts.

The model code knows nothing of this: `apply_expert_parallel` swaps each
`SwiGLUExperts` for an `ExpertParallelExperts` with the same forward contract.
The local weights are DTensors sharded on dim 0 over the EP mesh, so their global shape
stays (E, D, 2H) and (E, H, D): `model.state_dict()`, torch.distributed.checkpoint and
FSDP2 all see whole, ep-independent expert tensors.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from olmoe.moe.backend import ExpertBackend
from olmoe.moe.layer import SwiGLUExperts

logger = logging.getLogger(__name__)


class _AllToAllRows(torch.autograd.Function):
    """Differentiable `all_to_all_single` over rows with uneven splits.

    The backward sends each row's gradient back to where the row came from: the same
    all-to-all with input and output splits swapped.
    """

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in,
            grad_out.contiguous(),
            ctx.input_splits,
            ctx.output_splits,
            group=ctx.group,
        )
        return grad_in, None, None, None


def all_to_all_rows(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Send `x[rows of split i]` to rank i of `group`; return the received rows by source rank."""
    return _AllToAllRows.apply(x, output_splits, input_splits, group)


def local_expert_positions(recv_counts: torch.Tensor) -> torch.Tensor:
    """Map each received row to its row once rows are grouped by local expert.

    `recv_counts` (ep, L) contains the rows received from source rank s for local expert j.
    The all-to-all delivers rows in (source, expert) block order; the grouped GEMM needs
    (expert, source) block order. Rows keep their order inside a block, so the regroup is
    stable and exact: `grouped[positions[i]] = received[i]`.
    """
    ep, L = recv_counts.shape
    # shape: (ep * L,) block sizes in received (source, expert) order
    block_sizes = recv_counts.reshape(-1)
    received_starts = torch.cumsum(block_sizes, 0) - block_sizes
    # shape: (L * ep,) block sizes in grouped (expert, source) order
    grouped_sizes = recv_counts.t().reshape(-1)
    grouped_starts = torch.cumsum(grouped_sizes, 0) - grouped_sizes
    # shape: (ep * L,) the grouped start of each block, indexed in received order
    grouped_starts = grouped_starts.view(L, ep).t().reshape(-1)

    num_rows = int(block_sizes.sum())
    block_ids = torch.repeat_interleave(
        torch.arange(ep * L, device=recv_counts.device), block_sizes, output_size=num_rows
    )
    # shape: (R,)
    offset_in_block = torch.arange(num_rows, device=recv_counts.device) - received_starts[block_ids]
    return grouped_starts[block_ids] + offset_in_block


class ExpertParallelExperts(nn.Module):
    """The L = E / ep SwiGLU experts of one EP rank, with the `SwiGLUExperts` forward contract.

    `forward(routed_input (N, D), group_sizes (E,), backend) -> (N, D)` takes this rank's
    rows sorted by global expert and returns their expert outputs in the same order.
    """

    def __init__(self, experts: SwiGLUExperts, ep_mesh: DeviceMesh):
        super().__init__()
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh must be 1-D, got a mesh of shape {tuple(ep_mesh.shape)}")
        ep = ep_mesh.size()
        E = experts.num_experts
        if E % ep != 0:
            raise ValueError(
                f"parallelism.ep={ep} is invalid: must divide moe.num_experts={E}; "
                "choose an ep that divides the number of experts"
            )
        L = E // ep
        ep_rank = ep_mesh.get_local_rank()
        self.num_experts = E
        self.num_local_experts = L
        self.hidden = experts.hidden
        self.ep_mesh = ep_mesh
        self.global_expert_ids: tuple[int, ...] = tuple(range(ep_rank * L, (ep_rank + 1) * L))
        """Global ids of the experts stored on this rank, in local order."""

        first = ep_rank * L
        self.gate_up_weight = nn.Parameter(
            self._shard(experts.gate_up_weight, first, L), requires_grad=True
        )
        self.down_weight = nn.Parameter(
            self._shard(experts.down_weight, first, L), requires_grad=True
        )

    def _shard(self, full: torch.Tensor, first: int, count: int) -> DTensor:
        # A fresh copy, so the full module's storage can be freed after the swap.
        local = full.detach()[first : first + count].clone()
        return DTensor.from_local(local, self.ep_mesh, [Shard(0)], run_check=False)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, global_expert_ids={list(self.global_expert_ids)}, "
            f"ep={self.ep_mesh.size()}"
        )

    def forward(
        self, routed_input: torch.Tensor, group_sizes: torch.Tensor, backend: ExpertBackend
    ) -> torch.Tensor:
        # Plan:
        #   1. rows per destination rank from the per-expert counts
        #   2. all-to-all the per-expert counts, so each rank learns how many rows it
        #      receives from each source rank for each of its local experts
        #   3. all-to-all the rows with uneven splits (differentiable)
        #   4. regroup the received rows by local expert (a stable, exact permutation)
        #   5. grouped SwiGLU over the local experts
        #   6. undo the regroup and all-to-all the outputs back to their source ranks
        group = self.ep_mesh.get_group()
        ep, L = self.ep_mesh.size(), self.num_local_experts

        # 1. rows per destination rank
        # shape: (ep,)
        send_counts = group_sizes.view(ep, L).sum(1)

        # 2. exchange the counts: recv_counts[s, j] = rows from rank s for local expert j
        # shape: (ep * L,) -> (ep, L)
        recv_counts = torch.empty_like(group_sizes)
        dist.all_to_all_single(recv_counts, group_sizes.contiguous(), group=group)
        recv_counts = recv_counts.view(ep, L)

        # 3. exchange the rows
        # NOTE: device-to-host sync: the all-to-all needs its split sizes on the host, and
        # the received row count R is data-dependent.
        input_splits = send_counts.tolist()
        output_splits = recv_counts.sum(1).tolist()
        # shape: (R, D), in (source rank, local expert) block order
        received = all_to_all_rows(routed_input, output_splits, input_splits, group)

        # 4. regroup by local expert
        # shape: (R,)
        positions = local_expert_positions(recv_counts)
        order = torch.empty_like(positions)
        order[positions] = torch.arange(positions.numel(), device=positions.device)
        # shape: (R, D), in (local expert, source rank) block order
        grouped_input = received.index_select(0, order)
        # shape: (L,)
        local_group_sizes = recv_counts.sum(0)

        # 5. local grouped SwiGLU
        gate_up_weight, down_weight = self._local_weights()
        # shape: (R, 2H)
        gate_up = backend.grouped_mm(grouped_input, gate_up_weight, local_group_sizes)
        gate, up = gate_up.chunk(2, dim=-1)
        # shape: (R, H)
        hidden = F.silu(gate) * up
        # shape: (R, D)
        grouped_output = backend.grouped_mm(hidden, down_weight, local_group_sizes)

        # 6. undo the regroup and send the outputs home
        # shape: (R, D), in received order
        received_output = grouped_output.index_select(0, positions)
        # shape: (N, D), in this rank's expert-sorted order
        return all_to_all_rows(received_output, input_splits, output_splits, group)

    def _local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        # (L, D, 2H) and (L, H, D); `to_local` is differentiable, so the gradient lands on
        # the DTensor parameter with the same Shard(0) layout.
        weights = []
        for weight in (self.gate_up_weight, self.down_weight):
            weights.append(weight.to_local() if isinstance(weight, DTensor) else weight)
        return weights[0], weights[1]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Replace every `SwiGLUExperts` in `model` by this rank's `ExpertParallelExperts` shard.

    EP rank r of `ep_mesh` keeps global experts [r * E / ep, (r + 1) * E / ep). Every rank
    must start from the same full weights (same seed or the same loaded checkpoint) beforehand.
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, SwiGLUExperts)
    ]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no SwiGLUExperts module to parallelize")
    for name, experts in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, ExpertParallelExperts(experts, ep_mesh))
    logger.info(
        "expert parallelism over %d ranks: %d expert modules, experts %s on this rank",
        ep_mesh.size(),
        len(targets),
        list(model.get_submodule(targets[0][0]).global_expert_ids),
    )
