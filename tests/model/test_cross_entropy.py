"""Chunked LM-head cross-entropy against `F.cross_entropy` on the full logits.

The reference runs in fp64 on the full (T, V) logits. Ours computes the logits in fp32
chunk by chunk: losses agree to ~1e-6 relative, gradients (of order 1e-3) to 1e-7.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from olmoe.model.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from olmoe.train.composer_model import next_token_labels
from tests.helpers import tiny_model


def problem(seed=0, T=300, D=24, V=97, ignored_every=7):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=generator)
    weight = torch.randn(V, D, generator=generator) * 0.3
    labels = torch.randint(0, V, (T,), generator=generator)
    if ignored_every:
        labels[::ignored_every] = IGNORE_INDEX
    return hidden, weight, labels


def reference(hidden, weight, labels):
    """Loss and gradients of F.cross_entropy on the full fp64 logits."""
    hidden = hidden.double().requires_grad_()
    weight = weight.double().requires_grad_()
    loss = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    return loss, grad_hidden, grad_weight


@pytest.mark.parametrize("chunk_tokens", [1, 64, 77, 300, 1000])
def test_matches_full_logits(chunk_tokens):
    hidden, weight, labels = problem()
    want_loss, want_hidden, want_weight = reference(hidden, weight, labels)
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_hidden.double(), want_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_weight.double(), want_weight, rtol=1e-5, atol=1e-7)


def test_backward_scales_with_the_incoming_gradient():
    hidden, weight, labels = problem(seed=1)
    _, want_hidden, want_weight = reference(hidden, weight, labels)
    hidden.requires_grad_()
    weight.requires_grad_()
    (2.5 * linear_cross_entropy(hidden, weight, labels, chunk_tokens=50)).backward()
    torch.testing.assert_close(hidden.grad.double(), 2.5 * want_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad.double(), 2.5 * want_weight, rtol=1e-5, atol=1e-7)


def test_ignored_positions_get_no_gradient():
    hidden, weight, labels = problem(seed=2, ignored_every=3)
    hidden.requires_grad_()
    linear_cross_entropy(hidden, weight, labels, chunk_tokens=40).backward()
    ignored = labels == IGNORE_INDEX
    assert torch.count_nonzero(hidden.grad[ignored]) == 0
    assert torch.count_nonzero(hidden.grad[~ignored].abs().sum(1)) == int((~ignored).sum())


def test_extreme_logits_stay_finite():
    # Logit gaps of several hundred: probabilities underflow in fp32, log-probs do not.
    hidden, weight, labels = problem(seed=3, ignored_every=0)
    hidden = hidden * 60
    want_loss, _, _ = reference(hidden, weight, labels)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=64)
    assert math.isfinite(loss.item())
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)


def test_no_counted_label_gives_nan_like_cross_entropy():
    hidden, weight, labels = problem(seed=4)
    labels[:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, labels)
    assert math.isnan(loss.item())
    assert math.isnan(F.cross_entropy(hidden @ weight.t(), labels).item())


def test_no_grad_forward_computes_only_the_loss():
    hidden, weight, labels = problem(seed=5)
    want_loss, _, _ = reference(hidden, weight, labels)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=32)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)


def test_bad_shapes_are_named():
    hidden, weight, labels = problem()
    with pytest.raises(ValueError, match=r"labels shape \(299,\)"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match=r"hidden width 24 .* \(97, 23\)"):
        linear_cross_entropy(hidden, weight[:, :-1], labels)


def test_model_loss_matches_logits_path():
    # The model with labels returns the loss of its own logits, with the same gradients.
    model = tiny_model(seed=6)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 15:] = 0
    labels = next_token_labels(input_ids, attention_mask)

    out = model(input_ids, attention_mask)
    want = F.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)

    fused = model(input_ids, attention_mask, labels=labels)
    assert fused.logits is None
    got_grads = torch.autograd.grad(fused.loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fused.loss, want, rtol=1e-6, atol=1e-6)
    for (name, _), got, expected in zip(model.named_parameters(), got_grads, want_grads):
        if expected is None:
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)
