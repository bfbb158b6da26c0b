"""Building blocks of the OLMoE decoder: RMSNorm, rotary embeddings, attention.

Dims: B = batch, S = sequence, D = d_model, nh = query heads, nkv = key/value heads,
hd = head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from olmoe.model.config import ModelConfig


class _RMSNormFunction(torch.autograd.Function):
    """y = weight * (x * rsqrt(mean(x^2) + eps)), with a backward of few temporaries.

    The forward is the same arithmetic as autograd through the plain expression (and as
    HF's `OlmoeRMSNorm`). The backward saves only x and the (..., 1) rstd and computes
    dx = rstd * (g w - x_hat * mean(g w x_hat)) and dw = sum(g x_hat) with three
    (..., D) temporaries, where autograd through the expression builds about eight.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        input_dtype = x.dtype
        x32 = x.float()
        # shape: (..., 1)
        rstd = torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
        y = (x32 * rstd).to(input_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.mul_(weight) if y.dtype == weight.dtype else weight * y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        # shape: (..., D) normalized input in fp32
        x_hat = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * x_hat.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # shape: (..., D) gradient with respect to x_hat
            grad_x_hat = (grad_y * weight).float()
            dot = (grad_x_hat * x_hat).mean(dim=-1, keepdim=True)
            grad_x = grad_x_hat.sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled by a learned weight in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables (S, hd) in the half-split layout: the frequency vector is repeated twice."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    # shape: (S, hd / 2) -> (S, hd)
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, S, hd) by the RoPE tables; pairs are (i, i + hd/2)."""
    half = x.shape[-1] // 2
    # shape: (..., hd) halves swapped, (x2, x1); the sign of the rotation goes on sin.
    # The backward of a flip is a flip; slicing and `cat` would zero-fill full-size grads.
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return x * cos + swapped * signed_sin


class Attention(nn.Module):
    """Causal self-attention with q/k RMSNorm over the full projected width, then RoPE."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, hd = config.d_model, config.head_dim
        self.n_heads = config.n_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = hd
        kv_width = self.n_kv_heads * hd
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, kv_width, bias=False)
        self.v_proj = nn.Linear(D, kv_width, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        # The norms see the whole projection (all heads at once), before the head split.
        self.q_norm = RMSNorm(D, config.norm_eps)
        self.k_norm = RMSNorm(kv_width, config.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S, D = x.shape
        q = self.q_norm(self.q_proj(x))
        k = self.k_norm(self.k_proj(x))
        v = self.v_proj(x)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)

        # shape: (B, S, heads * hd) -> (B, heads, S, hd)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if self.config.attention_backend == "flash":
            out = self._flash_attention(q, k, v, attention_mask)
        else:
            out = self._sdpa(q, k, v, attention_mask)
        # shape: (B, nh, S, hd) -> (B, S, D)
        out = out.transpose(1, 2).reshape(B, S, D)
        return self.o_proj(out)

    def _sdpa(self, q, k, v, attention_mask):
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        if attention_mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        S = q.shape[2]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        # shape: (B, 1, S, S), true where the key is causal and a real token. Each query also
        # attends to itself, so no row of a padded query is empty (an empty row gives NaN).
        mask = causal & attention_mask.to(torch.bool)[:, None, None, :]
        mask = mask | torch.eye(S, dtype=torch.bool, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _flash_attention(self, q, k, v, attention_mask):
        try:
            from flash_attn import flash_attn_func
        except ImportError as err:
            raise ImportError(
                "model.attention_backend='flash' needs flash-attn (pip install '.[gpu]') "
                "on a CUDA machine; use attention_backend=sdpa otherwise"
            ) from err
        if attention_mask is not None:
            raise ValueError(
                "attention_backend='flash' does not take an attention mask here; "
                "use attention_backend=sdpa for padded batches"
            )
        # flash-attn takes (B, S, heads, hd) and handles grouped-query heads itself.
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
