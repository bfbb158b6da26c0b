"""The 'triton' MoE backend: the kernels of this package behind `olmoe.moe.backend`'s contract.

Importing this module registers `TritonBackend()` under the name 'triton';
`olmoe.moe.backend.get_backend` imports it on first use.
"""

from __future__ import annotations

import torch

from kernels.grouped_gemm import grouped_mm
from kernels.permute import permute_rows, unpermute
from olmoe.moe.backend import register_backend


class TritonBackend:
    """Triton gather, grouped GEMM and k-ordered combine; the same numbers as `TorchBackend`.

    Inputs are made contiguous here because the contract does not require it and the
    kernels do. Under autocast, `grouped_mm` casts x and w to the autocast dtype, as
    `torch.mm` does in the PyTorch backend.
    """

    name = "triton"

    def permute(self, x: torch.Tensor, row_ids: torch.Tensor, top_k: int) -> torch.Tensor:
        # shape: (N, D)
        return permute_rows(x.contiguous(), row_ids.contiguous(), top_k)

    def grouped_mm(
        self, x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor
    ) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, w = x.to(dtype), w.to(dtype)
        return grouped_mm(x.contiguous(), w.contiguous(), group_sizes)

    def unpermute(
        self, y: torch.Tensor, row_ids: torch.Tensor, combine_weights: torch.Tensor
    ) -> torch.Tensor:
        # shape: (T, D)
        return unpermute(y.contiguous(), row_ids.contiguous(), combine_weights.contiguous())


register_backend(TritonBackend())
