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
"""

from __future__ import annotations

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
