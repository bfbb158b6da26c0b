"""Forward + backward time of the olmoe MoE layer against HF's OlmoeSparseMoeBlock.

Both layers hold the same weights and run in this process on the same inputs. Each repeat
runs every variant once, in turn, so a change in machine load hits all of them alike; the
table reports medians. Gradients are set to None before each step, as a training loop
with `zero_grad()` does. The expert-matmul throughput is compared with this machine's own
fp32 matmul peak, measured in the same run with one large `torch.mm`.

Variants: `ours` is the layer as configured (the fused per-expert path on CPU), `unfused`
is the same layer through the three-step permute, grouped GEMM, unpermute contract,
`HF` is transformers' block, and `gemms` is the layer's expert GEMMs alone, one after
another with all intra-op threads (as HF runs them; ours runs them on worker threads).

    python benchmarks/moe_layer.py                 # default shapes, CPU fp32
    python benchmarks/moe_layer.py --tokens 1024 --experts 16 --top-k 2 --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
from collections.abc import Callable

import torch

from olmoe.convert import config_to_hf
from olmoe.model import ModelConfig, MoEConfig
from olmoe.moe import MoELayer, TorchBackend, register_backend


def timed_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, running all of them once per repeat in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of one (size x size) @ (size x size) `torch.mm`, best of `repeats`.

    The best run rather than the median, so that a busy moment does not lower the peak.
    """
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def tune_glibc_malloc() -> None:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    By default glibc maps each block above its mmap threshold (at most 32 MiB) fresh from
    the kernel and trims the top of the heap on free, so every training step touches new
    pages again. On the benchmark VM a first touch costs about 0.7 ms per MiB, several
    times the cost of writing the memory. `mallopt(M_MMAP_MAX, 0)` serves all blocks from
    the heap and `mallopt(M_TRIM_THRESHOLD, 2 GiB - 1)` stops the trimming. Both apply to
    the whole process, so they change the allocator for both models alike.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not libc.mallopt(m_mmap_max, 0) or not libc.mallopt(m_trim_threshold, 2**31 - 1):
        raise RuntimeError("mallopt failed; run without --malloc-tuning on this libc")


class UnfusedTorchBackend:
    """The PyTorch backend without `routed_swiglu`, so the layer takes the three-step path."""

    name = "torch-unfused"

    def __init__(self) -> None:
        self._torch = TorchBackend()
        self.permute = self._torch.permute
        self.grouped_mm = self._torch.grouped_mm
        self.unpermute = self._torch.unpermute


def build_pair(d_model: int, hidden: int, experts: int, top_k: int):
    """Our MoELayer (PyTorch backend) and HF's OlmoeSparseMoeBlock with the same weights."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = ModelConfig(
        d_model=d_model,
        n_heads=8,
        n_layers=1,
        moe=MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden, backend="torch"),
    )
    ours = MoELayer(config.moe, d_model)
    theirs = OlmoeSparseMoeBlock(config_to_hf(config))
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        for e, expert in enumerate(theirs.experts):
            expert.gate_proj.weight.copy_(ours.experts.gate_up_weight[e, :, :hidden].t())
            expert.up_proj.weight.copy_(ours.experts.gate_up_weight[e, :, hidden:].t())
            expert.down_proj.weight.copy_(ours.experts.down_weight[e].t())
    return ours, theirs


def expert_gemms_step(layer: MoELayer, x: torch.Tensor) -> Callable[[], None]:
    """Time only the expert GEMMs of one forward + backward, for `layer`'s routing of `x`.

    Per expert e with n rows: forward x_e @ W_gate_up[e] and h_e @ W_down[e], backward
    dY_e @ W_down[e]^T, h_e^T @ dY_e, x_e^T @ dG_e and dG_e @ W_gate_up[e]^T, on random
    inputs of the routed sizes. The weight gradients are allocated fresh, as the layer's are.
    """
    with torch.no_grad():
        route = layer.router(x.reshape(-1, x.shape[-1]))
    experts = layer.num_experts
    sizes = torch.bincount(route.expert_indices.reshape(-1), minlength=experts).tolist()
    gate_up_weight = layer.experts.gate_up_weight.detach()
    down_weight = layer.experts.down_weight.detach()
    D, H = down_weight.shape[2], down_weight.shape[1]
    inputs = [torch.randn(n, D) for n in sizes]
    hidden = [torch.randn(n, H) for n in sizes]
    grad_outputs = [torch.randn(n, D) for n in sizes]
    grad_gate_up = [torch.randn(n, 2 * H) for n in sizes]

    def run() -> None:
        for e in range(experts):
            torch.mm(inputs[e], gate_up_weight[e])
            torch.mm(hidden[e], down_weight[e])
        grad_gate_up_weight = torch.empty_like(gate_up_weight)
        grad_down_weight = torch.empty_like(down_weight)
        for e in range(experts):
            torch.mm(grad_outputs[e], down_weight[e].t())
            torch.mm(hidden[e].t(), grad_outputs[e], out=grad_down_weight[e])
            torch.mm(inputs[e].t(), grad_gate_up[e], out=grad_gate_up_weight[e])
            torch.mm(grad_gate_up[e], gate_up_weight[e].t())

    return run


def bench_shape(
    tokens: int,
    d_model: int,
    hidden: int,
    experts: int,
    top_k: int,
    repeats: int,
    peak: float,
    unfused: bool,
    gemms: bool,
) -> dict[str, float | str]:
    torch.manual_seed(0)
    ours, theirs = build_pair(d_model, hidden, experts, top_k)
    x = torch.randn(1, tokens, d_model)
    grad = torch.randn(1, tokens, d_model)

    def step(layer: torch.nn.Module, backend: str | None = None) -> Callable[[], None]:
        def run() -> None:
            if backend is not None:
                layer.config.backend = backend
            layer.zero_grad(set_to_none=True)
            x_in = x.detach().requires_grad_()
            out = layer(x_in)
            hidden_states = out.hidden if backend is not None else out[0]
            hidden_states.backward(grad)

        return run

    with torch.no_grad():
        diff = (ours(x).hidden - theirs(x)[0]).abs().max().item()
    fns = {"ours": step(ours, "torch")}
    if unfused:
        fns["unfused"] = step(ours, UnfusedTorchBackend.name)
    fns["hf"] = step(theirs)
    if gemms:
        fns["gemms"] = expert_gemms_step(ours, x)
    seconds = timed_interleaved(fns, repeats)
    # Expert matmuls: forward 6 * N * D * H (gate+up, down), backward twice that.
    flops = 18 * tokens * top_k * d_model * hidden
    result: dict[str, float | str] = {
        "shape": f"T={tokens} D={d_model} H={hidden} E={experts} k={top_k}",
        "max_diff": diff,
    }
    for name, value in seconds.items():
        result[f"{name}_ms"] = value * 1e3
        result[f"{name}_peak"] = flops / value / 1e9 / peak
    result["speedup"] = seconds["hf"] / seconds["ours"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens T per step")
    parser.add_argument("--d-model", type=int, default=512, help="model width D")
    parser.add_argument("--hidden", type=int, default=512, help="expert hidden width H")
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64], help="E values")
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 8], help="k values")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--unfused", action="store_true", help="also time the unfused three-step path"
    )
    parser.add_argument(
        "--gemms", action="store_true", help="also time the expert GEMMs alone, in sequence"
    )
    parser.add_argument(
        "--malloc-tuning",
        action="store_true",
        help="keep freed memory in glibc's heap (mallopt; Linux with glibc only)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc_tuning:
        tune_glibc_malloc()
    register_backend(UnfusedTorchBackend())

    load_before = os.getloadavg()[0]
    peak = matmul_peak_gflops()
    malloc = "tuned" if args.malloc_tuning else "default"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {malloc} malloc")
    print(f"matmul peak (2048^3 torch.mm, best of 10): {peak:.1f} GFLOP/s")
    columns = ["ours"] + (["unfused"] if args.unfused else []) + ["hf"]
    columns += ["gemms"] if args.gemms else []
    header = f"{'shape':<34}" + "".join(f"{name + ' ms':>12}" for name in columns)
    header += f"{'speedup':>9}" + "".join(f"{name + '/peak':>13}" for name in columns)
    print(header + f"{'max diff':>10}")
    for experts in args.experts:
        for top_k in args.top_k:
            r = bench_shape(
                args.tokens,
                args.d_model,
                args.hidden,
                experts,
                top_k,
                args.repeats,
                peak,
                args.unfused,
                args.gemms,
            )
            line = f"{r['shape']:<34}" + "".join(f"{r[c + '_ms']:>12.1f}" for c in columns)
            line += f"{r['speedup']:>8.2f}x" + "".join(f"{r[c + '_peak']:>13.0%}" for c in columns)
            print(line + f"{r['max_diff']:>10.1e}", flush=True)
    load_after = os.getloadavg()[0]
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after")


if __name__ == "__main__":
    main()
