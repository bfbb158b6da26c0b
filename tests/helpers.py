"""Small configs and models shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olmoe.model import ModelConfig, MoEConfig, OlmoeModel


def tiny_config(**moe_overrides) -> ModelConfig:
    moe = dict(num_experts=8, top_k=2, expert_hidden=32)
    moe.update(moe_overrides)
    return ModelConfig(
        vocab_size=128,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=64,
        moe=MoEConfig(**moe),
    )


def tiny_model(seed: int = 0, **moe_overrides) -> OlmoeModel:
    """A tiny model whose norm weights are not all 1, so q/k-norm mistakes show up."""
    torch.manual_seed(seed)
    model = OlmoeModel(tiny_config(**moe_overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def swiglu_token_loop(x, combine_weights, expert_indices, gate_up_weight, down_weight):
    """Token-by-token sum_k w_k * SwiGLU_{e_k}(x_t), differentiable through autograd."""
    H = down_weight.shape[1]
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros_like(x[t])
        for k in range(expert_indices.shape[1]):
            e = expert_indices[t, k]
            gate_up = x[t] @ gate_up_weight[e]
            hidden = F.silu(gate_up[:H]) * gate_up[H:]
            total = total + combine_weights[t, k] * (hidden @ down_weight[e])
        rows.append(total)
    return torch.stack(rows)
