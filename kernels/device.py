"""Device checks for the kernels, which run on CUDA tensors or under Triton's CPU interpreter."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Return True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kernel_device(device: torch.device, op: str) -> None:
    """Raise ValueError unless Triton can run on `device`: CUDA, or any device when interpreting."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op}: Triton kernels need CUDA tensors, got tensors on {device}; move them to a "
            "GPU, use the 'torch' MoE backend, or set TRITON_INTERPRET=1 before importing triton"
        )
