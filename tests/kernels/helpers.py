"""Helpers for the kernel tests: NaN-filled allocations and NaN guard rows around inputs."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def nan_filled_allocations():
    """Make torch.empty and friends fill new tensors with NaN, so unwritten outputs show."""
    previous_mode = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_mode)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def guarded(tensor: torch.Tensor, guard_rows: int = 3) -> torch.Tensor:
    """Return a contiguous copy of `tensor` that sits between NaN rows of one buffer.

    A kernel that reads past either end of the view picks up NaN.
    """
    rows = tensor.shape[0]
    flat = tensor.reshape(rows, -1)
    buffer = torch.full((rows + 2 * guard_rows, flat.shape[1]), float("nan"))
    buffer[guard_rows : guard_rows + rows] = flat
    return buffer[guard_rows : guard_rows + rows].view(tensor.shape)
