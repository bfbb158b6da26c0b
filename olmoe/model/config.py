"""Typed model and MoE configs.

Both are plain dataclasses, so they serve as OmegaConf structured configs; string
choices are validated in `__post_init__` (OmegaConf does not accept `Literal`).
Every check raises `ConfigError` naming the field, the value and the constraint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value."""


def _fail(owner: str, name: str, value: Any, constraint: str) -> None:
    raise ConfigError(f"{owner}.{name}={value!r} is invalid: {constraint}")


def _check_positive(owner: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            _fail(owner, name, value, "must be a positive integer")


def _check_choice(owner: str, obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        _fail(owner, name, value, f"must be one of {list(choices)}")


MOE_BACKENDS = ("auto", "torch", "triton")
ATTENTION_BACKENDS = ("sdpa", "flash")


@dataclass
class MoEConfig:
    """The mixture-of-experts feed-forward layer and its router."""

    num_experts: int = 64
    """E: number of routed experts per layer."""
    top_k: int = 8
    """K: experts each token is routed to (distinct, 1 <= K <= E)."""
    expert_hidden: int = 1024
    """H: hidden width of each SwiGLU expert."""
    norm_topk_prob: bool = False
    """Renormalize the K selected probabilities to sum to 1 (OLMoE: false)."""
    router_jitter: float = 0.0
    """Multiplicative uniform noise on the router input in training: x * U(1-j, 1+j)."""
    capacity_factor: float | None = None
    """None for dropless; otherwise each expert takes at most ceil(cf * T * K / E) tokens."""
    shared_expert_hidden: int = 0
    """Hidden width of a dense SwiGLU expert every token also passes through (0: none)."""
    lb_loss_weight: float = 0.01
    """Weight of the load-balancing loss in the training loss."""
    z_loss_weight: float = 0.001
    """Weight of the router z-loss in the training loss."""
    z_loss_divide_by_top_k: bool = False
    """Divide the z-loss by K as the OLMoE-1B-7B run did (see docs/model.md)."""
    backend: str = "auto"
    """Expert computation: 'torch', 'triton', or 'auto' (Triton on CUDA, PyTorch on CPU)."""

    def __post_init__(self) -> None:
        owner = "moe"
        _check_positive(owner, self, "num_experts", "top_k", "expert_hidden")
        if self.top_k > self.num_experts:
            _fail(owner, "top_k", self.top_k, f"must be <= moe.num_experts={self.num_experts}")
        if not 0.0 <= self.router_jitter < 1.0:
            _fail(owner, "router_jitter", self.router_jitter, "must be in [0, 1)")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            _fail(owner, "capacity_factor", self.capacity_factor, "must be > 0 or null")
        if self.shared_expert_hidden < 0:
            _fail(owner, "shared_expert_hidden", self.shared_expert_hidden, "must be >= 0")
        for name in ("lb_loss_weight", "z_loss_weight"):
            if getattr(self, name) < 0:
                _fail(owner, name, getattr(self, name), "must be >= 0")
        _check_choice(owner, self, "backend", MOE_BACKENDS)


@dataclass
class ModelConfig:
    """An OLMoE decoder. Defaults are OLMoE-1B-7B."""

    vocab_size: int = 50304
    """Rows of the embedding and of the (untied) LM head."""
    d_model: int = 2048
    """D: residual stream width."""
    n_layers: int = 16
    """Number of decoder blocks."""
    n_heads: int = 16
    """Attention query heads; head_dim = d_model / n_heads."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (None: same as n_heads)."""
    max_seq_len: int = 4096
    """Maximum sequence length the model is trained on (used for FLOP counts and checks)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    clip_qkv: float | None = None
    """Clamp q, k and v to [-clip_qkv, clip_qkv] after the q/k norms (None: off)."""
    attention_backend: str = "sdpa"
    """'sdpa' (PyTorch scaled_dot_product_attention) or 'flash' (flash-attn, CUDA only)."""
    init_std: float = 0.02
    """Std of the normal init, truncated at 3 std, used for every weight matrix."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE feed-forward layer of every block."""

    def __post_init__(self) -> None:
        owner = "model"
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        _check_positive(owner, self, "vocab_size", "d_model", "n_layers", "n_heads")
        _check_positive(owner, self, "max_seq_len")
        if self.d_model % self.n_heads != 0:
            _fail(owner, "d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            _fail(owner, "n_heads", self.n_heads, "d_model / n_heads must be even for RoPE")
        if self.n_kv_heads is not None:
            _check_positive(owner, self, "n_kv_heads")
            if self.n_heads % self.n_kv_heads != 0:
                _fail(
                    owner,
                    "n_kv_heads",
                    self.n_kv_heads,
                    f"must divide n_heads={self.n_heads}",
                )
        if self.rope_theta <= 0:
            _fail(owner, "rope_theta", self.rope_theta, "must be > 0")
        if self.norm_eps <= 0:
            _fail(owner, "norm_eps", self.norm_eps, "must be > 0")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            _fail(owner, "clip_qkv", self.clip_qkv, "must be > 0 or null")
        if self.init_std <= 0:
            _fail(owner, "init_std", self.init_std, "must be > 0")
        _check_choice(owner, self, "attention_backend", ATTENTION_BACKENDS)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self) -> dict[str, int]:
        """Count parameters from the config: total, and active per token (K of E experts)."""
        D, V, L = self.d_model, self.vocab_size, self.n_layers
        E, K, H = self.moe.num_experts, self.moe.top_k, self.moe.expert_hidden
        kv_width = self.kv_heads * self.head_dim
        attention = 2 * D * D + 2 * D * kv_width + D + kv_width  # q, o, k, v, q_norm, k_norm
        norms = 2 * D
        router = D * E
        expert = 3 * D * H
        shared = 3 * D * self.moe.shared_expert_hidden
        dense_per_layer = attention + norms + router + shared
        embeddings = 2 * V * D  # input embedding and untied LM head
        total = embeddings + D + L * (dense_per_layer + E * expert)
        active = embeddings + D + L * (dense_per_layer + K * expert)
        return {"total": total, "active": active}

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 * active matmul params + attention.

        The embedding lookup is excluded and the LM head included. The attention term,
        12 * L * D * S, counts the full S x S score matrix (causal masking is not discounted).
        """
        seq_len = self.max_seq_len if seq_len is None else seq_len
        matmul_params = self.num_params()["active"] - self.vocab_size * self.d_model
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.d_model * seq_len
