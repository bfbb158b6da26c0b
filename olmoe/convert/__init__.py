"""Conversion between olmoe models and HuggingFace `OlmoeForCausalLM`, both ways.

Weight layout: HF keeps one `OlmoeMLP` per expert with `gate_proj`/`up_proj` (H, D) and
`down_proj` (D, H); olmoe stacks them as `gate_up_weight` (E, D, 2H), gate columns first,
and `down_weight` (E, H, D). transformers 5 stores the experts fused as
`gate_up_proj` (E, 2H, D) and `down_proj` (E, D, H); `from_hf` reads both layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from olmoe.model.config import ModelConfig, MoEConfig
from olmoe.model.model import OlmoeModel

if TYPE_CHECKING:
    from transformers import OlmoeConfig, OlmoeForCausalLM

# HF config fields that olmoe does not model, with the only value it accepts.
_HF_REQUIRED_VALUES = {
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "rope_scaling": None,
}
_HF_IGNORED_FIELDS = "attention_dropout", "output_router_logits", "use_cache"


class ConversionError(ValueError):
    """A config or checkpoint that cannot be converted faithfully."""


def config_from_hf(hf_config: OlmoeConfig) -> ModelConfig:
    """Map an `OlmoeConfig` onto ModelConfig; unsupported settings raise ConversionError."""
    for name, expected in _HF_REQUIRED_VALUES.items():
        value = getattr(hf_config, name, expected)
        if value != expected:
            raise ConversionError(
                f"HF config {name}={value!r} is not supported by olmoe (expected {expected!r})"
            )
    dropout = getattr(hf_config, "attention_dropout", 0.0)
    if dropout:
        raise ConversionError(f"HF config attention_dropout={dropout} is not supported (use 0.0)")
    rope_theta = getattr(hf_config, "rope_theta", None)
    if rope_theta is None:
        # transformers 5 keeps the base frequency in rope_parameters.
        rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 1e4)
    kv_heads = hf_config.num_key_value_heads
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=None if kv_heads == hf_config.num_attention_heads else kv_heads,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope_theta),
        norm_eps=hf_config.rms_norm_eps,
        clip_qkv=hf_config.clip_qkv,
        init_std=hf_config.initializer_range,
        moe=MoEConfig(
            num_experts=hf_config.num_experts,
            top_k=hf_config.num_experts_per_tok,
            expert_hidden=hf_config.intermediate_size,
            norm_topk_prob=hf_config.norm_topk_prob,
            lb_loss_weight=hf_config.router_aux_loss_coef,
        ),
    )


def config_to_hf(config: ModelConfig, **extra) -> OlmoeConfig:
    """Map ModelConfig onto an `OlmoeConfig`; features HF's model lacks raise ConversionError."""
    from transformers import OlmoeConfig

    moe = config.moe
    if moe.shared_expert_hidden:
        raise ConversionError(
            f"moe.shared_expert_hidden={moe.shared_expert_hidden}: HF OlmoeForCausalLM has no "
            "shared expert"
        )
    if moe.capacity_factor is not None:
        raise ConversionError(
            f"moe.capacity_factor={moe.capacity_factor}: HF OlmoeForCausalLM is dropless and "
            "would compute different outputs; set capacity_factor=null before converting"
        )
    return OlmoeConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=moe.expert_hidden,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        clip_qkv=config.clip_qkv,
        initializer_range=config.init_std,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.lb_loss_weight,
        tie_word_embeddings=False,
        **extra,
    )


_SHARED_KEYS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    """Rename and restack an HF OLMoE state dict into olmoe's layout."""
    hf_state = dict(hf_state)
    state = {}
    for ours, theirs in _SHARED_KEYS.items():
        state[ours] = _pop(hf_state, theirs)
    H = config.moe.expert_hidden
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        for key in _LAYER_KEYS:
            state[f"layers.{i}.{key}"] = _pop(hf_state, prefix + key)
        state[f"layers.{i}.mlp.router.weight"] = _pop(hf_state, prefix + "mlp.gate.weight")
        fused_key = prefix + "mlp.experts.gate_up_proj"
        if fused_key in hf_state:
            # transformers 5: (E, 2H, D) and (E, D, H).
            gate_up = _pop(hf_state, fused_key).transpose(1, 2)
            down = _pop(hf_state, prefix + "mlp.experts.down_proj").transpose(1, 2)
        else:
            gates, ups, downs = [], [], []
            for e in range(config.moe.num_experts):
                expert = f"{prefix}mlp.experts.{e}."
                gates.append(_pop(hf_state, expert + "gate_proj.weight").t())
                ups.append(_pop(hf_state, expert + "up_proj.weight").t())
                downs.append(_pop(hf_state, expert + "down_proj.weight").t())
            gate_up = torch.cat([torch.stack(gates), torch.stack(ups)], dim=2)
            down = torch.stack(downs)
        if gate_up.shape[2] != 2 * H:
            raise ConversionError(
                f"layer {i}: expert gate/up width {gate_up.shape[2] // 2} != intermediate_size {H}"
            )
        state[f"layers.{i}.mlp.experts.gate_up_weight"] = gate_up.contiguous()
        state[f"layers.{i}.mlp.experts.down_weight"] = down.contiguous()
    leftover = [k for k in hf_state if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ConversionError(f"HF checkpoint has unsupported tensors: {sorted(leftover)[:8]}")
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict:
    """Rename and unstack an olmoe state dict into transformers 4's per-expert layout."""
    hf_state = {}
    for ours, theirs in _SHARED_KEYS.items():
        hf_state[theirs] = state[ours]
    H = config.moe.expert_hidden
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        for key in _LAYER_KEYS:
            hf_state[prefix + key] = state[f"layers.{i}.{key}"]
        hf_state[prefix + "mlp.gate.weight"] = state[f"layers.{i}.mlp.router.weight"]
        gate_up = state[f"layers.{i}.mlp.experts.gate_up_weight"]
        down = state[f"layers.{i}.mlp.experts.down_weight"]
        for e in range(config.moe.num_experts):
            expert = f"{prefix}mlp.experts.{e}."
            hf_state[expert + "gate_proj.weight"] = gate_up[e, :, :H].t().contiguous()
            hf_state[expert + "up_proj.weight"] = gate_up[e, :, H:].t().contiguous()
            hf_state[expert + "down_proj.weight"] = down[e].t().contiguous()
    return hf_state


def _pop(state: dict, key: str) -> torch.Tensor:
    try:
        return state.pop(key)
    except KeyError:
        raise ConversionError(f"HF checkpoint is missing tensor {key!r}") from None


def from_hf(model_or_path: OlmoeForCausalLM | str | Path) -> OlmoeModel:
    """Build an olmoe model with the weights of an `OlmoeForCausalLM` or an HF directory."""
    if isinstance(model_or_path, (str, Path)):
        from transformers import OlmoeForCausalLM

        path = Path(model_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found; expected an HF model dir")
        hf_model = OlmoeForCausalLM.from_pretrained(str(path), torch_dtype="auto")
    else:
        hf_model = model_or_path
    config = config_from_hf(hf_model.config)
    dtype = hf_model.lm_head.weight.dtype
    model = OlmoeModel(config, init=False).to(dtype)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config), strict=True)
    return model


def to_hf(model: OlmoeModel) -> OlmoeForCausalLM:
    """Build an `OlmoeForCausalLM` (transformers 4 layout) with the weights of `model`."""
    from transformers import OlmoeForCausalLM

    config = config_to_hf(model.config)
    dtype = model.lm_head.weight.dtype
    config.torch_dtype = dtype
    hf_model = OlmoeForCausalLM(config).to(dtype)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    missing, unexpected = hf_model.load_state_dict(
        state_dict_to_hf(state, model.config), strict=False
    )
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ConversionError(
            f"HF model layout differs from olmoe's (installed transformers may store experts "
            f"differently): missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    hf_model.eval()
    return hf_model
