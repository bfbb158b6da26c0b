"""Logits and MoE-block outputs against HuggingFace's OLMoE with the same weights (fp32)."""

import pytest
import torch
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from olmoe.convert import config_to_hf, to_hf
from olmoe.moe import MoELayer
from tests.helpers import tiny_config, tiny_model


def _per_head_skewed_ids(vocab_size: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, vocab_size, (3, 24))


@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["raw-probs", "renormalized"])
@pytest.mark.parametrize("clip_qkv", [None, 0.5], ids=["no-clip", "clip"])
def test_logits_match_hf(norm_topk_prob, clip_qkv):
    model = tiny_model(norm_topk_prob=norm_topk_prob)
    model.config.clip_qkv = clip_qkv
    # Scale q_proj rows per head so the per-head RMS differs; a per-head q/k norm
    # (instead of one over the full width) then gives different logits.
    with torch.no_grad():
        for layer in model.layers:
            q = layer.self_attn.q_proj.weight
            q.mul_(torch.repeat_interleave(torch.tensor([0.25, 1.0, 3.0, 8.0]), 16)[:, None])
    hf_model = to_hf(model).eval()
    model.eval()
    ids = _per_head_skewed_ids(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_qk_norm_is_over_full_width():
    # The weights have non-constant norms and per-head scales; a per-head variant of the
    # norm must differ from HF, which proves the parity test above can fail.
    model = tiny_model().eval()
    attn = model.layers[0].self_attn
    x = torch.randn(1, 6, 64)
    q = attn.q_proj(x)
    full = attn.q_norm(q)
    per_head = torch.cat(
        [
            attn.q_norm.weight[i * 16 : (i + 1) * 16] * _rms(q[..., i * 16 : (i + 1) * 16])
            for i in range(4)
        ],
        dim=-1,
    )
    assert not torch.allclose(full, per_head, atol=1e-3)


def _rms(x):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["raw-probs", "renormalized"])
def test_moe_block_matches_hf(norm_topk_prob):
    torch.manual_seed(0)
    config = tiny_config(norm_topk_prob=norm_topk_prob)
    ours = MoELayer(config.moe, config.d_model)
    for param in ours.parameters():
        torch.nn.init.normal_(param, std=0.1)
    hf_config = config_to_hf(config)
    theirs = OlmoeSparseMoeBlock(hf_config)
    H = config.moe.expert_hidden
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        for e, expert in enumerate(theirs.experts):
            expert.gate_proj.weight.copy_(ours.experts.gate_up_weight[e, :, :H].t())
            expert.up_proj.weight.copy_(ours.experts.gate_up_weight[e, :, H:].t())
            expert.down_proj.weight.copy_(ours.experts.down_weight[e].t())
    x = torch.randn(2, 16, config.d_model)
    out = ours(x)
    hf_out, hf_logits = theirs(x)
    assert (out.hidden - hf_out).abs().max().item() < 1e-5
    assert torch.allclose(out.router.logits, hf_logits, atol=1e-6)
