"""Forward + backward time of the olmoe MoE layer against HF's OlmoeSparseMoeBlock.

Both layers hold the same weights and run in this process on the same inputs. The
expert matmul throughput is compared with this machine's own fp32 matmul peak,
measured in the same run with one large `torch.mm`.

    python benchmarks/moe_layer.py                 # default shapes, CPU fp32
    python benchmarks/moe_layer.py --tokens 1024 --experts 16 --top-k 2
"""

from __future__ import annotations

import argparse
import time

import torch

from olmoe.convert import config_to_hf
from olmoe.model import ModelConfig, MoEConfig
from olmoe.moe import MoELayer


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    seconds = timed(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e9


def build_pair(tokens: int, d_model: int, hidden: int, experts: int, top_k: int):
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


def bench_shape(tokens, d_model, hidden, experts, top_k, repeats, peak):
    torch.manual_seed(0)
    ours, theirs = build_pair(tokens, d_model, hidden, experts, top_k)
    x = torch.randn(1, tokens, d_model)
    grad = torch.randn(1, tokens, d_model)

    def step_ours():
        x_in = x.detach().requires_grad_()
        ours(x_in).hidden.backward(grad)

    def step_theirs():
        x_in = x.detach().requires_grad_()
        theirs(x_in)[0].backward(grad)

    with torch.no_grad():
        diff = (ours(x).hidden - theirs(x)[0]).abs().max().item()
    t_ours = timed(step_ours, repeats)
    t_theirs = timed(step_theirs, repeats)
    # Expert matmuls: forward 6 * N * D * H (gate+up, down), backward twice that.
    flops = 18 * tokens * top_k * d_model * hidden
    gflops = flops / t_ours / 1e9
    return {
        "shape": f"T={tokens} D={d_model} H={hidden} E={experts} k={top_k}",
        "ours_ms": t_ours * 1e3,
        "hf_ms": t_theirs * 1e3,
        "speedup": t_theirs / t_ours,
        "ours_peak": gflops / peak,
        "hf_peak": flops / t_theirs / 1e9 / peak,
        "max_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--top-k", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    print(f"matmul peak (2048^3 torch.mm): {peak:.1f} GFLOP/s")
    header = f"{'shape':<34} {'ours ms':>8} {'HF ms':>8} {'speedup':>8} {'ours/peak':>9} "
    print(header + f"{'HF/peak':>8} {'max diff':>9}")
    for experts in args.experts:
        for top_k in args.top_k:
            r = bench_shape(
                args.tokens, args.d_model, args.hidden, experts, top_k, args.repeats, peak
            )
            print(
                f"{r['shape']:<34} {r['ours_ms']:>8.1f} {r['hf_ms']:>8.1f} "
                f"{r['speedup']:>7.2f}x {r['ours_peak']:>9.0%} {r['hf_peak']:>8.0%} "
                f"{r['max_diff']:>9.1e}"
            )


if __name__ == "__main__":
    main()
