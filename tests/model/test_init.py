import torch

from olmoe.model import ModelConfig, MoEConfig, OlmoeModel


def test_init_truncated_normal_everywhere():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=512,
        d_model=128,
        n_layers=1,
        n_heads=4,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=128),
    )
    model = OlmoeModel(config)
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        assert param.abs().max() <= 3 * 0.02 + 1e-7, name
        # A normal truncated at 3 std has std 0.02 * 0.9866.
        assert abs(param.std().item() - 0.02 * 0.9866) < 0.002, name
        assert abs(param.mean().item()) < 0.002, name
