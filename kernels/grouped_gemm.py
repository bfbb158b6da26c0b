"""Grouped GEMM: rows of group e of `x` times `w[e]`, with a grouped backward.

In this file N, K and M are the GEMM's sizes, not the MoE dims (K is not top-k). `x` is
(N, K) with rows sorted by group, `w` is (E, K, M), and `group_sizes` is (E,) and sums to N.
The output is (N, M). In the MoE layer, N = routed rows, K = D or H and M = 2H or D.

Three launches make up forward and backward:
    out = x_e @ w[e]        `_grouped_mm_kernel`
    dX  = dY_e @ w[e]^T     the same kernel on a transposed view of w (no copy)
    dW[e] = x_e^T @ dY_e    `_grouped_mm_weight_grad_kernel`, exactly zero for empty groups

All three accumulate in fp32 and are deterministic: every output element is written by one
program, which sums over K (or over the group's rows) in a fixed order, without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.autotune import (
    benchmark,
    grouped_mm_configs,
    grouped_mm_weight_grad_configs,
    prune_grouped_mm_configs,
    prune_weight_grad_configs,
)
from kernels.device import check_kernel_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -----------------------------------------------------------------------------
# kernels


@triton.autotune(
    configs=grouped_mm_configs(),
    # stride_wk separates the forward (w row-major) from dX (w transposed, stride 1).
    key=["N_BUCKET", "K", "M", "stride_wk"],
    prune_configs_by={"early_config_prune": prune_grouped_mm_configs},
    do_bench=benchmark,
)
@triton.jit
def _grouped_mm_kernel(
    # x: (N, K) rows sorted by group; w: (E, K, M) through strides; out: (N, M).
    # dtype: x and w fp32, fp16 or bf16 (the same), out the same, fp32 accumulation.
    x_ptr,
    w_ptr,
    out_ptr,
    # group_offsets: (E + 1,) int64, rows of group e are [offsets[e], offsets[e + 1]).
    group_offsets_ptr,
    # sizes
    K,
    M,
    E,
    N_BUCKET,  # next power of two >= N; only an autotune key
    # strides
    stride_xn,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wm,
    stride_on,
    stride_om,
    # meta-parameters
    BLOCK_E: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (row tile, M tile). Row tiles never straddle groups: group e owns
    # cdiv(size_e, BLOCK_N) tiles, so the grid has at most cdiv(N, BLOCK_N) + E row tiles
    # and the programs past the last real tile return at once.
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    tile = pid // num_m_tiles
    pid_m = pid % num_m_tiles

    # -----------------------------------------------------------------------------
    # find the group that owns row tile `tile`
    experts = tl.arange(0, BLOCK_E)
    in_range = experts < E
    starts = tl.load(group_offsets_ptr + experts, mask=in_range, other=0)
    ends = tl.load(group_offsets_ptr + experts + 1, mask=in_range, other=0)
    tiles_per_group = tl.cdiv(ends - starts, BLOCK_N)
    tiles_end = tl.cumsum(tiles_per_group, 0)
    group = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    if group >= E:
        return
    is_group = experts == group
    first_tile = tl.sum(tl.where(is_group, tiles_end - tiles_per_group, 0), 0)
    row_start = tl.sum(tl.where(is_group, starts, 0), 0) + (tile - first_tile) * BLOCK_N
    row_end = tl.sum(tl.where(is_group, ends, 0), 0)

    # -----------------------------------------------------------------------------
    # pointer blocks: x rows (BLOCK_N, BLOCK_K) and w[group] columns (BLOCK_K, BLOCK_M)
    rows = row_start + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_mask = rows < row_end
    col_mask = cols < M
    x_ptrs = x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk
    w_ptrs = (
        w_ptr
        + group.to(tl.int64) * stride_we
        + offs_k[:, None] * stride_wk
        + cols[None, :] * stride_wm
    )

    # -----------------------------------------------------------------------------
    # K loop
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k_start
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    out_ptrs = out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_om
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=grouped_mm_weight_grad_configs(),
    key=["N_BUCKET", "K", "M"],
    prune_configs_by={"early_config_prune": prune_weight_grad_configs},
    do_bench=benchmark,
)
@triton.jit
def _grouped_mm_weight_grad_kernel(
    # x: (N, K) rows sorted by group; dy: (N, M); dw: (E, K, M).
    # dtype: x and dy the same (fp32, fp16 or bf16), dw the same, fp32 accumulation.
    x_ptr,
    dy_ptr,
    dw_ptr,
    # group_offsets: (E + 1,) int64
    group_offsets_ptr,
    # sizes
    K,
    M,
    N_BUCKET,  # next power of two >= N; only an autotune key
    # strides
    stride_xn,
    stride_xk,
    stride_dyn,
    stride_dym,
    stride_dwe,
    stride_dwk,
    stride_dwm,
    # meta-parameters
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (K tile, M tile) of dW[group]; it loops over the group's rows, so an
    # empty group runs the loop zero times and stores exact zeros.
    # NOTE: the work per program is proportional to the group size, so with skewed routing
    # the programs of the largest group finish last (no split over rows).
    pid = tl.program_id(0)
    group = tl.program_id(1)
    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid_k = pid // num_m_tiles
    pid_m = pid % num_m_tiles

    row_start = tl.load(group_offsets_ptr + group)
    row_end = tl.load(group_offsets_ptr + group + 1)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    k_mask = offs_k < K
    col_mask = cols < M
    # x rows (BLOCK_N, BLOCK_K) and dY rows (BLOCK_N, BLOCK_M) of this group
    rows = row_start + offs_n
    x_ptrs = x_ptr + rows[:, None] * stride_xn + offs_k[None, :] * stride_xk
    dy_ptrs = dy_ptr + rows[:, None] * stride_dyn + cols[None, :] * stride_dym

    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    num_steps = tl.cdiv(row_end - row_start, BLOCK_N)
    for step in range(0, num_steps):
        row_mask = offs_n < row_end - row_start - step * BLOCK_N
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(dy_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_N * stride_xn
        dy_ptrs += BLOCK_N * stride_dyn

    dw_ptrs = (
        dw_ptr
        + group.to(tl.int64) * stride_dwe
        + offs_k[:, None] * stride_dwk
        + cols[None, :] * stride_dwm
    )
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


# -----------------------------------------------------------------------------
# launchers (inputs already validated)


def _input_precision(dtype: torch.dtype) -> str:
    """Use TF32 for fp32 inputs only where torch.mm would (torch.backends.cuda.matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_grouped_mm(x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor):
    """out[rows of e] = x[rows of e] @ w[e]; `w` may be any strided (E, K, M) view."""
    N, K = x.shape
    E, _, M = w.shape
    out = x.new_empty(N, M)
    if N == 0 or M == 0:
        return out
    if K == 0:
        return out.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * (triton.cdiv(N, meta["BLOCK_N"]) + E),)

    _grouped_mm_kernel[grid](
        x,
        w,
        out,
        group_offsets,
        K,
        M,
        E,
        triton.next_power_of_2(N),
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        BLOCK_E=max(triton.next_power_of_2(E), 2),
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return out


def _launch_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, group_offsets: torch.Tensor):
    """dW[e] = x[rows of e]^T @ grad_out[rows of e] for every e, zeros for empty groups."""
    N, K = x.shape
    M = grad_out.shape[1]
    E = group_offsets.numel() - 1
    if N == 0 or K == 0 or M == 0:
        # Triton cannot take a pointer to an empty CUDA tensor; every group is empty anyway.
        return x.new_zeros(E, K, M)
    grad_w = x.new_empty(E, K, M)

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(M, meta["BLOCK_M"]), E)

    _grouped_mm_weight_grad_kernel[grid](
        x,
        grad_out,
        grad_w,
        group_offsets,
        K,
        M,
        triton.next_power_of_2(N),
        x.stride(0),
        x.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        grad_w.stride(0),
        grad_w.stride(1),
        grad_w.stride(2),
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    return grad_w


class _GroupedMMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, group_offsets: torch.Tensor):
        ctx.save_for_backward(x, w, group_offsets)
        return _launch_grouped_mm(x, w, group_offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w, group_offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # shape: (N, M) @ (E, M, K) per group -> (N, K)
            grad_x = _launch_grouped_mm(grad_out, w.transpose(1, 2), group_offsets)
        if ctx.needs_input_grad[1]:
            grad_w = _launch_weight_grad(x, grad_out, group_offsets)
        return grad_x, grad_w, None


# -----------------------------------------------------------------------------
# public API


def validate_grouped_mm_inputs(
    x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """Raise ValueError unless the inputs form a valid grouped GEMM; return the group offsets.

    The offsets are (E + 1,) int64 on x's device: offsets[e] is the first row of group e.
    """
    shapes = (
        f"x {tuple(x.shape)} {x.dtype} on {x.device}, w {tuple(w.shape)} {w.dtype} on "
        f"{w.device}, group_sizes {tuple(group_sizes.shape)} {group_sizes.dtype} on "
        f"{group_sizes.device}"
    )
    if x.dim() != 2 or w.dim() != 3 or group_sizes.dim() != 1:
        raise ValueError(
            f"grouped_mm: expected x (N, K), w (E, K, M) and group_sizes (E,); got {shapes}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"grouped_mm: x dtype {x.dtype} is not supported; use fp32, fp16 or bf16")
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_mm: x and w must have the same dtype; got {shapes}")
    if group_sizes.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"grouped_mm: group_sizes must be int64 or int32; got {shapes}")
    if w.device != x.device or group_sizes.device != x.device:
        raise ValueError(f"grouped_mm: x, w and group_sizes must be on one device; got {shapes}")
    check_kernel_device(x.device, "grouped_mm")
    if x.shape[1] != w.shape[1] or w.shape[0] != group_sizes.shape[0]:
        raise ValueError(
            f"grouped_mm: x's K must equal w's K and w's E must equal len(group_sizes); "
            f"got {shapes}"
        )
    if not x.is_contiguous() or not w.is_contiguous():
        raise ValueError(
            f"grouped_mm: x and w must be contiguous (call .contiguous() first); got {shapes} "
            f"with strides {x.stride()} and {w.stride()}"
        )
    if group_sizes.numel() == 0:
        raise ValueError(f"grouped_mm: group_sizes must have at least one group; got {shapes}")
    # NOTE: device-to-host sync: one read of (min size, total rows) to check the values.
    min_size, total = torch.stack([group_sizes.min(), group_sizes.sum()]).tolist()
    if min_size < 0:
        raise ValueError(
            f"grouped_mm: group sizes must be non-negative; got min {min_size} in "
            f"{group_sizes.tolist()}"
        )
    if total != x.shape[0]:
        raise ValueError(
            f"grouped_mm: group sizes sum to {total} but x has N={x.shape[0]} rows; {shapes}"
        )
    group_offsets = torch.zeros(group_sizes.numel() + 1, dtype=torch.int64, device=x.device)
    group_offsets[1:] = torch.cumsum(group_sizes.to(torch.int64), 0)
    return group_offsets


def grouped_mm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Multiply the rows of each group of `x` by that group's weight matrix.

    Args:
        x: (N, K) fp32, fp16 or bf16, contiguous, rows sorted by group.
        w: (E, K, M) the same dtype and device, contiguous.
        group_sizes: (E,) int64 or int32 on the same device, non-negative, summing to N.
            Empty groups are allowed, and their weight gradient is exactly zero.

    Returns:
        (N, M) in x's dtype. Differentiable in x and w.

    Raises:
        ValueError: on a dtype, device, contiguity or shape mismatch, or invalid group sizes.
    """
    group_offsets = validate_grouped_mm_inputs(x, w, group_sizes)
    return _GroupedMMFunction.apply(x, w, group_offsets)


def grouped_mm_reference(
    x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor
) -> torch.Tensor:
    """Compute the grouped GEMM with one fp32 `torch.mm` per group (slow, obvious)."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float32, device=x.device)
    start = 0
    for e, size in enumerate(group_sizes.tolist()):
        out[start : start + size] = x[start : start + size].float() @ w[e].float()
        start += size
    return out
