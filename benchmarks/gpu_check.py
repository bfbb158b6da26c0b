"""Check the MoE kernels on one GPU: correctness at OLMoE-1B-7B shapes, then speed.

    python3 benchmarks/gpu_check.py OUT_DIR [--dry-run] [--peak-tflops 989]

Writes OUT_DIR/gpu_check.json, rewritten atomically after every section, so a run cut
short keeps the finished sections. A section that fails records "error: ..." and one
that cannot run records "skipped: ...". The others still run.

Dims: T = tokens, E = experts, K = top-k, D = d_model, H = expert hidden, N = T * K.
Sections:
- environment: versions, GPU name, and the bf16 peak used for MFU.
- correctness: grouped GEMM (forward, dX, dW) and permute/unpermute against PyTorch in
  bf16 and fp32, with uniform routing and with skewed routing that leaves experts empty.
- grouped_gemm: TFLOP/s of each grouped kernel against torch.mm on the same FLOPs.
- moe_layer: MoELayer forward+backward with the Triton backend, the PyTorch backend and
  transformers' OlmoeSparseMoeBlock (a Python loop over experts).
- decoder_block: one OLMoE-1B-7B OlmoeBlock forward+backward, in tokens/s and MFU.

--dry-run runs every section at tiny shapes on the CPU under the Triton interpreter
(fp32 only), to check the script itself; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must precede the first triton import; only --dry-run gets this far without a GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from olmoe.model import ModelConfig, MoEConfig  # noqa: E402  (after TRITON_INTERPRET)

logger = logging.getLogger("gpu_check")

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (without sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4}
BF16_PEAK_TFLOPS.update({"A100": 312.0, "L40S": 362.0})

# Targets on H200 from the kernel design goals.
GROUPED_GEMM_TARGET = 0.85  # fraction of torch.mm throughput at OLMoE shapes
LAYER_SPEEDUP_TARGET = 3.0  # Triton MoE layer vs transformers' looped block


@dataclass
class Shapes:
    tokens: int
    d_model: int
    expert_hidden: int
    num_experts: int
    top_k: int
    batch: int
    seq_len: int


OLMOE_SHAPES = Shapes(16384, 2048, 1024, 64, 8, batch=4, seq_len=4096)
DRY_RUN_SHAPES = Shapes(64, 64, 32, 8, 2, batch=2, seq_len=32)


# -----------------------------------------------------------------------------
# helpers


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write `payload` to a temp file in the same directory, then rename it over `path`."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(descriptor, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(temp_name, path)


def measure_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds per call: triton's do_bench on CUDA, two timed calls on the CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def compare(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> dict:
    """Relative Frobenius error and max abs error of `actual` against `expected`."""
    actual, expected = actual.float(), expected.float()
    diff = actual - expected
    relative = (diff.norm() / expected.norm().clamp_min(1e-30)).item()
    return {
        "relative_error": relative,
        "max_abs_error": diff.abs().max().item() if diff.numel() else 0.0,
        "finite": bool(torch.isfinite(actual).all()),
        "passed": bool(torch.isfinite(actual).all()) and relative <= tolerance,
    }


def uniform_expert_indices(tokens: int, shapes: Shapes, device) -> torch.Tensor:
    """(T, K) distinct experts per token, uniformly at random."""
    scores = torch.rand(tokens, shapes.num_experts, device=device)
    return scores.argsort(dim=1)[:, : shapes.top_k]


def skewed_expert_indices(tokens: int, shapes: Shapes, device) -> torch.Tensor:
    """(T, K) distinct experts drawn with weights 2^-e from the first half of the experts.

    The second half is never chosen, so E / 2 experts are empty and the first few take
    most of the rows.
    """
    E, K = shapes.num_experts, shapes.top_k
    used = max(K, E // 2)
    weights = torch.zeros(E, device=device)
    weights[:used] = 0.5 ** torch.arange(used, device=device, dtype=torch.float32)
    return torch.multinomial(weights.expand(tokens, E), K, replacement=False)


def group_sizes_for(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(expert_indices.reshape(-1), minlength=num_experts)


def peak_bf16_tflops(override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value, f"datasheet value for {key}"
    return None, f"unknown GPU {name!r}; pass --peak-tflops"


# -----------------------------------------------------------------------------
# sections


def section_environment(args, shapes: Shapes) -> dict:
    import triton

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dry_run": args.dry_run,
        "shapes": shapes.__dict__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as err:
        info["transformers"] = f"skipped: {err}"
    if torch.cuda.is_available():
        info["capability"] = list(torch.cuda.get_device_capability())
    info["bf16_peak_tflops"], info["bf16_peak_source"] = peak_bf16_tflops(args.peak_tflops)
    return info


def check_grouped_mm(x, w, group_sizes, tolerance: float) -> dict:
    from kernels import grouped_mm

    grad_out = torch.randn(x.shape[0], w.shape[2], device=x.device).to(x.dtype)
    x_leaf, w_leaf = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = grouped_mm(x_leaf, w_leaf, group_sizes)
    grad_x, grad_w = torch.autograd.grad(out, (x_leaf, w_leaf), grad_out)

    # Reference: one fp32 matmul per group (TF32 off), written into preallocated outputs.
    ref_out = torch.zeros(out.shape, device=x.device)
    ref_grad_x = torch.zeros(x.shape, device=x.device)
    ref_grad_w = torch.zeros(w.shape, device=x.device)
    start = 0
    for e, size in enumerate(group_sizes.tolist()):
        rows = slice(start, start + size)
        x_e, dy_e, w_e = x[rows].float(), grad_out[rows].float(), w[e].float()
        ref_out[rows] = x_e @ w_e
        ref_grad_x[rows] = dy_e @ w_e.T
        ref_grad_w[e] = x_e.T @ dy_e
        start += size
    empty = (group_sizes == 0).nonzero().flatten()
    return {
        "forward": compare(out, ref_out, tolerance),
        "grad_x": compare(grad_x, ref_grad_x, tolerance),
        "grad_w": compare(grad_w, ref_grad_w, tolerance),
        "empty_groups": int(empty.numel()),
        "empty_grad_w_exactly_zero": bool((grad_w[empty] == 0).all()),
    }


def check_permutation(x, expert_indices, num_experts: int, tolerance: float) -> dict:
    from kernels import permute, unpermute
    from olmoe.moe.backend import TorchBackend

    torch_backend = TorchBackend()
    T, K = expert_indices.shape
    E = num_experts
    weights = torch.rand(T, K, device=x.device)
    result = permute(x, expert_indices, E)
    expected_row_ids = torch.sort(expert_indices.reshape(-1), stable=True).indices
    routed_ref = torch_backend.permute(x, expected_row_ids, K)

    grad_out = torch.randn(T, x.shape[1], device=x.device).to(x.dtype)
    y = torch.randn_like(routed_ref)
    y_kernel, w_kernel = y.clone().requires_grad_(), weights.clone().requires_grad_()
    out = unpermute(y_kernel, result.row_ids, w_kernel)
    grad_y, grad_w = torch.autograd.grad(out, (y_kernel, w_kernel), grad_out)
    y_ref, w_ref = y.clone().requires_grad_(), weights.clone().requires_grad_()
    out_ref = torch_backend.unpermute(y_ref, expected_row_ids, w_ref)
    grad_y_ref, grad_w_ref = torch.autograd.grad(out_ref, (y_ref, w_ref), grad_out)
    return {
        "row_ids_equal": bool(torch.equal(result.row_ids, expected_row_ids)),
        "group_sizes_equal": bool(
            torch.equal(result.group_sizes, group_sizes_for(expert_indices, E))
        ),
        "routed_equal": bool(torch.equal(result.routed, routed_ref)),
        "unpermute": compare(out, out_ref, tolerance),
        "unpermute_grad_y": compare(grad_y, grad_y_ref, tolerance),
        "unpermute_grad_weights": compare(grad_w, grad_w_ref, tolerance),
    }


def section_correctness(args, shapes: Shapes) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False

    # Relative Frobenius error bounds. Rounding the output to bf16 costs about 2^-9
    # relative, and fp32 differs from torch.mm only in summation order.
    dtypes = {"fp32": (torch.float32, 1e-5)}
    if not args.dry_run:
        dtypes["bf16"] = (torch.bfloat16, 1e-2)

    T, D, H = shapes.tokens, shapes.d_model, shapes.expert_hidden
    routings = {
        "uniform": uniform_expert_indices(T, shapes, device),
        "skewed": skewed_expert_indices(T, shapes, device),
    }
    results = {}
    for dtype_name, (dtype, tolerance) in dtypes.items():
        for routing_name, expert_indices in routings.items():
            label = f"{dtype_name}/{routing_name}"
            logger.info("correctness %s", label)
            group_sizes = group_sizes_for(expert_indices, shapes.num_experts)
            N = int(group_sizes.sum())
            x_routed = torch.randn(N, D, device=device).to(dtype)
            w_gate_up = (torch.randn(shapes.num_experts, D, 2 * H, device=device) * 0.02).to(dtype)
            results[f"{label}/grouped_mm_gate_up"] = check_grouped_mm(
                x_routed, w_gate_up, group_sizes, tolerance
            )
            del x_routed, w_gate_up

            x_tokens = torch.randn(T, D, device=device).to(dtype)
            results[f"{label}/permutation"] = check_permutation(
                x_tokens, expert_indices, shapes.num_experts, tolerance
            )

    results["passed"] = all(_all_passed(value) for value in results.values())
    return results


def _all_passed(record) -> bool:
    if isinstance(record, dict):
        return all(_all_passed(value) for key, value in record.items() if key != "empty_groups")
    if isinstance(record, bool):
        return record
    return True


def time_grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> dict:
    """Milliseconds of each grouped kernel, of torch.mm on the same FLOPs, and of the loop."""
    grouped_gemm = importlib.import_module("kernels.grouped_gemm")
    from kernels import grouped_mm
    from olmoe.moe.backend import TorchBackend

    grad_out = torch.randn(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype)
    group_offsets = grouped_gemm.validate_grouped_mm_inputs(x, w, group_sizes)
    w_transposed = w.transpose(1, 2)
    w_dense = w[0]
    loop = TorchBackend()
    return {
        "forward": measure_ms(lambda: grouped_gemm._launch_grouped_mm(x, w, group_offsets)),
        "forward_with_checks": measure_ms(lambda: grouped_mm(x, w, group_sizes)),
        "grad_x": measure_ms(
            lambda: grouped_gemm._launch_grouped_mm(grad_out, w_transposed, group_offsets)
        ),
        "grad_w": measure_ms(lambda: grouped_gemm._launch_weight_grad(x, grad_out, group_offsets)),
        "torch_mm_forward": measure_ms(lambda: torch.mm(x, w_dense)),
        "torch_mm_grad_x": measure_ms(lambda: torch.mm(grad_out, w_dense.T)),
        "torch_mm_grad_w": measure_ms(lambda: torch.mm(x.T, grad_out)),
        "torch_loop_forward": measure_ms(lambda: loop.grouped_mm(x, w, group_sizes)),
    }


def section_grouped_gemm(args, shapes: Shapes) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    T, D, H, E = shapes.tokens, shapes.d_model, shapes.expert_hidden, shapes.num_experts
    group_sizes = group_sizes_for(uniform_expert_indices(T, shapes, device), E)
    N = int(group_sizes.sum())
    results = {"dtype": str(dtype), "N": N}
    # gate_up: (N, D) @ (D, 2H); down: (N, H) @ (H, D)
    for name, (K, M) in {"gate_up": (D, 2 * H), "down": (H, D)}.items():
        x = torch.randn(N, K, device=device, dtype=dtype)
        w = torch.randn(E, K, M, device=device, dtype=dtype) * 0.02
        timings = time_grouped_gemm(x, w, group_sizes)
        flops = 2.0 * N * K * M
        tflops = {key: flops / (ms * 1e-3) / 1e12 for key, ms in timings.items()}
        ratios = {
            kernel: tflops[kernel] / tflops[f"torch_mm_{kernel}"]
            for kernel in ("forward", "grad_x", "grad_w")
        }
        results[name] = {
            "K": K,
            "M": M,
            "ms": timings,
            "tflops": tflops,
            "fraction_of_torch_mm": ratios,
            "meets_target": all(ratio >= GROUPED_GEMM_TARGET for ratio in ratios.values()),
        }
        logger.info("grouped_gemm %s fraction of torch.mm: %s", name, ratios)
    results["target_fraction"] = GROUPED_GEMM_TARGET
    return results


def _time_forward_backward(module, x: torch.Tensor, forward) -> float:
    grad = torch.randn_like(forward(module, x))
    params = [param for param in module.parameters() if param.requires_grad]
    x = x.detach().requires_grad_()

    def step():
        forward(module, x).backward(grad)

    return measure_ms(step, grad_to_none=[x, *params])


def _hf_sparse_moe_block(shapes: Shapes, device, dtype):
    """transformers' OlmoeSparseMoeBlock at `shapes`, or a "skipped: reason" string."""
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError as err:
        return f"skipped: transformers' OLMoE is not importable: {err}"
    config = OlmoeConfig(
        hidden_size=shapes.d_model,
        intermediate_size=shapes.expert_hidden,
        num_experts=shapes.num_experts,
        num_experts_per_tok=shapes.top_k,
        norm_topk_prob=False,
    )
    block = OlmoeSparseMoeBlock(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    return block


def _hf_forward(block, x):
    out = block(x)
    # transformers 4.x returns (hidden, router_logits); later versions may return hidden.
    return out[0] if isinstance(out, tuple) else out


def section_moe_layer(args, shapes: Shapes) -> dict:
    from olmoe.moe import MoELayer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    config = MoEConfig(
        num_experts=shapes.num_experts, top_k=shapes.top_k, expert_hidden=shapes.expert_hidden
    )
    layer = MoELayer(config, shapes.d_model).to(device)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.02)
    layer = layer.to(dtype)
    x = torch.randn(shapes.batch, shapes.seq_len, shapes.d_model, device=device, dtype=dtype)

    results = {"dtype": str(dtype), "tokens": shapes.batch * shapes.seq_len, "ms": {}}
    outputs = {}
    for backend in ("torch", "triton"):
        config.backend = backend
        with torch.no_grad():
            outputs[backend] = layer(x).hidden
        results["ms"][backend] = _time_forward_backward(layer, x, lambda m, v: m(v).hidden)
        logger.info("moe_layer %s: %.2f ms", backend, results["ms"][backend])
    results["triton_vs_torch_output"] = compare(outputs["triton"], outputs["torch"], 1e-2)

    block = _hf_sparse_moe_block(shapes, device, dtype)
    if isinstance(block, str):
        results["ms"]["hf_olmoe_sparse_moe_block"] = block
    else:
        try:
            results["ms"]["hf_olmoe_sparse_moe_block"] = _time_forward_backward(
                block, x, _hf_forward
            )
        except Exception as err:  # noqa: BLE001  (transformers versions differ)
            logger.warning("HF OlmoeSparseMoeBlock failed: %r", err)
            results["ms"]["hf_olmoe_sparse_moe_block"] = f"skipped: {err!r}"
    ms = results["ms"]
    results["speedup_vs_torch_backend"] = ms["torch"] / ms["triton"]
    if isinstance(ms["hf_olmoe_sparse_moe_block"], float):
        speedup = ms["hf_olmoe_sparse_moe_block"] / ms["triton"]
        results["speedup_vs_hf"] = speedup
        results["meets_target"] = speedup >= LAYER_SPEEDUP_TARGET
    results["target_speedup_vs_hf"] = LAYER_SPEEDUP_TARGET
    return results


def block_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token of one decoder block: 6 * active matmul params + attention.

    Same convention as `ModelConfig.flops_per_token`: the attention term 12 * D * S counts
    the full S x S score matrix (causal masking is not discounted).
    """
    D, E, K, H = config.d_model, config.moe.num_experts, config.moe.top_k, config.moe.expert_hidden
    kv_width = config.kv_heads * config.head_dim
    attention = 2 * D * D + 2 * D * kv_width
    matmul_params = attention + D * E + K * 3 * D * H + 3 * D * config.moe.shared_expert_hidden
    return 6.0 * matmul_params + 12.0 * D * seq_len


def section_decoder_block(args, shapes: Shapes) -> dict:
    from olmoe.model.layers import rotary_cos_sin
    from olmoe.model.model import OlmoeBlock

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    moe = MoEConfig(
        num_experts=shapes.num_experts,
        top_k=shapes.top_k,
        expert_hidden=shapes.expert_hidden,
        backend="triton",
    )
    n_heads = 16 if shapes.d_model % 16 == 0 and shapes.d_model >= 256 else 4
    config = ModelConfig(
        d_model=shapes.d_model, n_heads=n_heads, max_seq_len=shapes.seq_len, moe=moe
    )
    block = OlmoeBlock(config, 0).to(device)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.init_std)
    block = block.to(dtype)
    x = torch.randn(shapes.batch, shapes.seq_len, shapes.d_model, device=device, dtype=dtype)
    rotary = rotary_cos_sin(shapes.seq_len, config.head_dim, config.rope_theta, device, dtype)
    ms = _time_forward_backward(block, x, lambda m, v: m(v, rotary)[0])
    tokens = shapes.batch * shapes.seq_len
    tokens_per_s = tokens / (ms * 1e-3)
    flops_per_token = block_flops_per_token(config, shapes.seq_len)
    peak, source = peak_bf16_tflops(args.peak_tflops)
    results = {
        "dtype": str(dtype),
        "tokens": tokens,
        "ms": ms,
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "achieved_tflops": flops_per_token * tokens_per_s / 1e12,
        "bf16_peak_tflops": peak,
        "bf16_peak_source": source,
    }
    if peak is not None:
        results["mfu"] = results["achieved_tflops"] / peak
    return results


SECTIONS = {
    "environment": section_environment,
    "correctness": section_correctness,
    "grouped_gemm": section_grouped_gemm,
    "moe_layer": section_moe_layer,
    "decoder_block": section_decoder_block,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check the MoE Triton kernels on one GPU and write gpu_check.json."
    )
    parser.add_argument("out_dir", type=Path, help="directory for gpu_check.json (created)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes, fp32, CPU interpreter when there is no GPU: checks the script only",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 peak of the GPU in TFLOP/s for MFU (default: from the GPU name)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=sorted(SECTIONS),
        default=list(SECTIONS),
        help="sections to run (default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; use --dry-run to check the script on the CPU")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.out_dir / "gpu_check.json"
    shapes = DRY_RUN_SHAPES if args.dry_run else OLMOE_SHAPES
    torch.manual_seed(0)
    results: dict = {}
    for name in args.sections:
        logger.info("section %s: start", name)
        start = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args, shapes)
        except Exception as err:  # noqa: BLE001  (one failing section must not stop the rest)
            logger.error("section %s failed: %r\n%s", name, err, traceback.format_exc())
            results[name] = f"error: {err!r}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        write_json_atomic(out_path, results)
        logger.info("section %s: done in %.1f s", name, results["seconds"][name])
    logger.info("wrote %s", out_path)
    failed = [name for name in args.sections if str(results[name]).startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
