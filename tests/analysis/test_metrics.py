"""Routing metrics: hand-built routings with known results, and slow pure-Python references.

Dims: L = layers, T = tokens, K = top-k, E = experts.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pytest

from olmoe.analysis import (
    ExportError,
    RoutingExport,
    coactivation,
    domain_specialization,
    domain_token_counts,
    expert_load,
    expert_load_imbalance,
    most_coactivated_experts,
    router_saturation,
    saturation_over_checkpoints,
    uniform_share,
    vocabulary_item_shares,
    vocabulary_specialization,
)

# ---------------------------------------------------------------------------------------
# Known answers


def _round_robin(L: int, T: int, K: int, E: int) -> np.ndarray:
    """Token t takes experts (t * K + j) % E for j < K: every E / K tokens cover all experts."""
    # shape: (T, K)
    per_token = (np.arange(T)[:, None] * K + np.arange(K)[None, :]) % E
    return np.broadcast_to(per_token, (L, T, K)).copy()


def test_own_expert_per_domain_gives_share_one(make_export):
    # Domain d always routes to expert d (top-1), so its share is 1 there and 0 elsewhere.
    L, T, E = 2, 60, 6
    domains = np.arange(T) % 3
    export = make_export(domains[None, :, None].repeat(L, 0), num_experts=E, domain_ids=domains)

    shares = domain_specialization(export)

    expected = np.zeros((3, E))
    expected[np.arange(3), np.arange(3)] = 1.0
    for layer in range(L):
        np.testing.assert_array_equal(shares[layer], expected)


def test_own_expert_pair_per_domain_with_top2(make_export):
    # With K = 2, domain d always uses experts 2d and 2d + 1.
    T, E = 40, 8
    domains = np.arange(T) % 4
    indices = np.stack([2 * domains, 2 * domains + 1], axis=-1)[None]
    export = make_export(indices, num_experts=E, domain_ids=domains)

    shares = domain_specialization(export)[0]

    for domain in range(4):
        expected = np.zeros(E)
        expected[[2 * domain, 2 * domain + 1]] = 1.0
        np.testing.assert_array_equal(shares[domain], expected)
    np.testing.assert_array_equal(domain_specialization(export, ranks=1)[0].sum(axis=1), 1.0)


def test_round_robin_gives_uniform_share(make_export):
    L, T, K, E = 2, 96, 2, 8
    # Domains in blocks of 16 tokens: each block covers every expert 4 times.
    domains = (np.arange(T) // 16) % 3
    export = make_export(_round_robin(L, T, K, E), num_experts=E, domain_ids=domains)

    shares = domain_specialization(export)

    assert uniform_share(export) == K / E
    np.testing.assert_allclose(shares, K / E, rtol=0, atol=1e-15)


def test_domain_without_tokens_is_nan(make_export):
    export = make_export(
        np.zeros((1, 4, 1)), num_experts=2, domain_ids=np.zeros(4, int), domain_names=["a", "b"]
    )

    shares = domain_specialization(export)[0]

    np.testing.assert_array_equal(shares[0], [1.0, 0.0])
    assert np.isnan(shares[1]).all()
    np.testing.assert_array_equal(domain_token_counts(export), [4, 0])


def test_round_robin_load_is_balanced(make_export):
    L, T, K, E = 3, 64, 4, 8
    export = make_export(_round_robin(L, T, K, E), num_experts=E)

    np.testing.assert_array_equal(expert_load(export), np.full((L, E), T * K // E))
    np.testing.assert_array_equal(expert_load_imbalance(export), np.ones(L))


def test_single_expert_load_imbalance_is_num_experts(make_export):
    export = make_export(np.zeros((2, 10, 1)), num_experts=5)

    np.testing.assert_array_equal(expert_load(export)[:, 0], [10, 10])
    np.testing.assert_array_equal(expert_load_imbalance(export), [5.0, 5.0])


def test_identical_checkpoints_saturation_one(make_random_export):
    export = make_random_export(0)

    top1, topk = router_saturation(export, export)

    np.testing.assert_array_equal(top1, np.ones(export.num_layers))
    np.testing.assert_array_equal(topk, np.ones(export.num_layers))


def test_disjoint_checkpoints_saturation_zero(make_export):
    L, T, K, E = 2, 30, 2, 8
    early = _round_robin(L, T, K, E)
    final = (early + 4) % E  # a disjoint pair, because 4 >= K and E - 4 >= K

    top1, topk = router_saturation(
        make_export(early, num_experts=E), make_export(final, num_experts=E)
    )

    np.testing.assert_array_equal(top1, np.zeros(L))
    np.testing.assert_array_equal(topk, np.zeros(L))


def test_reordered_topk_saturation(make_export):
    # Same top-2 set in swapped order: top-1 never agrees, the set always does.
    early = np.array([[[0, 1], [2, 3]]])
    final = np.array([[[1, 0], [3, 2]]])

    top1, topk = router_saturation(
        make_export(early, num_experts=4), make_export(final, num_experts=4)
    )

    assert top1.tolist() == [0.0]
    assert topk.tolist() == [1.0]


def test_half_overlap_saturation(make_export):
    early = np.array([[[0, 1], [0, 1]]])
    final = np.array([[[0, 2], [3, 1]]])

    top1, topk = router_saturation(
        make_export(early, num_experts=4), make_export(final, num_experts=4)
    )

    assert top1.tolist() == [0.5]
    assert topk.tolist() == [0.5]


def test_saturation_over_checkpoints_orders_by_step(make_random_export):
    final = make_random_export(0, step=300)
    early = make_random_export(1, step=10)
    early.input_ids, early.target_ids = final.input_ids, final.target_ids

    result = saturation_over_checkpoints([final, early])

    assert result.steps.tolist() == [10, 300]
    assert result.names == ["random1", "random0"]
    np.testing.assert_array_equal(result.top1[1], 1.0)
    np.testing.assert_array_equal(result.top1[0], router_saturation(early, final)[0])


def test_saturation_different_tokens_raises(make_random_export):
    with pytest.raises(ExportError, match="input_ids differ"):
        router_saturation(make_random_export(0), make_random_export(1))


def test_saturation_different_layer_count_raises(make_random_export):
    with pytest.raises(ExportError, match="num_layers=2 differs from num_layers=3"):
        router_saturation(make_random_export(0, L=2), make_random_export(0, L=3))


def test_always_together_pair_coactivation_one(make_export):
    # Experts 2 and 5 fire together on every token that uses either; the third expert varies.
    rng = np.random.default_rng(0)
    T, E = 50, 8
    third = rng.choice([0, 1, 3, 4, 6, 7], T)
    indices = np.stack([np.full(T, 2), np.full(T, 5), third], axis=-1)[None]
    indices[0, ::2] = indices[0, ::2][:, [2, 0, 1]]  # vary ranks, keep 2 and 5 adjacent
    export = make_export(indices, num_experts=E)

    for mode in ("all", "adjacent"):
        matrix = coactivation(export, mode)[0]
        assert matrix[2, 5] == 1.0, mode
        assert matrix[5, 2] == 1.0, mode
        assert matrix[2, 2] == 0.0, mode


def test_all_pairs_rows_sum_to_k_minus_one(make_random_export):
    export = make_random_export(3, K=4)

    matrices = coactivation(export, "all")

    np.testing.assert_allclose(matrices.sum(axis=-1), 3.0, rtol=1e-12)


def test_adjacent_excludes_distant_ranks(make_export):
    export = make_export(np.array([[[0, 1, 2]]]), num_experts=4)

    adjacent = coactivation(export, "adjacent")[0]
    all_pairs = coactivation(export, "all")[0]

    assert adjacent[0, 2] == 0.0
    assert all_pairs[0, 2] == 1.0
    assert adjacent[0, 1] == 1.0
    assert np.isnan(adjacent[3]).all()  # expert 3 never fires


def test_most_coactivated_experts_follows_pair_order():
    matrix = np.array(
        [
            [0.0, 0.1, 0.2, 0.0],
            [0.1, 0.0, 0.9, 0.3],
            [0.2, 0.9, 0.0, 0.0],
            [0.0, 0.3, np.nan, 0.0],
        ]
    )

    assert most_coactivated_experts(matrix, 2).tolist() == [1, 2]
    assert most_coactivated_experts(matrix, 3).tolist() == [1, 2, 3]
    assert most_coactivated_experts(matrix, 10).tolist() == [1, 2, 3, 0]


def test_token_with_one_expert_vocabulary_specialization_one(make_export):
    # Token id v always routes (top-1) to expert v % E in every layer.
    rng = np.random.default_rng(0)
    L, T, K, E = 2, 200, 2, 4
    input_ids = rng.integers(0, 10, T)
    first = input_ids % E
    indices = np.stack([first, (first + 1 + rng.integers(0, E - 1, T)) % E], axis=-1)
    export = make_export(np.broadcast_to(indices, (L, T, K)), num_experts=E, input_ids=input_ids)

    result = vocabulary_specialization(export, "input", ranks=1, min_count=1)

    np.testing.assert_array_equal(result.per_layer, np.ones(L))
    assert result.num_items == 10
    for layer in range(L):
        np.testing.assert_array_equal(result.items_per_expert[layer], [3, 3, 2, 2])
        np.testing.assert_array_equal(result.per_expert[layer], np.ones(E))


def test_vocabulary_min_count_excludes_rare_items(make_export):
    # Item 0 seen 4 times (2 to expert 0, 2 to expert 1); item 1 seen once.
    indices = np.array([[[0], [0], [1], [1], [1]]])
    export = make_export(indices, num_experts=2, input_ids=[0, 0, 0, 0, 1])

    frequent = vocabulary_specialization(export, "input", min_count=2)
    everything = vocabulary_specialization(export, "input", min_count=1)

    assert frequent.num_items == 1
    assert frequent.per_layer.tolist() == [0.5]
    assert everything.per_layer.tolist() == [0.75]
    assert frequent.items_per_expert.tolist() == [[1, 0]]  # tie goes to the lower expert id


def test_vocabulary_targets_skip_minus_one(make_export):
    indices = np.array([[[0], [1], [1]]])
    export = make_export(indices, num_experts=2, input_ids=[5, 6, 6], target_ids=[6, -1, 6])

    items = vocabulary_item_shares(export, 0, "target")

    assert items.item_ids.tolist() == [6]
    assert items.occurrences.tolist() == [2]
    assert items.share.tolist() == [0.5]


def test_vocabulary_without_frequent_items_is_nan(make_export):
    export = make_export(np.array([[[0], [1]]]), num_experts=2, input_ids=[3, 4])

    result = vocabulary_specialization(export, "input", min_count=5)

    assert result.num_items == 0
    assert np.isnan(result.per_layer).all()
    assert np.isnan(result.per_expert).all()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: domain_specialization(e, ranks=0), r"ranks=0 is invalid .* \[1, top_k=3\]"),
        (lambda e: expert_load(e, ranks=4), r"ranks=4 is invalid"),
        (lambda e: coactivation(e, "diagonal"), r"mode='diagonal' is invalid"),
        (lambda e: vocabulary_specialization(e, "output"), r"by='output' is invalid"),
        (lambda e: vocabulary_specialization(e, min_count=0), r"min_count=0 is invalid"),
        (lambda e: vocabulary_item_shares(e, 3), r"layer=3 is invalid"),
    ],
    ids=["ranks 0", "ranks above K", "mode", "by", "min_count", "layer"],
)
def test_invalid_arguments_raise(make_random_export, call, message):
    with pytest.raises(ValueError, match=message):
        call(make_random_export(0))


# ---------------------------------------------------------------------------------------
# Slow pure-Python references on random exports


def _token_experts(export: RoutingExport, layer: int, token: int, ranks: int) -> list[int]:
    return [int(e) for e in export.expert_indices[layer, token, :ranks]]


def reference_load(export: RoutingExport, ranks: int) -> np.ndarray:
    load = np.zeros((export.num_layers, export.num_experts))
    for layer in range(export.num_layers):
        for token in range(export.num_tokens):
            for expert in _token_experts(export, layer, token, ranks):
                load[layer, expert] += 1
    return load


def reference_saturation(export: RoutingExport, final: RoutingExport):
    top1, topk = [], []
    for layer in range(export.num_layers):
        agree, overlap = 0, 0.0
        for token in range(export.num_tokens):
            current = _token_experts(export, layer, token, export.top_k)
            reference = _token_experts(final, layer, token, final.top_k)
            agree += current[0] == reference[0]
            overlap += len(set(current) & set(reference)) / export.top_k
        top1.append(agree / export.num_tokens)
        topk.append(overlap / export.num_tokens)
    return top1, topk


def reference_coactivation(export: RoutingExport, mode: str) -> np.ndarray:
    E = export.num_experts
    result = np.full((export.num_layers, E, E), np.nan)
    for layer in range(export.num_layers):
        fires, pairs = Counter(), Counter()
        for token in range(export.num_tokens):
            experts = _token_experts(export, layer, token, export.top_k)
            fires.update(experts)
            if mode == "all":
                for a in experts:
                    for b in experts:
                        if a != b:
                            pairs[a, b] += 1
            else:
                for a, b in zip(experts[:-1], experts[1:], strict=True):
                    pairs[a, b] += 1
                    pairs[b, a] += 1
        for a in range(E):
            if fires[a]:
                for b in range(E):
                    result[layer, a, b] = pairs[a, b] / fires[a]
    return result


def reference_domain(export: RoutingExport, ranks: int) -> np.ndarray:
    result = np.full((export.num_layers, export.num_domains, export.num_experts), np.nan)
    for layer in range(export.num_layers):
        for domain in range(export.num_domains):
            tokens = [t for t in range(export.num_tokens) if export.domain_ids[t] == domain]
            if not tokens:
                continue
            for expert in range(export.num_experts):
                hits = sum(expert in _token_experts(export, layer, t, ranks) for t in tokens)
                result[layer, domain, expert] = hits / len(tokens)
    return result


def reference_vocabulary(export: RoutingExport, by: str, ranks: int, min_count: int):
    ids = export.input_ids if by == "input" else export.target_ids
    L, E = export.num_layers, export.num_experts
    per_layer = np.full(L, np.nan)
    per_expert = np.full((L, E), np.nan)
    items_per_expert = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        routed: dict[int, Counter] = {}
        seen: Counter = Counter()
        for token in range(export.num_tokens):
            item = int(ids[token])
            if item < 0:
                continue
            seen[item] += 1
            routed.setdefault(item, Counter()).update(_token_experts(export, layer, token, ranks))
        shares, by_expert = [], {}
        for item, occurrences in seen.items():
            if occurrences < min_count:
                continue
            # Most frequent expert, lowest id on ties.
            top = min(routed[item], key=lambda e, c=routed[item]: (-c[e], e))
            share = routed[item][top] / occurrences
            shares.append(share)
            by_expert.setdefault(top, []).append(share)
        if shares:
            per_layer[layer] = sum(shares) / len(shares)
        for expert, values in by_expert.items():
            items_per_expert[layer, expert] = len(values)
            per_expert[layer, expert] = sum(values) / len(values)
    return per_layer, per_expert, items_per_expert


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ranks", [1, 3])
def test_load_matches_reference(make_random_export, seed, ranks):
    export = make_random_export(seed)

    np.testing.assert_array_equal(expert_load(export, ranks), reference_load(export, ranks))


@pytest.mark.parametrize("seed", SEEDS)
def test_saturation_matches_reference(make_random_export, seed):
    final = make_random_export(seed)
    early = make_random_export(seed + 100)
    early.input_ids = final.input_ids

    top1, topk = router_saturation(early, final)
    expected_top1, expected_topk = reference_saturation(early, final)

    np.testing.assert_allclose(top1, expected_top1, rtol=1e-12)
    np.testing.assert_allclose(topk, expected_topk, rtol=1e-12)
    # The case is neither trivial extreme.
    assert topk.min() > 0.0
    assert topk.max() < 1.0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["all", "adjacent"])
def test_coactivation_matches_reference(make_random_export, seed, mode):
    # Routing over experts 0..8 of 10, so experts 9 never fires and its row is NaN.
    export = dataclasses.replace(make_random_export(seed, E=9, K=4, T=120), num_experts=10)

    np.testing.assert_allclose(
        coactivation(export, mode), reference_coactivation(export, mode), rtol=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_domain_specialization_matches_reference(make_random_export, seed, ranks):
    export = make_random_export(seed, num_domains=4)
    export.domain_ids[export.domain_ids == 3] = 0  # domain 3 has no tokens: NaN

    np.testing.assert_allclose(
        domain_specialization(export, ranks), reference_domain(export, ranks), rtol=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("by", ["input", "target"])
@pytest.mark.parametrize("ranks, min_count", [(1, 1), (1, 20), (3, 10)])
def test_vocabulary_specialization_matches_reference(
    make_random_export, seed, by, ranks, min_count
):
    export = make_random_export(seed)

    result = vocabulary_specialization(export, by, ranks, min_count)
    per_layer, per_expert, items_per_expert = reference_vocabulary(export, by, ranks, min_count)

    np.testing.assert_allclose(result.per_layer, per_layer, rtol=1e-12)
    np.testing.assert_allclose(result.per_expert, per_expert, rtol=1e-12)
    np.testing.assert_array_equal(result.items_per_expert, items_per_expert)


def test_metrics_fast_at_full_size(make_export):
    # OLMoE-1B-7B shape: L=16, K=8, E=64, on 100k tokens. Measured about 1.5 s in total on
    # 2 CPU cores; the bound leaves room for slow shared runners.
    rng = np.random.default_rng(0)
    L, T, K, E = 16, 100_000, 8, 64
    start = rng.integers(0, E, (L, T, 1))
    indices = (start + np.arange(K)) % E
    export = make_export(
        indices,
        num_experts=E,
        domain_ids=rng.integers(0, 5, T),
        input_ids=rng.integers(0, 50_000, T),
    )

    begin = time.perf_counter()
    expert_load(export)
    router_saturation(export, export)
    coactivation(export, "all")
    coactivation(export, "adjacent")
    domain_specialization(export)
    vocabulary_specialization(export, "input")
    vocabulary_specialization(export, "target", ranks=K)
    elapsed = time.perf_counter() - begin

    assert elapsed < 20.0, f"metrics took {elapsed:.1f} s on (L, T, K, E) = {(L, T, K, E)}"
