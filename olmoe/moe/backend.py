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
replaced (expert parallelism). The PyTorch backend's fused path splits the experts
between CPU worker threads (`_ExpertThreads`) and reuses its large blocks from step to
step (`_BlockCache`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.autograd.function import once_differentiable


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

    NOTE: the buffers live as long as their thread: (2 D + 6 H) elements per row of the
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


class _ExpertThreads:
    """CPU worker threads that run the experts of the fused path, one intra-op thread each.

    MKL's multi-threaded GEMM on one expert's few hundred rows synchronizes its threads
    for every call and reaches well under the machine's peak. W worker threads of one
    intra-op thread each instead take whole experts from a shared queue, largest first,
    so a core slowed by other work just takes fewer experts. Which thread runs which
    expert varies from call to call. The results do not, because each expert writes only
    its own rows, and the rows are summed per token afterwards in a fixed order.

    NOTE: `torch.set_num_threads` is per thread for OpenMP and MKL. The workers set 1 at
    start; the calling thread's setting, which also seeds threads started later, is
    restored after they have started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # A forked child has none of the parent's threads.
        self._pool, self._size = None, 0

    def _start(self, size: int) -> ThreadPoolExecutor:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        caller_threads = torch.get_num_threads()
        started = threading.Barrier(size + 1)

        def start() -> None:
            # torch sets up each thread's count lazily at its first parallel op, from the
            # process-wide setting. Run that setup first, so that it cannot undo the 1.
            torch.get_num_threads()
            torch.set_num_threads(1)
            started.wait()

        pool = ThreadPoolExecutor(size, thread_name_prefix="olmoe-experts")
        for _ in range(size):
            pool.submit(start)
        started.wait()
        torch.set_num_threads(caller_threads)
        self._pool, self._size = pool, size
        return pool

    def run(self, fn, experts: list[int], workers: int) -> None:
        """Run fn(e) for each expert in `experts` on `workers` threads, taken in list order."""
        if workers <= 1 or len(experts) <= 1:
            for e in experts:
                fn(e)
            return
        with self._lock:
            pool = self._pool if self._size == workers else self._start(workers)
        queue = iter(experts)
        queue_lock = threading.Lock()

        def drain() -> None:
            while True:
                with queue_lock:
                    e = next(queue, None)
                if e is None:
                    return
                fn(e)

        for future in [pool.submit(drain) for _ in range(workers)]:
            future.result()


_EXPERT_THREADS = _ExpertThreads()


def _expert_order(sizes: list[int]) -> list[int]:
    """Return the experts that have rows, largest first and ties by index."""
    return sorted((e for e, n in enumerate(sizes) if n > 0), key=lambda e: (-sizes[e], e))


def _workers(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 1


class _BlockCache:
    """Large CPU blocks, handed out again once no tensor outside this cache uses them.

    The fused path's big tensors have the same shapes on every step: the saved gate/up
    activations (N, 2H), the (N, D) output and input-gradient rows and the stacked weight
    gradients, 384 MiB per layer together at T = 4096, E = 64, K = 8, D = H = 512.
    glibc maps blocks that large fresh from the kernel and returns them on free, so
    without reuse every step pays a page fault per page on first touch. A cached block
    is handed out only when the cache holds the last reference to its storage: after
    autograd freed the saved activations, or after `zero_grad(set_to_none=True)` dropped
    the `.grad` that aliased it. Memory that a caller still references is never written. Like a
    caching allocator, the cache keeps the blocks
    of the busiest step; `release_cached_blocks()` gives them back.
    """

    def __init__(self, max_blocks_per_shape: int = 64, max_shapes: int = 8) -> None:
        self.max_blocks_per_shape = max_blocks_per_shape
        self.max_shapes = max_shapes
        # (shape, dtype) -> blocks, least recently used shape first
        self.blocks: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Return an uninitialized contiguous tensor of `shape` with `like`'s dtype and device."""
        if like.device.type != "cpu" or not hasattr(torch._C, "_storage_Use_Count"):
            return like.new_empty(shape)
        key = (tuple(shape), like.dtype)
        with self._lock:
            blocks = self.blocks.setdefault(key, [])
            self.blocks.move_to_end(key)
            if len(self.blocks) > self.max_shapes:
                # Shapes change when padding or capacity drops vary the routed rows.
                self.blocks.popitem(last=False)
            for block in blocks:
                if torch._C._storage_Use_Count(block.untyped_storage()._cdata) == 1:
                    # A new alias, so that autograd keeps it as `.grad` without a copy.
                    return block.view(block.shape)
            block = like.new_empty(shape)
            if len(blocks) < self.max_blocks_per_shape:
                blocks.append(block)
                return block.view(block.shape)
            return block

    def clear(self) -> None:
        with self._lock:
            self.blocks.clear()


_BLOCK_CACHE = _BlockCache()


def release_cached_blocks() -> None:
    """Drop the fused CPU path's cached blocks. Blocks still in use stay with their users."""
    _BLOCK_CACHE.clear()


@dataclass
class _RoutedSwiGLU(torch.autograd.Function):
    """Permute, grouped SwiGLU and weighted unpermute with one pass over the experts.

    For each expert: gather its tokens, gate/up GEMM, silu(gate) * up, down GEMM, and the
    combine weights, each step on one expert's rows while they are in cache. Each expert
    writes its weighted output rows into an (N, D) block in expert-sorted order, and one
    `index_add_` then sums each token's K rows. Only the (N, 2H) gate/up rows are saved.
    On CPU the experts run on worker threads (`_ExpertThreads`); since each expert writes
    only its own rows, the results do not depend on the number of threads or their timing.

    The backward recomputes silu(gate) * up from the saved gate/up rows and gets the
    combine-weight gradient as <dL/d(hidden), hidden> for the unscaled expert output, so
    the (N, D) expert outputs are never stored.
    """

    @staticmethod
    def forward(ctx, x, combine_weights, gate_up_weight, down_weight, row_ids, group_sizes):
        # x: (T, D), combine_weights: (T, K), gate_up_weight: (E, D, 2H), down_weight: (E, H, D)
        T, K = combine_weights.shape
        D, H = x.shape[1], down_weight.shape[1]
        N = row_ids.numel()
        # NOTE: device-to-host sync: the loop needs the group sizes on the host.
        sizes = group_sizes.tolist()
        # shape: (N,) token of each expert-sorted row, and its combine weight
        token_ids = torch.div(row_ids, K, rounding_mode="floor")
        row_weights = combine_weights.reshape(-1).index_select(0, row_ids).to(x.dtype)
        # shape: (N, 2H) saved for the backward, and (N, D) weighted expert outputs
        gate_up_rows = _BLOCK_CACHE.empty((N, 2 * H), x)
        out_rows = _BLOCK_CACHE.empty((N, D), x)
        tokens, weights = token_ids.split(sizes), row_weights.split(sizes)
        gate_up_chunks, out_chunks = gate_up_rows.split(sizes), out_rows.split(sizes)
        max_rows = max(sizes, default=0)

        @torch.no_grad()
        def expert_forward(e: int) -> None:
            n = sizes[e]
            x_rows = _WORKSPACE.get("x_rows", max_rows, D, x)[:n]
            hidden = _WORKSPACE.get("hidden", max_rows, H, x)[:n]
            torch.index_select(x, 0, tokens[e], out=x_rows)
            # shape: (n, D) @ (D, 2H) -> (n, 2H)
            gate_up = torch.mm(x_rows, gate_up_weight[e], out=gate_up_chunks[e])
            # shape: (n, H)
            torch.ops.aten.silu.out(gate_up[:, :H], out=hidden)
            hidden.mul_(gate_up[:, H:])
            # shape: (n, H) @ (H, D) -> (n, D), times each row's combine weight
            torch.mm(hidden, down_weight[e], out=out_chunks[e]).mul_(weights[e].unsqueeze(1))

        _EXPERT_THREADS.run(expert_forward, _expert_order(sizes), _workers(x.device))
        # shape: (T, D) sum of each token's rows, in row order
        out = x.new_zeros(x.shape).index_add_(0, token_ids, out_rows)

        ctx.save_for_backward(
            x, gate_up_weight, down_weight, token_ids, row_weights, row_ids, gate_up_rows
        )
        ctx.sizes = sizes
        ctx.combine_weights_meta = (combine_weights.shape, combine_weights.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, gate_up_weight, down_weight, token_ids, row_weights, row_ids, gate_up_rows = (
            ctx.saved_tensors
        )
        D, H = x.shape[1], down_weight.shape[1]
        sizes = ctx.sizes
        need_x, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        grad_out = grad_out.contiguous()

        grad_gate_up = _BLOCK_CACHE.empty(gate_up_weight.shape, gate_up_weight)
        grad_down = _BLOCK_CACHE.empty(down_weight.shape, down_weight)
        # shape: (N,) gradient of each row's combine weight, (N, D) of each row's input
        grad_row_weights = torch.zeros_like(row_weights)
        grad_x_rows = _BLOCK_CACHE.empty((row_ids.numel(), D), x) if need_x else None
        tokens, weights = token_ids.split(sizes), row_weights.split(sizes)
        gate_up_chunks = gate_up_rows.split(sizes)
        grad_weight_chunks = grad_row_weights.split(sizes)
        grad_x_chunks = grad_x_rows.split(sizes) if need_x else None
        max_rows = max(sizes, default=0)

        @torch.no_grad()
        def expert_backward(e: int) -> None:
            n = sizes[e]
            grad_rows = _WORKSPACE.get("grad_rows", max_rows, D, x)[:n]
            silu_gate = _WORKSPACE.get("silu_gate", max_rows, H, x)[:n]
            hidden = _WORKSPACE.get("hidden", max_rows, H, x)[:n]
            grad_hidden = _WORKSPACE.get("grad_hidden", max_rows, H, x)[:n]
            product = _WORKSPACE.get("product", max_rows, H, x)[:n]
            grad_gate_up_rows = _WORKSPACE.get("grad_gate_up", max_rows, 2 * H, x)[:n]
            gate, up = gate_up_chunks[e][:, :H], gate_up_chunks[e][:, H:]
            w = weights[e].unsqueeze(1)

            # shape: (n, H) recomputed activations
            torch.ops.aten.silu.out(gate, out=silu_gate)
            torch.mul(silu_gate, up, out=hidden)
            # shape: (n, D) dL/d(out) at each row's token. Times w, it is the gradient of
            # the unscaled expert output.
            torch.index_select(grad_out, 0, tokens[e], out=grad_rows)
            # shape: (n, D) @ (D, H) -> (n, H), not yet scaled by w
            torch.mm(grad_rows, down_weight[e].t(), out=grad_hidden)
            if need_weights:
                torch.sum(torch.mul(grad_hidden, hidden, out=product), 1, out=grad_weight_chunks[e])
            # shape: (H, n) @ (n, D) -> (H, D)
            torch.mm(hidden.mul_(w).t(), grad_rows, out=grad_down[e])
            grad_hidden.mul_(w)
            # shape: (n, 2H) gradient of gate_up
            torch.ops.aten.silu_backward(
                torch.mul(grad_hidden, up, out=product), gate, grad_input=grad_gate_up_rows[:, :H]
            )
            torch.mul(grad_hidden, silu_gate, out=grad_gate_up_rows[:, H:])
            # shape: (D, n) @ (n, 2H) -> (D, 2H). grad_rows is free again, for x's rows.
            x_rows = torch.index_select(x, 0, tokens[e], out=grad_rows)
            torch.mm(x_rows.t(), grad_gate_up_rows, out=grad_gate_up[e])
            if need_x:
                # shape: (n, 2H) @ (2H, D) -> (n, D)
                torch.mm(grad_gate_up_rows, gate_up_weight[e].t(), out=grad_x_chunks[e])

        _EXPERT_THREADS.run(expert_backward, _expert_order(sizes), _workers(x.device))
        for e, n in enumerate(sizes):
            if n == 0:
                grad_gate_up[e].zero_()
                grad_down[e].zero_()
        grad_x = None
        if need_x:
            # shape: (T, D) sum of each token's rows, in row order
            grad_x = torch.zeros_like(x).index_add_(0, token_ids, grad_x_rows)
        grad_weights = None
        if need_weights:
            shape, dtype = ctx.combine_weights_meta
            # Dropped assignments get no gradient (their output slot was zero).
            grad_weights = grad_row_weights.new_zeros(shape.numel())
            grad_weights = grad_weights.index_copy_(0, row_ids, grad_row_weights)
            grad_weights = grad_weights.view(shape).to(dtype)
        return (
            grad_x,
            grad_weights,
            grad_gate_up if need_gate_up else None,
            grad_down if need_down else None,
            None,
            None,
        )


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
