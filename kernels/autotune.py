"""Autotune configurations for the MoE kernels, one named function per kernel.

Each function returns the list of `triton.Config` that `triton.autotune` benchmarks on the
first call for a new key (problem sizes and dtypes). Under `TRITON_INTERPRET=1` every
function returns a single config, so CPU tests never benchmark.

The GEMM configs follow the tile shapes that suit Hopper (H100/H200) tensor cores. Most use
128-row tiles with 4 or 8 warps (one or two warpgroups for wgmma) and 3-4 pipeline stages.
Smaller tiles serve short groups and GPUs with less shared memory (A100: 164 KiB).
"""

from __future__ import annotations

from typing import Any

import triton

from kernels.device import interpreting

# Shared memory per block that Hopper allows with opt-in (227 KiB on H100/H200).
HOPPER_SHARED_MEMORY_BYTES = 232_448


def benchmark(kernel_call, quantiles):
    """Time a config with the active driver's benchmarker, looked up at the first call.

    `triton.autotune` looks its default up when the decorator runs, which fails on a
    machine without a GPU even when every kernel runs in the interpreter.
    """
    return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _gemm_config(block_a: int, block_b: int, block_c: int, warps: int, stages: int, names):
    return triton.Config(
        dict(zip(names, (block_a, block_b, block_c))), num_warps=warps, num_stages=stages
    )


def grouped_mm_configs() -> list[triton.Config]:
    """Configs for the grouped GEMM forward (and dX) kernel: BLOCK_N rows, BLOCK_M, BLOCK_K."""
    names = ("BLOCK_N", "BLOCK_M", "BLOCK_K")
    if interpreting():
        # Few large blocks: the interpreter runs each program instance in numpy.
        return [_gemm_config(64, 128, 128, 4, 1, names)]
    shapes = [
        # Hopper: two warpgroups on a 128 x 256 tile, or one on 128 x 128.
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        # Short groups and smaller shared memory.
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
    ]
    return [_gemm_config(*shape, names=names) for shape in shapes]


def grouped_mm_weight_grad_configs() -> list[triton.Config]:
    """Configs for the dW kernel: a BLOCK_K x BLOCK_M tile of dW[e], BLOCK_N rows per step."""
    names = ("BLOCK_K", "BLOCK_M", "BLOCK_N")
    if interpreting():
        return [_gemm_config(128, 128, 64, 4, 1, names)]
    shapes = [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 32, 4, 3),
    ]
    return [_gemm_config(*shape, names=names) for shape in shapes]


def _gemm_shared_memory_bytes(
    config: triton.Config, element_size: int, reduction: str, output: tuple[str, str]
) -> int:
    """Estimate a pipelined GEMM config's shared memory: one A and one B tile per stage.

    The tiles are (output[0], reduction) and (reduction, output[1]) blocks. The estimate
    is an upper bound: Triton 3.3 keeps num_stages - 1 buffers for some configs.
    """
    blocks = config.kwargs
    a_tile = blocks[output[0]] * blocks[reduction]
    b_tile = blocks[reduction] * blocks[output[1]]
    return config.num_stages * (a_tile + b_tile) * element_size


def _prune_gemm_configs(configs, named_args, kwargs, reduction: str, output: tuple[str, str]):
    args = {**named_args, **kwargs}
    x = args.get("x_ptr")
    element_size = x.element_size() if hasattr(x, "element_size") else 2

    def shared_bytes(config):
        return _gemm_shared_memory_bytes(config, element_size, reduction, output)

    fitting = [config for config in configs if shared_bytes(config) <= HOPPER_SHARED_MEMORY_BYTES]
    if element_size == 4:
        # fp32 is the correctness path (no bf16 tensor cores), and each fp32 config takes
        # seconds to compile, so only the configs that step 32 along the reduction remain.
        fitting = [config for config in fitting if config.kwargs[reduction] == 32] or fitting
    return fitting or [min(configs, key=shared_bytes)]


def prune_grouped_mm_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs):
    """Drop forward configs whose tiles would not fit in Hopper's shared memory.

    fp32 tiles take twice the bytes of bf16, so the largest tiles remain only for 16-bit
    inputs. The autotuner would also reject them at compile time, and pruning saves the
    compile. At least one config always remains.
    """
    return _prune_gemm_configs(configs, named_args, kwargs, "BLOCK_K", ("BLOCK_N", "BLOCK_M"))


def prune_weight_grad_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs):
    """Drop dW configs whose tiles would not fit in Hopper's shared memory (as above)."""
    return _prune_gemm_configs(configs, named_args, kwargs, "BLOCK_N", ("BLOCK_K", "BLOCK_M"))


def row_gather_configs() -> list[triton.Config]:
    """Configs for the permute gather and the unpermute backward: BLOCK_R rows, BLOCK_D cols."""
    if interpreting():
        return [triton.Config({"BLOCK_R": 64, "BLOCK_D": 256}, num_warps=4)]
    return [
        triton.Config({"BLOCK_R": 4, "BLOCK_D": 1024}, num_warps=4),
        triton.Config({"BLOCK_R": 8, "BLOCK_D": 512}, num_warps=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_D": 256}, num_warps=4),
        triton.Config({"BLOCK_R": 8, "BLOCK_D": 1024}, num_warps=8),
        triton.Config({"BLOCK_R": 32, "BLOCK_D": 128}, num_warps=4),
    ]


def combine_configs() -> list[triton.Config]:
    """Configs for the unpermute (weighted sum over k) kernel: BLOCK_T tokens, BLOCK_D cols."""
    if interpreting():
        return [triton.Config({"BLOCK_T": 32, "BLOCK_D": 256}, num_warps=4)]
    return [
        triton.Config({"BLOCK_T": 4, "BLOCK_D": 1024}, num_warps=4),
        triton.Config({"BLOCK_T": 8, "BLOCK_D": 512}, num_warps=4),
        triton.Config({"BLOCK_T": 16, "BLOCK_D": 256}, num_warps=4),
        triton.Config({"BLOCK_T": 8, "BLOCK_D": 1024}, num_warps=8),
        triton.Config({"BLOCK_T": 2, "BLOCK_D": 2048}, num_warps=8),
    ]
