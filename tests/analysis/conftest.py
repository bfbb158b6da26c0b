"""Builders for small routing exports with known or random routing.

Dims: L = layers, T = tokens, K = top-k, E = experts.
"""

from __future__ import annotations

import numpy as np
import pytest

from olmoe.analysis import RoutingExport


def ranked_probs(shape: tuple[int, int, int]) -> np.ndarray:
    """Return (L, T, K) float32 probabilities that decrease along K, as a router emits them."""
    K = shape[2]
    row = np.linspace(0.4, 0.05, K, dtype=np.float32) if K > 1 else np.array([0.4], np.float32)
    return np.broadcast_to(row, shape).copy()


def random_indices(rng: np.random.Generator, L: int, T: int, K: int, E: int) -> np.ndarray:
    """Return (L, T, K) distinct experts per token, drawn uniformly without replacement."""
    # shape: (L, T, E) random keys; the K smallest give a uniform K-subset in random order
    keys = rng.random((L, T, E))
    return np.argsort(keys, axis=-1)[..., :K].astype(np.int64)


def build_export(
    expert_indices,
    *,
    num_experts: int,
    domain_ids=None,
    domain_names=None,
    input_ids=None,
    target_ids=None,
    step: int = 0,
    name: str = "export",
) -> RoutingExport:
    indices = np.asarray(expert_indices, dtype=np.int64)
    _, T, _ = indices.shape
    domain_ids = np.zeros(T, np.int64) if domain_ids is None else np.asarray(domain_ids)
    if domain_names is None:
        domain_names = [f"domain{d}" for d in range(int(domain_ids.max()) + 1)]
    input_ids = np.arange(T) if input_ids is None else np.asarray(input_ids)
    if target_ids is None:
        target_ids = np.append(input_ids[1:], -1)
    return RoutingExport(
        name=name,
        step=step,
        num_experts=num_experts,
        expert_indices=indices,
        expert_probs=ranked_probs(indices.shape),
        input_ids=np.asarray(input_ids),
        target_ids=np.asarray(target_ids),
        domain_ids=domain_ids,
        domain_names=list(domain_names),
    )


def build_random_export(
    seed: int,
    *,
    L: int = 3,
    T: int = 240,
    K: int = 3,
    E: int = 8,
    num_domains: int = 3,
    vocab: int = 12,
    step: int = 0,
) -> RoutingExport:
    """Random routing over a small vocabulary, so that items repeat; some targets are -1."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab, T)
    target_ids = np.append(input_ids[1:], -1)
    target_ids[rng.random(T) < 0.1] = -1
    return build_export(
        random_indices(rng, L, T, K, E),
        num_experts=E,
        domain_ids=rng.integers(0, num_domains, T),
        domain_names=[f"domain{d}" for d in range(num_domains)],
        input_ids=input_ids,
        target_ids=target_ids,
        step=step,
        name=f"random{seed}",
    )


@pytest.fixture
def make_export():
    return build_export


@pytest.fixture
def make_random_export():
    return build_random_export


def write_example_run(directory, *, T: int = 300, seed: int = 0) -> list:
    """Write three checkpoints of one small model on one token set, plus routing stats.

    Routing drifts towards the final checkpoint: step 0 is random, step 100 keeps the
    final routing on every other token, step 200 is final. Returns the written exports.
    """
    from olmoe.analysis import append_routing_stats, expert_load, write_export

    rng = np.random.default_rng(seed)
    L, K, E, vocab = 4, 2, 8, 20
    final = random_indices(rng, L, T, K, E)
    early = random_indices(rng, L, T, K, E)
    middle = np.where((np.arange(T) % 2 == 0)[None, :, None], final, early)
    input_ids = rng.integers(0, vocab, T)
    common = dict(
        input_ids=input_ids,
        target_ids=np.append(input_ids[1:], -1),
        domain_ids=(np.arange(T) * 3) // T,  # three equal blocks when T % 3 == 0
        domain_names=["web", "code", "math"],
        model_config={"n_layers": L, "vocab_size": vocab, "moe": {"num_experts": E, "top_k": K}},
        tokenizer="test-tokenizer",
    )
    exports = []
    for step, indices in ((0, early), (100, middle), (200, final)):
        exports.append(
            write_export(
                directory / f"step{step}",
                step=step,
                expert_indices=indices,
                expert_probs=ranked_probs(indices.shape),
                **common,
            )
        )
        append_routing_stats(directory / "routing_stats.jsonl", step, expert_load(exports[-1]))
    return exports


@pytest.fixture
def example_run(tmp_path):
    run_dir = tmp_path / "exports"
    return run_dir, write_example_run(run_dir)
