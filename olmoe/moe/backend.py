"""Expert-computation backends: gather rows into expert order, grouped GEMM, weighted scatter.

Dims used throughout the MoE code:
    T = tokens, E = experts, K = top-k, D = d_model, H = expert hidden,
    N = routed rows (T * K when nothing is dropped).

The MoE layer computes a routing plan (which flattened assignment t * K + k lands in
which row of the expert-sorted buffer) and then calls three operations on a backend:

    routed = backend.permute(x, row_ids, top_k)              # (N, D)  = x[row_ids // K]
    out    = backend.grouped_mm(routed, w, group_sizes)      # rows of group e times w[e]
    y      = backend.unpermute(out, row_ids, combine_weights)  # (T, D)

`row_ids` is (N,) int64: the flattened assignment index of each sorted row, grouped by
expert in ascending expert order (rows of dropped assignments are absent).
`group_sizes` is (E,) int64 and sums to N. `combine_weights` is (T, K).
All three are differentiable. The PyTorch backend here is the reference and the CPU
default; the Triton backend (`kernels/`) implements the same contract.

A backend may also provide the optional fused operation

    y = backend.routed_swiglu(x, row_ids, group_sizes, combine_weights, w_gate_up, w_down)

which equals permute, grouped SwiGLU and unpermute in sequence up to rounding (the K
expert outputs of a token are summed in expert order rather than in k order). The MoE
layer calls it when present, except under autocast or when its experts module has been
replaced (expert parallelism).
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch


class ExpertBackend(Protocol):
    name: str

    def permute(self, x: torch.Tensor, row_ids: torch.Tensor, top_k: int) -> torch.Tensor: ...

    def grouped_mm(
        self, x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor
    ) -> torch.Tensor: ...

    def unpermute(
        self, y: torch.Tensor, row_ids: torch.Tensor, combine_weights: torch.Tensor
    ) -> torch.Tensor: ...


class _GroupedMM(torch.autograd.Function):
    """out[rows of group e] = x[rows of group e] @ w[e], with a grouped backward.

    Autograd through a Python loop of `w[e]` / `x[a:b]` would allocate a full-size
    gradient buffer per expert; this function writes every group's result into one
    preallocated output (and one dX, one dW) instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor):
        # NOTE: device-to-host sync: the loop needs the group sizes on the host.
        sizes = group_sizes.tolist()
        out = x.new_empty(x.shape[0], w.shape[2])
        for x_e, w_e, out_e in zip(x.split(sizes), w.unbind(0), out.split(sizes)):
            if x_e.shape[0] > 0:
                torch.mm(x_e, w_e, out=out_e)
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        sizes = ctx.sizes
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(x.shape)
            for g_e, w_e, gx_e in zip(grad_out.split(sizes), w.unbind(0), grad_x.split(sizes)):
                if g_e.shape[0] > 0:
                    torch.mm(g_e, w_e.t(), out=gx_e)
        if ctx.needs_input_grad[1]:
            grad_w = w.new_empty(w.shape)
            for x_e, g_e, gw_e in zip(x.split(sizes), grad_out.split(sizes), grad_w.unbind(0)):
                if x_e.shape[0] > 0:
                    torch.mm(x_e.t(), g_e, out=gw_e)
                else:
                    gw_e.zero_()
        return grad_x, grad_w, None


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor):
    """Slow, obvious reference: one matmul per group in fp32, concatenated."""
    outs = []
    start = 0
    for e, size in enumerate(group_sizes.tolist()):
        outs.append(x[start : start + size].float() @ w[e].float())
        start += size
    if not outs:
        return x.new_zeros(0, w.shape[2], dtype=torch.float32)
    return torch.cat(outs, dim=0)


class _Workspace(threading.local):
    """Scratch buffers of this thread, kept between calls and grown on demand.

    The per-expert loops below write every temporary into these buffers with `out=`,
    so they allocate nothing per expert. On CPU this avoids glibc's default behavior of
    trimming freed heap memory and mapping large blocks fresh, where each first touch of
    a page is a page fault (about 0.7 ms per MiB on the benchmark VM, see
    docs/benchmarks.md). Tensors that leave a call (outputs, saved activations,
    gradients) are never views of these buffers.

    NOTE: the buffers live as long as their thread: (3 D + 6 H) elements per row of the
    largest expert group seen, per dtype and device.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """Return a contiguous (rows, cols) view of the buffer `name`, growing it if needed."""
        key = (name, like.dtype, like.device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < rows * cols:
            buffer = like.new_empty(rows * cols)
            self.buffers[key] = buffer
        return buffer[: rows * cols].view(rows, cols)


_WORKSPACE = _Workspace()


class _RoutedSwiGLU(torch.autograd.Function):
    """Permute, grouped SwiGLU and weighted unpermute in one pass over the experts.

    For each expert in turn: gather its tokens, gate/up GEMM, silu(gate) * up, down GEMM,
    scale by the combine weights and `index_add_` into the (T, D) output. Each step works
    on one expert's rows while they are in cache, and no (N, D) buffer is ever built.
    Only the gate/up block of each expert is saved for the backward, as its own tensor.

    The backward recomputes silu(gate) * up from the saved gate/up block and gets the
    combine-weight gradient as <dL/d(hidden), hidden> for the unscaled expert output, so
    the (N, D) expert outputs are never stored.
    """

    @staticmethod
    def forward(ctx, x, combine_weights, gate_up_weight, down_weight, row_ids, group_sizes):
        # x: (T, D), combine_weights: (T, K), gate_up_weight: (E, D, 2H), down_weight: (E, H, D)
        T, K = combine_weights.shape
        D, H = x.shape[1], down_weight.shape[1]
        # NOTE: device-to-host sync: the loop needs the group sizes on the host.
        sizes = group_sizes.tolist()
        # shape: (N,) token of each expert-sorted row, and its combine weight
        token_ids = torch.div(row_ids, K, rounding_mode="floor")
        row_weights = combine_weights.reshape(-1).index_select(0, row_ids).to(x.dtype)

        # Scratch of the largest group's size: (n, D) rows, (n, H) hidden, (n, D) output.
        max_rows = max(sizes, default=0)
        x_buffer = _WORKSPACE.get("x_rows", max_rows, D, x)
        hidden_buffer = _WORKSPACE.get("hidden", max_rows, H, x)
        out_buffer = _WORKSPACE.get("expert_out", max_rows, D, x)

        out = x.new_zeros(x.shape)
        gate_up_blocks = []
        chunks = zip(token_ids.split(sizes), row_weights.split(sizes))
        for e, (tokens, weights) in enumerate(chunks):
            n = tokens.numel()
            if n == 0:
                continue
            x_rows = torch.index_select(x, 0, tokens, out=x_buffer[:n])
            # shape: (n, D) @ (D, 2H) -> (n, 2H), saved for the backward
            gate_up = torch.mm(x_rows, gate_up_weight[e])
            # shape: (n, H)
            hidden = torch.ops.aten.silu.out(gate_up[:, :H], out=hidden_buffer[:n])
            hidden.mul_(gate_up[:, H:])
            # shape: (n, H) @ (H, D) -> (n, D)
            expert_out = torch.mm(hidden, down_weight[e], out=out_buffer[:n])
            out.index_add_(0, tokens, expert_out.mul_(weights.unsqueeze(1)))
            gate_up_blocks.append(gate_up)

        ctx.save_for_backward(
            x, gate_up_weight, down_weight, token_ids, row_weights, row_ids, *gate_up_blocks
        )
        ctx.sizes = sizes
        ctx.combine_weights_meta = (combine_weights.shape, combine_weights.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, gate_up_weight, down_weight, token_ids, row_weights, row_ids, *gate_up_blocks = (
            ctx.saved_tensors
        )
        D, H = x.shape[1], down_weight.shape[1]
        sizes = ctx.sizes
        need_x, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()

        grad_x = torch.zeros_like(x) if need_x else None
        grad_gate_up = torch.empty_like(gate_up_weight) if need_gate_up else None
        grad_down = torch.empty_like(down_weight) if need_down else None
        # shape: (N,) gradient of each row's combine weight
        grad_row_weights = torch.zeros_like(row_weights)

        max_rows = max(sizes, default=0)
        rows_buffer = _WORKSPACE.get("grad_rows", max_rows, D, x)
        silu_buffer = _WORKSPACE.get("silu_gate", max_rows, H, x)
        hidden_buffer = _WORKSPACE.get("hidden", max_rows, H, x)
        grad_hidden_buffer = _WORKSPACE.get("grad_hidden", max_rows, H, x)
        product_buffer = _WORKSPACE.get("product", max_rows, H, x)
        grad_gate_up_buffer = _WORKSPACE.get("grad_gate_up", max_rows, 2 * H, x)

        blocks = iter(gate_up_blocks)
        chunks = zip(
            token_ids.split(sizes), row_weights.split(sizes), grad_row_weights.split(sizes)
        )
        for e, (tokens, weights, grad_weights) in enumerate(chunks):
            n = tokens.numel()
            if n == 0:
                if need_gate_up:
                    grad_gate_up[e].zero_()
                if need_down:
                    grad_down[e].zero_()
                continue
            gate_up = next(blocks)
            gate, up = gate_up[:, :H], gate_up[:, H:]
            weights = weights.unsqueeze(1)
            # shape: (n, H) recomputed activations
            silu_gate = torch.ops.aten.silu.out(gate, out=silu_buffer[:n])
            hidden = torch.mul(silu_gate, up, out=hidden_buffer[:n])
            # shape: (n, D) dL/d(out) at each row's token. Times w, it is the gradient of
            # the unscaled expert output.
            grad_rows = torch.index_select(grad_out, 0, tokens, out=rows_buffer[:n])
            # shape: (n, D) @ (D, H) -> (n, H), not yet scaled by w
            grad_hidden = torch.mm(grad_rows, down_weight[e].t(), out=grad_hidden_buffer[:n])
            product = product_buffer[:n]
            if need_weights:
                torch.sum(torch.mul(grad_hidden, hidden, out=product), dim=1, out=grad_weights)
            if need_down:
                torch.mm(hidden.mul_(weights).t(), grad_rows, out=grad_down[e])
            if not (need_x or need_gate_up):
                continue
            grad_hidden.mul_(weights)
            # shape: (n, 2H) gradient of gate_up
            grad_gate_up_rows = grad_gate_up_buffer[:n]
            torch.ops.aten.silu_backward(
                torch.mul(grad_hidden, up, out=product), gate, grad_input=grad_gate_up_rows[:, :H]
            )
            torch.mul(grad_hidden, silu_gate, out=grad_gate_up_rows[:, H:])
            if need_gate_up:
                # shape: (D, n) @ (n, 2H) -> (D, 2H); grad_rows is free again for x's rows
                x_rows = torch.index_select(x, 0, tokens, out=grad_rows)
                torch.mm(x_rows.t(), grad_gate_up_rows, out=grad_gate_up[e])
            if need_x:
                # shape: (n, 2H) @ (2H, D) -> (n, D)
                grad_x_rows = torch.mm(grad_gate_up_rows, gate_up_weight[e].t(), out=grad_rows)
                grad_x.index_add_(0, tokens, grad_x_rows)

        grad_weights = None
        if need_weights:
            shape, dtype = ctx.combine_weights_meta
            # Dropped assignments get no gradient (their output slot was zero).
            grad_weights = grad_row_weights.new_zeros(shape.numel())
            grad_weights = grad_weights.index_copy_(0, row_ids, grad_row_weights)
            grad_weights = grad_weights.view(shape).to(dtype)
        return grad_x, grad_weights, grad_gate_up, grad_down, None, None


class TorchBackend:
    """Plain PyTorch: index_select, a loop of `torch.mm` over groups, and a gather-sum."""

    name = "torch"

    def permute(self, x: torch.Tensor, row_ids: torch.Tensor, top_k: int) -> torch.Tensor:
        # shape: (N, D)
        return x.index_select(0, torch.div(row_ids, top_k, rounding_mode="floor"))

    def grouped_mm(
        self, x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor
    ) -> torch.Tensor:
        return _GroupedMM.apply(x, w, group_sizes)

    def unpermute(
        self, y: torch.Tensor, row_ids: torch.Tensor, combine_weights: torch.Tensor
    ) -> torch.Tensor:
        T, K = combine_weights.shape
        if y.shape[0] == T * K:
            # Dropless: every slot is filled, so the inverse permutation is a plain gather.
            inverse = torch.empty_like(row_ids)
            inverse[row_ids] = torch.arange(row_ids.numel(), device=row_ids.device)
            slots = y.index_select(0, inverse)
        else:
            # Dropped assignments leave zero rows in their slots.
            slots = y.new_zeros(T * K, y.shape[1]).index_copy(0, row_ids, y)
        # shape: (T, 1, K) @ (T, K, D) -> (T, D); the sum over k runs in k order.
        weights = combine_weights.to(y.dtype).unsqueeze(1)
        return torch.bmm(weights, slots.view(T, K, y.shape[1])).squeeze(1)

    def routed_swiglu(
        self,
        x: torch.Tensor,
        row_ids: torch.Tensor,
        group_sizes: torch.Tensor,
        combine_weights: torch.Tensor,
        gate_up_weight: torch.Tensor,
        down_weight: torch.Tensor,
    ) -> torch.Tensor:
        """Permute, SwiGLU experts and unpermute fused per expert: (T, D) -> (T, D)."""
        return _RoutedSwiGLU.apply(
            x, combine_weights, gate_up_weight, down_weight, row_ids, group_sizes
        )


_BACKENDS: dict[str, ExpertBackend] = {"torch": TorchBackend()}


def register_backend(backend: ExpertBackend) -> None:
    _BACKENDS[backend.name] = backend


def get_backend(name: str, device: torch.device) -> ExpertBackend:
    """Resolve 'torch', 'triton' or 'auto' (Triton on CUDA tensors, PyTorch elsewhere)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton" and "triton" not in _BACKENDS:
        try:
            import kernels.backend  # noqa: F401  (registers itself)
        except ImportError as err:
            raise ImportError(
                f"moe.backend='triton' needs the `kernels` package and triton: {err}. "
                "Install triton or set moe.backend=torch."
            ) from err
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown MoE backend {name!r}; expected one of ['auto', 'torch', 'triton']"
        )
    return _BACKENDS[name]
