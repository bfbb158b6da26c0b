"""Small configs and models shared by the tests."""

from __future__ import annotations

import torch

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
