"""The OLMoE decoder: pre-norm blocks of attention and a dropless MoE feed-forward.

Dims: B = batch, S = sequence, D = d_model, V = vocab, L = layers, E = experts, K = top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from olmoe.model.config import ModelConfig
from olmoe.model.cross_entropy import linear_cross_entropy
from olmoe.model.layers import Attention, RMSNorm, rotary_cos_sin
from olmoe.moe.layer import MoELayer


@dataclass
class OlmoeOutput:
    logits: torch.Tensor | None
    """(B, S, V) next-token logits; None when `labels` were given (see `loss`)."""
    lb_loss: torch.Tensor
    """() load-balancing loss averaged over layers (not pooled across them)."""
    z_loss: torch.Tensor
    """() router z-loss averaged over layers."""
    tokens_per_expert: torch.Tensor
    """(L, E) int64 top-k assignments of real tokens per expert and layer."""
    num_dropped: torch.Tensor
    """() int64 assignments dropped by capacity limits, summed over layers."""
    expert_indices: list[torch.Tensor] = field(default_factory=list)
    """Per layer (B, S, K) selected experts in rank order; filled when output_routing."""
    expert_probs: list[torch.Tensor] = field(default_factory=list)
    """Per layer (B, S, K) fp32 softmax probabilities of the selected experts."""
    loss: torch.Tensor | None = None
    """() fp32 mean cross-entropy over the labels that count, when `labels` were given."""


class OlmoeBlock(nn.Module):
    """x + attn(norm(x)), then + moe(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MoELayer(config.moe, config.d_model)

    def forward(self, x, rotary, attention_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rotary, attention_mask)
        moe_out = self.mlp(self.post_attention_layernorm(x), attention_mask)
        return x + moe_out.hidden, moe_out


class OlmoeModel(nn.Module):
    """OLMoE decoder with an untied LM head. Knows nothing about parallelism."""

    def __init__(self, config: ModelConfig, init: bool = True):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(OlmoeBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if init:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) truncated at 3 std for every weight matrix, router included;
        norm weights are 1."""
        std = self.config.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                nn.init.trunc_normal_(param, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def num_params(self, active: bool = False) -> int:
        """Count parameters by walking the module; `active` counts K of E experts per layer."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        moe = self.config.moe
        inactive = 0
        for layer in self.layers:
            expert_params = sum(p.numel() for p in layer.mlp.experts.parameters())
            inactive += expert_params // moe.num_experts * (moe.num_experts - moe.top_k)
        return total - inactive

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_routing: bool = False,
        labels: torch.Tensor | None = None,
    ) -> OlmoeOutput:
        """`input_ids` (B, S); `attention_mask` (B, S) is 1 for real tokens, 0 for padding.

        `labels` (B, S) hold the target token of each position, already shifted, and -100
        where a position does not count. With labels, the output carries the mean
        cross-entropy as `loss` and no logits. The LM head and the loss then run in token
        chunks (`linear_cross_entropy`), and the (B, S, V) logits are never built.
        """
        B, S = input_ids.shape
        # shape: (B, S, D)
        x = self.embed_tokens(input_ids)
        rotary = rotary_cos_sin(S, self.config.head_dim, self.config.rope_theta, x.device, x.dtype)
        moe_outputs = []
        for layer in self.layers:
            x, moe_out = layer(x, rotary, attention_mask)
            moe_outputs.append(moe_out)

        x = self.norm(x)
        if labels is None:
            # shape: (B, S, V)
            logits, loss = self.lm_head(x), None
        else:
            logits, loss = None, linear_cross_entropy(x, self.lm_head.weight, labels)
        output = OlmoeOutput(
            logits=logits,
            loss=loss,
            lb_loss=torch.stack([m.lb_loss for m in moe_outputs]).mean(),
            z_loss=torch.stack([m.z_loss for m in moe_outputs]).mean(),
            tokens_per_expert=torch.stack([m.tokens_per_expert for m in moe_outputs]),
            num_dropped=torch.stack([m.num_dropped for m in moe_outputs]).sum(),
        )
        if output_routing:
            for m in moe_outputs:
                output.expert_indices.append(m.router.expert_indices.view(B, S, -1))
                output.expert_probs.append(m.router.expert_probs.view(B, S, -1))
        return output
