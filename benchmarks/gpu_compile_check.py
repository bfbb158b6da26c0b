"""Compile every MoE kernel config for a GPU target without a GPU (ahead-of-time).

Triton's interpreter runs the kernels on the CPU but never compiles them, so a kernel can
pass the CPU tests and still fail to lower to PTX. This script compiles each autotune
config through Triton's CUDA backend (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the
bundled ptxas) and prints one JSON line per compile: shared memory, and whether the GEMMs
lowered to Hopper's wgmma instructions.

    python3 benchmarks/gpu_compile_check.py [--arch 90] [--dtypes bf16 fp32] [--first-only]

Run it with TRITON_INTERPRET unset (the interpreter replaces `triton.jit` at import).
The signature format is the one of triton 3.3 (`ASTSource` with a name -> type dict).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time

TORCH_TO_TRITON = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
DIVISIBLE = [["tt.divisibility", 16]]


def _kernel_specs(dtype: str):
    """Yield (name, autotuner, signature, constexprs, divisible args, unit args) per kernel.

    The launcher specializes integer arguments as a GPU launch would for OLMoE shapes:
    pointers and sizes divisible by 16, and unit strides turned into the constant 1.
    Without those, masked loads cannot be vectorized and the GEMM loops are not pipelined."""
    # `kernels.permute` the attribute is the function, so fetch the modules by name.
    grouped_gemm = importlib.import_module("kernels.grouped_gemm")
    permute = importlib.import_module("kernels.permute")

    pointer = f"*{dtype}"
    gemm_sizes = {"K": "i32", "M": "i32", "E": "i32", "N_BUCKET": "i32"}
    strides = ["stride_xn", "stride_xk", "stride_we", "stride_wk", "stride_wm"]
    strides += ["stride_on", "stride_om"]
    signature = {"x_ptr": pointer, "w_ptr": pointer, "out_ptr": pointer}
    signature.update({"group_offsets_ptr": "*i64", **gemm_sizes})
    signature.update({name: "i32" for name in strides})
    precision = "ieee" if dtype == "fp32" else "tf32"
    yield (
        "grouped_mm",
        grouped_gemm._grouped_mm_kernel,
        signature,
        {"BLOCK_E": 64, "INPUT_PRECISION": precision},
        ["x_ptr", "w_ptr", "out_ptr", "group_offsets_ptr", "K", "M"]
        + ["stride_xn", "stride_we", "stride_wk", "stride_on"],
        ["stride_xk", "stride_wm", "stride_om"],
    )

    strides = ["stride_xn", "stride_xk", "stride_dyn", "stride_dym"]
    strides += ["stride_dwe", "stride_dwk", "stride_dwm"]
    signature = {"x_ptr": pointer, "dy_ptr": pointer, "dw_ptr": pointer}
    signature.update({"group_offsets_ptr": "*i64", "K": "i32", "M": "i32", "N_BUCKET": "i32"})
    signature.update({name: "i32" for name in strides})
    yield (
        "grouped_mm_weight_grad",
        grouped_gemm._grouped_mm_weight_grad_kernel,
        signature,
        {"INPUT_PRECISION": precision},
        ["x_ptr", "dy_ptr", "dw_ptr", "group_offsets_ptr", "K", "M"]
        + ["stride_xn", "stride_dyn", "stride_dwe", "stride_dwk"],
        ["stride_xk", "stride_dym", "stride_dwm"],
    )

    signature = {"x_ptr": pointer, "out_ptr": pointer, "row_ids_ptr": "*i64"}
    signature.update({"N": "i32", "D": "i32", "TOP_K": "i32", "stride_x": "i32"})
    signature["stride_out"] = "i32"
    yield (
        "gather_rows",
        permute._gather_rows_kernel,
        signature,
        {},
        ["x_ptr", "out_ptr", "row_ids_ptr", "D", "stride_x", "stride_out"],
        [],
    )

    signature = {"y_ptr": pointer, "out_ptr": pointer, "inverse_ptr": "*i64"}
    signature.update({"weights_ptr": "*fp32", "T": "i32", "D": "i32"})
    signature.update({"stride_y": "i32", "stride_out": "i32"})
    yield (
        "combine",
        permute._combine_kernel,
        signature,
        {"TOP_K": 8, "HAS_WEIGHTS": True},
        ["y_ptr", "out_ptr", "inverse_ptr", "weights_ptr", "D", "stride_y", "stride_out"],
        [],
    )

    signature = {"grad_out_ptr": pointer, "y_ptr": pointer, "grad_y_ptr": pointer}
    signature.update({"row_ids_ptr": "*i64", "weights_ptr": "*fp32"})
    signature.update({"grad_weights_ptr": "*fp32", "N": "i32", "D": "i32", "TOP_K": "i32"})
    signature.update({"stride_grad_out": "i32", "stride_y": "i32", "stride_grad_y": "i32"})
    yield (
        "unpermute_backward",
        permute._unpermute_backward_kernel,
        signature,
        {"COMPUTE_GRAD_WEIGHTS": True},
        ["grad_out_ptr", "y_ptr", "grad_y_ptr", "row_ids_ptr", "weights_ptr"]
        + ["grad_weights_ptr", "D", "stride_grad_out", "stride_y", "stride_grad_y"],
        [],
    )


def compile_all(arch: int, dtypes: list[str], first_only: bool) -> list[dict]:
    """Compile each config of each kernel for `cuda:arch` and return one record per compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, 32)
    records = []
    for dtype in dtypes:
        for name, autotuner, signature, constexprs, divisible, ones in _kernel_specs(dtype):
            jit_fn = autotuner.fn
            configs = autotuner.configs[:1] if first_only else autotuner.configs
            for config in configs:
                constants = {**constexprs, **config.kwargs, **{arg: 1 for arg in ones}}
                full_signature = {**signature, **{key: "constexpr" for key in constants}}
                ordered = {arg: full_signature[arg] for arg in jit_fn.arg_names}
                attrs = {(jit_fn.arg_names.index(arg),): DIVISIBLE for arg in divisible}
                source = triton.compiler.ASTSource(jit_fn, ordered, constants, attrs)
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                start = time.perf_counter()
                compiled = triton.compile(source, target=target, options=options)
                ttgir = compiled.asm["ttgir"]
                records.append(
                    {
                        "kernel": name,
                        "dtype": dtype,
                        "config": {**config.kwargs, **options},
                        "shared_bytes": compiled.metadata.shared,
                        "wgmma": "warp_group_dot" in ttgir,
                        "pipelined": re.search(r"memdesc<\d+x\d+x\d+x", ttgir) is not None,
                        "cubin_bytes": len(compiled.asm["cubin"]),
                        "compile_s": round(time.perf_counter() - start, 2),
                    }
                )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    parser.add_argument(
        "--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(TORCH_TO_TRITON)
    )
    parser.add_argument(
        "--first-only", action="store_true", help="compile only the first config of each kernel"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    for record in compile_all(args.arch, args.dtypes, args.first_only):
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
