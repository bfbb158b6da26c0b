"""Cross-entropy of the LM head computed in token chunks, without the (T, V) logits.

Dims: T = tokens, D = d_model, V = vocab, C = tokens per chunk.

`linear_cross_entropy(hidden, weight, labels)` equals

    F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)

up to rounding, but never keeps more than one (C, V) chunk of logits. For each chunk,
the forward computes the logits, the loss, and at once the gradients with respect to
the hidden states and the head weight (softmax minus one-hot, over the label count).
The backward only scales these stored gradients by the incoming gradient. Without the
full logits, their log-softmax and their gradient (three (T, V) fp32 tensors, 64 MiB
each in the demo), a training step saves that memory and, on CPU, the page faults of
allocating it fresh every step.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def default_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Return the tokens per chunk: about 2M logits (8 MiB fp32) on CPU, 64M on GPUs."""
    budget = 2**21 if device.type == "cpu" else 2**26
    return max(16, budget // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens):
        # hidden: (T, D), weight: (V, D), labels: (T,) int64
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        valid = labels != ignore_index
        # NOTE: host sync: the mean divides by the number of labels that count.
        num_valid = int(valid.sum())
        scale = 1.0 / num_valid if num_valid > 0 else math.nan

        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        # shape: (C, 1) the -1 of the one-hot term
        minus_one = hidden.new_full((chunk_tokens, 1), -1.0, dtype=torch.float32)
        # fp32 without autocast (the CPU case) writes every chunk into the same buffers.
        plain = hidden.dtype == weight.dtype == torch.float32
        plain = plain and not torch.is_autocast_enabled(hidden.device.type)
        if plain:
            logits_buffer = hidden.new_empty(chunk_tokens, weight.shape[0])
            log_probs_buffer = hidden.new_empty(chunk_tokens, weight.shape[0])
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            h, y, keep = hidden[start:end], labels[start:end], valid[start:end]
            C = h.shape[0]
            # shape: (C, V) fp32 log-probabilities of this chunk
            if plain:
                logits = torch.mm(h, weight.t(), out=logits_buffer[:C])
                log_probs = torch.log_softmax(logits, dim=1, out=log_probs_buffer[:C])
            else:
                log_probs = torch.log_softmax((h @ weight.t()).float(), dim=1)
            # shape: (C, 1) column of each label (0 where ignored), and its row's scale
            columns = y.clamp(min=0).unsqueeze(1)
            row_scale = (keep * scale).unsqueeze(1)
            loss_sum -= log_probs.gather(1, columns).squeeze(1).masked_fill(~keep, 0.0).sum()
            if not (need_hidden or need_weight):
                continue
            # shape: (C, V) softmax - one_hot. The 1 / labels scale and the zeros of ignored
            # rows go on the (C, D) operands below, which are smaller than this block.
            grad_logits = log_probs.exp_().scatter_add_(1, columns, minus_one[:C])
            if need_hidden:
                # shape: (C, V) @ (V, D) -> (C, D)
                if plain:
                    torch.mm(grad_logits, weight, out=grad_hidden[start:end]).mul_(row_scale)
                else:
                    grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight) * row_scale
            if need_weight:
                # shape: (V, C) @ (C, D) -> (V, D), summed over chunks in fp32
                h_scaled = h * row_scale.to(h.dtype)
                if plain:
                    grad_weight.addmm_(grad_logits.t(), h_scaled)
                else:
                    grad_weight += (grad_logits.t().to(h.dtype) @ h_scaled).float()

        saved = [g for g in (grad_hidden, grad_weight) if g is not None]
        ctx.save_for_backward(*saved)
        ctx.weight_dtype = weight.dtype
        return loss_sum * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        saved = iter(ctx.saved_tensors)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = grad_weight = None
        if need_hidden:
            grad_hidden = next(saved)
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if need_weight:
            grad_weight = (next(saved) * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Compute the mean cross-entropy of `hidden @ weight.T` against `labels` in chunks.

    `hidden` (..., D), `weight` (V, D), `labels` (...) int64 with `ignore_index` for
    positions that do not count. Returns a () fp32 tensor, NaN when no label counts
    (as `F.cross_entropy`). The gradients are computed during the forward and scaled
    by the backward; second-order gradients are not supported (`once_differentiable`).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden shape without its last "
            f"dim, {tuple(hidden.shape[:-1])}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden width {hidden.shape[-1]} does not match weight shape {tuple(weight.shape)}"
        )
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0], hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(hidden, weight, labels.reshape(-1), ignore_index, chunk_tokens)
