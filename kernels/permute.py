"""Token permutation: gather each token's K copies into expert order and combine them back.

Dims: T = tokens, K = top-k, E = experts, D = feature width, N = routed rows (T * K when
nothing is dropped). A slot is a flattened assignment index t * K + k.

    routed = permute_rows(x, row_ids, K)         # routed[r] = x[row_ids[r] // K]
    out    = unpermute(y, row_ids, weights)      # out[t] = sum_k weights[t, k] * y[inverse[t*K+k]]

`row_ids` (N,) lists the slot of each routed row, grouped by expert. `inverse` (T * K,) maps
a slot back to its routed row, or -1 when the slot was dropped. The routing plan itself (a
stable sort of the slots by expert) runs in PyTorch, so its indices are exact.

All kernels are deterministic: each output element is written by one program, and the sum
over k runs in k order (no atomics).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.autotune import benchmark, combine_configs, row_gather_configs
from kernels.device import check_kernel_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -----------------------------------------------------------------------------
# kernels


@triton.autotune(configs=row_gather_configs(), key=["D"], do_bench=benchmark)
@triton.jit
def _gather_rows_kernel(
    # x: (T, D); out: (N, D) in x's dtype; row_ids: (N,) int64 slots t * TOP_K + k.
    x_ptr,
    out_ptr,
    row_ids_ptr,
    # sizes
    N,
    D,
    TOP_K,
    # strides (the feature stride is 1)
    stride_x,
    stride_out,
    # meta-parameters
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[r, :] = x[row_ids[r] // TOP_K, :], one program per (row block, column block)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < D)[None, :]
    tokens = tl.load(row_ids_ptr + rows, mask=row_mask, other=0) // TOP_K
    values = tl.load(x_ptr + tokens[:, None] * stride_x + cols[None, :], mask=mask)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, values, mask=mask)


@triton.autotune(configs=combine_configs(), key=["D", "TOP_K", "HAS_WEIGHTS"], do_bench=benchmark)
@triton.jit
def _combine_kernel(
    # y: (N, D) routed rows; out: (T, D) in y's dtype, fp32 accumulation.
    y_ptr,
    out_ptr,
    # inverse: (T * TOP_K,) int64 routed row of each slot, -1 for a dropped slot.
    inverse_ptr,
    # weights: (T, TOP_K) any float dtype, contiguous; unused unless HAS_WEIGHTS.
    weights_ptr,
    # sizes
    T,
    D,
    # strides (the feature stride is 1)
    stride_y,
    stride_out,
    # meta-parameters
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # out[t, :] = sum over k in order of weights[t, k] * y[inverse[t * TOP_K + k], :]
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < T
    col_mask = cols < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slots = tokens * TOP_K + k
        rows = tl.load(inverse_ptr + slots, mask=token_mask, other=-1)
        kept = rows >= 0
        values = tl.load(
            y_ptr + rows[:, None] * stride_y + cols[None, :],
            mask=kept[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_WEIGHTS:
            # Round the weight to y's dtype first, as the PyTorch backend does.
            weight = tl.load(weights_ptr + slots, mask=token_mask, other=0.0)
            weight = weight.to(y_ptr.dtype.element_ty).to(tl.float32)
            values = values * weight[:, None]
        acc += values
    out_ptrs = out_ptr + tokens[:, None] * stride_out + cols[None, :]
    tl.store(
        out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_mask[:, None] & col_mask[None, :]
    )


@triton.autotune(
    configs=row_gather_configs(), key=["D", "COMPUTE_GRAD_WEIGHTS"], do_bench=benchmark
)
@triton.jit
def _unpermute_backward_kernel(
    # grad_out: (T, D); y: (N, D); grad_y: (N, D) in y's dtype.
    grad_out_ptr,
    y_ptr,
    grad_y_ptr,
    # row_ids: (N,) int64 slots; weights: (T * TOP_K,) float; grad_weights: same dtype.
    row_ids_ptr,
    weights_ptr,
    grad_weights_ptr,
    # sizes
    N,
    D,
    TOP_K,
    # strides (the feature stride is 1)
    stride_grad_out,
    stride_y,
    stride_grad_y,
    # meta-parameters
    COMPUTE_GRAD_WEIGHTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # For each routed row r with slot s = row_ids[r] and token t = s // TOP_K:
    #     grad_y[r] = weights[s] * grad_out[t]
    #     grad_weights[s] = <grad_out[t], y[r]>
    # A program owns BLOCK_R whole rows and walks D in order, so the dot product needs no
    # cross-program reduction.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    slots = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
    tokens = slots // TOP_K
    weight = tl.load(weights_ptr + slots, mask=row_mask, other=0.0)
    weight = weight.to(y_ptr.dtype.element_ty).to(tl.float32)
    rows = rows.to(tl.int64)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        grad = tl.load(
            grad_out_ptr + tokens[:, None] * stride_grad_out + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        grad_y = grad * weight[:, None]
        tl.store(
            grad_y_ptr + rows[:, None] * stride_grad_y + cols[None, :],
            grad_y.to(grad_y_ptr.dtype.element_ty),
            mask=mask,
        )
        if COMPUTE_GRAD_WEIGHTS:
            values = tl.load(
                y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
            dot += tl.sum(grad * values, axis=1)
    if COMPUTE_GRAD_WEIGHTS:
        tl.store(grad_weights_ptr + slots, dot.to(grad_weights_ptr.dtype.element_ty), mask=row_mask)


# -----------------------------------------------------------------------------
# launchers (inputs already validated)


def _launch_gather_rows(x: torch.Tensor, row_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    N, D = row_ids.numel(), x.shape[1]
    out = x.new_empty(N, D)
    if N == 0 or D == 0:
        return out

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_R"]), triton.cdiv(D, meta["BLOCK_D"]))

    _gather_rows_kernel[grid](x, out, row_ids, N, D, top_k, x.stride(0), out.stride(0))
    return out


def _launch_combine(
    y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, T: int, top_k: int
) -> torch.Tensor:
    D = y.shape[1]
    if y.shape[0] == 0 or D == 0:
        # Every slot is dropped (or D is 0): the weighted sum is empty.
        return y.new_zeros(T, D)
    out = y.new_empty(T, D)
    if T == 0:
        return out

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(D, meta["BLOCK_D"]))

    _combine_kernel[grid](
        y,
        out,
        inverse,
        y if weights is None else weights,
        T,
        D,
        y.stride(0),
        out.stride(0),
        TOP_K=top_k,
        HAS_WEIGHTS=weights is not None,
    )
    return out


def _launch_unpermute_backward(
    grad_out: torch.Tensor,
    y: torch.Tensor,
    row_ids: torch.Tensor,
    weights: torch.Tensor,
    compute_grad_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = y.shape
    grad_y = y.new_empty(N, D)
    # Dropped slots have no routed row, so their weight gradient stays zero.
    grad_weights = torch.zeros_like(weights)
    if N == 0 or D == 0:
        return grad_y, grad_weights

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_R"]),)

    _unpermute_backward_kernel[grid](
        grad_out,
        y,
        grad_y,
        row_ids,
        weights,
        grad_weights,
        N,
        D,
        weights.shape[1],
        grad_out.stride(0),
        y.stride(0),
        grad_y.stride(0),
        COMPUTE_GRAD_WEIGHTS=compute_grad_weights,
    )
    return grad_y, grad_weights


class _PermuteRowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, row_ids: torch.Tensor, inverse: torch.Tensor, top_k: int):
        ctx.save_for_backward(inverse)
        ctx.num_tokens = x.shape[0]
        ctx.top_k = top_k
        return _launch_gather_rows(x, row_ids, top_k)

    @staticmethod
    def backward(ctx, grad_routed: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        # shape: (T, D), the sum of each token's K copies (weights of 1)
        grad_x = _launch_combine(grad_routed.contiguous(), inverse, None, ctx.num_tokens, ctx.top_k)
        return grad_x, None, None, None


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        y: torch.Tensor,
        combine_weights: torch.Tensor,
        row_ids: torch.Tensor,
        inverse: torch.Tensor,
    ):
        ctx.save_for_backward(y, combine_weights, row_ids)
        T, K = combine_weights.shape
        return _launch_combine(y, inverse, combine_weights, T, K)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, combine_weights, row_ids = ctx.saved_tensors
        grad_y, grad_weights = _launch_unpermute_backward(
            grad_out.contiguous(), y, row_ids, combine_weights, ctx.needs_input_grad[1]
        )
        if not ctx.needs_input_grad[1]:
            grad_weights = None
        return grad_y, grad_weights, None, None


# -----------------------------------------------------------------------------
# validation


def _check_rows(op: str, name: str, tensor: torch.Tensor, device: torch.device) -> None:
    description = f"{name} {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
    if tensor.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D; got {description}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: {description} is not supported; use fp32, fp16 or bf16")
    if tensor.device != device:
        raise ValueError(f"{op}: {description} must be on {device} like row_ids")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{op}: {description} must be contiguous (call .contiguous() first); "
            f"strides {tensor.stride()}"
        )


def inverse_permutation(row_ids: torch.Tensor, num_slots: int, op: str) -> torch.Tensor:
    """Validate `row_ids` as distinct slots in [0, num_slots) and return the (num_slots,) inverse.

    inverse[s] is the routed row of slot s, or -1 when no row contains it (a dropped slot).
    """
    description = f"row_ids {tuple(row_ids.shape)} {row_ids.dtype}"
    if row_ids.dim() != 1 or row_ids.dtype != torch.int64:
        raise ValueError(f"{op}: row_ids must be 1-D int64; got {description}")
    if not row_ids.is_contiguous():
        raise ValueError(f"{op}: row_ids must be contiguous; got strides {row_ids.stride()}")
    N = row_ids.numel()
    if N > num_slots:
        raise ValueError(f"{op}: {description} has more rows than the {num_slots} slots T * K")
    inverse = torch.full((num_slots,), -1, dtype=torch.int64, device=row_ids.device)
    if N == 0:
        return inverse
    # Out-of-range ids are clamped for the scatter and rejected below, before any kernel.
    inverse[row_ids.clamp(0, num_slots - 1)] = torch.arange(N, device=row_ids.device)
    # NOTE: device-to-host sync: one read of (min, max, slots filled) to check the values.
    low, high, filled = torch.stack([row_ids.min(), row_ids.max(), (inverse >= 0).sum()]).tolist()
    if low < 0 or high >= num_slots:
        raise ValueError(
            f"{op}: row_ids must lie in [0, T * K = {num_slots}); got min {low}, max {high}"
        )
    if filled != N:
        raise ValueError(f"{op}: row_ids must be distinct; {N - filled} of {N} are repeats")
    return inverse


# -----------------------------------------------------------------------------
# public API


class PermuteOutput(NamedTuple):
    """The routed rows of `permute` and the plan that maps them back."""

    routed: torch.Tensor
    """(N, D) token copies in expert order."""
    row_ids: torch.Tensor
    """(N,) int64 slot t * K + k of each routed row."""
    group_sizes: torch.Tensor
    """(E,) int64 routed rows per expert, summing to N."""


def routing_plan(expert_indices: torch.Tensor, num_experts: int):
    """Sort the (T, K) assignments by expert, keeping slot order within an expert.

    Returns `row_ids` (T * K,) int64 and `group_sizes` (E,) int64, both exact: the stable sort
    and the binary search of the group ends run in PyTorch without atomics.
    """
    if expert_indices.dim() != 2 or expert_indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"routing_plan: expert_indices must be (T, K) int64 or int32; got "
            f"{tuple(expert_indices.shape)} {expert_indices.dtype}"
        )
    # shape: (T * K,)
    flat_experts = expert_indices.reshape(-1).to(torch.int64)
    if flat_experts.numel() > 0:
        # NOTE: device-to-host sync to check that every index names an expert.
        low, high = torch.stack([flat_experts.min(), flat_experts.max()]).tolist()
        if low < 0 or high >= num_experts:
            raise ValueError(
                f"routing_plan: expert indices must lie in [0, {num_experts}); "
                f"got min {low}, max {high}"
            )
    sorted_experts, row_ids = torch.sort(flat_experts, stable=True)
    experts = torch.arange(num_experts, device=flat_experts.device)
    group_ends = torch.searchsorted(sorted_experts, experts, right=True)
    group_sizes = torch.diff(group_ends, prepend=group_ends.new_zeros(1))
    return row_ids, group_sizes


def permute_rows(x: torch.Tensor, row_ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gather `x[row_ids // top_k]` into a new (N, D) tensor; differentiable in x.

    Raises:
        ValueError: on a dtype, device, contiguity or shape mismatch, or invalid row ids.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"permute_rows: top_k must be a positive int; got {top_k!r}")
    _check_rows("permute_rows", "x", x, row_ids.device)
    check_kernel_device(x.device, "permute_rows")
    inverse = inverse_permutation(row_ids, x.shape[0] * top_k, "permute_rows")
    return _PermuteRowsFunction.apply(x, row_ids, inverse, top_k)


def permute(
    x: torch.Tensor, expert_indices: torch.Tensor, num_experts: int | None = None
) -> PermuteOutput:
    """Gather each token's K copies into expert order.

    Args:
        x: (T, D) fp32, fp16 or bf16, contiguous.
        expert_indices: (T, K) int64 or int32 expert of each of a token's K assignments.
        num_experts: E. None reads max(expert_indices) + 1 (a device-to-host sync).

    Returns:
        `PermuteOutput(routed, row_ids, group_sizes)`, with `routed` differentiable in x.
    """
    if expert_indices.dim() != 2 or expert_indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"permute: expert_indices must be (T, K) with T = x.shape[0]; got x "
            f"{tuple(x.shape)} and expert_indices {tuple(expert_indices.shape)}"
        )
    if expert_indices.device != x.device:
        raise ValueError(
            f"permute: x on {x.device} and expert_indices on {expert_indices.device} must "
            "be on one device"
        )
    if num_experts is None:
        # NOTE: device-to-host sync: E is read from the data.
        num_experts = int(expert_indices.max()) + 1 if expert_indices.numel() > 0 else 1
    row_ids, group_sizes = routing_plan(expert_indices, num_experts)
    routed = permute_rows(x, row_ids, expert_indices.shape[1])
    return PermuteOutput(routed=routed, row_ids=row_ids, group_sizes=group_sizes)


def unpermute(
    y: torch.Tensor, row_ids: torch.Tensor, combine_weights: torch.Tensor
) -> torch.Tensor:
    """Sum each token's routed rows weighted by its combine weights, in k order.

    Args:
        y: (N, D) fp32, fp16 or bf16, contiguous: routed rows in the order of `row_ids`.
        row_ids: (N,) int64 distinct slots t * K + k; slots absent from it count as zero rows.
        combine_weights: (T, K) float, contiguous, on y's device. The weights are rounded to
            y's dtype before the multiply, and the sum accumulates in fp32.

    Returns:
        (T, D) in y's dtype. Differentiable in y and combine_weights.
    """
    _check_rows("unpermute", "y", y, row_ids.device)
    if combine_weights.dim() != 2 or not combine_weights.dtype.is_floating_point:
        raise ValueError(
            f"unpermute: combine_weights must be a (T, K) float tensor; got "
            f"{tuple(combine_weights.shape)} {combine_weights.dtype}"
        )
    if combine_weights.device != y.device or not combine_weights.is_contiguous():
        raise ValueError(
            f"unpermute: combine_weights must be contiguous and on {y.device} like y; got "
            f"{combine_weights.device} with strides {combine_weights.stride()}"
        )
    if y.shape[0] != row_ids.numel():
        raise ValueError(
            f"unpermute: y {tuple(y.shape)} must have one row per row id; got "
            f"{row_ids.numel()} row ids"
        )
    check_kernel_device(y.device, "unpermute")
    T, K = combine_weights.shape
    inverse = inverse_permutation(row_ids, T * K, "unpermute")
    return _UnpermuteFunction.apply(y, combine_weights, row_ids, inverse)


# -----------------------------------------------------------------------------
# references


def permute_reference(x: torch.Tensor, expert_indices: torch.Tensor, num_experts: int):
    """Build the routed rows with Python loops: experts in order, then slots in order."""
    T, K = expert_indices.shape
    slots = []
    group_sizes = []
    for e in range(num_experts):
        slots_of_e = [t * K + k for t in range(T) for k in range(K) if expert_indices[t, k] == e]
        slots.extend(slots_of_e)
        group_sizes.append(len(slots_of_e))
    row_ids = torch.tensor(slots, dtype=torch.int64, device=x.device)
    routed = torch.stack([x[s // K] for s in slots]) if slots else x.new_zeros(0, x.shape[1])
    group_sizes = torch.tensor(group_sizes, dtype=torch.int64, device=x.device)
    return PermuteOutput(routed=routed, row_ids=row_ids, group_sizes=group_sizes)


def unpermute_reference(
    y: torch.Tensor, row_ids: torch.Tensor, combine_weights: torch.Tensor
) -> torch.Tensor:
    """Scatter-add the routed rows back in fp32 with a Python loop over rows."""
    T, K = combine_weights.shape
    weights = combine_weights.to(y.dtype).float()
    out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    for r, slot in enumerate(row_ids.tolist()):
        out[slot // K] += weights[slot // K, slot % K] * y[r].float()
    return out
