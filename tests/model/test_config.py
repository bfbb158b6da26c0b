import pytest
from omegaconf import OmegaConf

from olmoe.model import ConfigError, ModelConfig, MoEConfig
from tests.helpers import tiny_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_k=9, num_experts=8), "moe.top_k=9 is invalid: must be <= moe.num_experts=8"),
        (dict(top_k=0), "moe.top_k=0 is invalid"),
        (dict(backend="cuda"), "moe.backend='cuda' is invalid: must be one of"),
        (dict(capacity_factor=0.0), "moe.capacity_factor=0.0 is invalid"),
        (dict(router_jitter=1.5), "moe.router_jitter=1.5 is invalid"),
    ],
)
def test_moe_config_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(d_model=100, n_heads=16),
            "model.d_model=100 is invalid: must be divisible by n_heads",
        ),
        (dict(n_heads=16, n_kv_heads=3), "model.n_kv_heads=3 is invalid: must divide n_heads"),
        (dict(attention_backend="xformers"), "model.attention_backend='xformers' is invalid"),
        (dict(vocab_size=0), "model.vocab_size=0 is invalid"),
        (dict(d_model=48, n_heads=16), "d_model / n_heads must be even"),
    ],
)
def test_model_config_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)


def test_config_validates_through_omegaconf():
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"moe": {"top_k": 65}}))
    with pytest.raises(ConfigError, match="moe.top_k=65"):
        OmegaConf.to_object(merged)


def test_olmoe_1b_7b_param_count():
    # Published OLMoE-1B-7B: 6.9B total, 1.3B active parameters.
    counts = ModelConfig().num_params()
    assert 6.9e9 < counts["total"] < 7.0e9
    assert 1.2e9 < counts["active"] < 1.35e9


def test_num_params_matches_module():
    model = tiny_model()
    counts = model.config.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == model.num_params()
    assert counts["active"] == model.num_params(active=True)


def test_num_params_with_shared_expert():
    model = tiny_model(shared_expert_hidden=16)
    assert model.config.num_params()["total"] == sum(p.numel() for p in model.parameters())
