"""Triton kernels for the MoE layer: grouped GEMM and token permutation.

Importing `kernels.backend` registers these kernels as the 'triton' MoE backend.
Only torch and triton are imported here.
"""

from kernels.grouped_gemm import grouped_mm, grouped_mm_reference
from kernels.permute import (
    PermuteOutput,
    permute,
    permute_reference,
    permute_rows,
    routing_plan,
    unpermute,
    unpermute_reference,
)

__all__ = [
    "PermuteOutput",
    "grouped_mm",
    "grouped_mm_reference",
    "permute",
    "permute_reference",
    "permute_rows",
    "routing_plan",
    "unpermute",
    "unpermute_reference",
]
