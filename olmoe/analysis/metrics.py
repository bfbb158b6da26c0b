"""Routing metrics over exports, vectorized with numpy.

Dims: L = MoE layers, T = tokens, K = top-k, E = experts, C = checkpoints,
U = distinct vocabulary items in an export.

Several metrics take `ranks`: only each token's first `ranks` experts (in rank order)
count as its routing, so ``ranks=1`` looks at the top-1 choice and ``ranks=K`` (the
default where it applies) at the whole top-k set. Undefined values (an expert never
selected, a domain without tokens) are NaN rather than 0. docs/analysis.md gives every
definition in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from olmoe.analysis.export import ExportError, RoutingExport, check_same_tokens
from olmoe.analysis.stats import load_imbalance

COACTIVATION_MODES = ("all", "adjacent")
VOCABULARY_KEYS = ("input", "target")


def _check_ranks(export: RoutingExport, ranks: int | None) -> int:
    if ranks is None:
        return export.top_k
    if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)):
        raise ValueError(f"ranks={ranks!r} is invalid: must be an integer in [1, {export.top_k}]")
    if not 1 <= ranks <= export.top_k:
        raise ValueError(
            f"ranks={ranks} is invalid for {export.source}: must be in [1, top_k={export.top_k}]"
        )
    return int(ranks)


def _layer_indices(export: RoutingExport, layer: int, ranks: int) -> np.ndarray:
    # shape: (T, ranks) int64, so keys built from it cannot overflow the stored dtype
    return export.expert_indices[layer, :, :ranks].astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.broadcast_to(np.asarray(denominator, dtype=np.float64), numerator.shape)
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


# ---------------------------------------------------------------------------------------
# Load balance


def expert_load(export: RoutingExport, ranks: int | None = None) -> np.ndarray:
    """Return (L, E) int64 tokens per expert: how many tokens have e among their first `ranks`."""
    ranks = _check_ranks(export, ranks)
    E = export.num_experts
    load = np.zeros((export.num_layers, E), dtype=np.int64)
    for layer in range(export.num_layers):
        load[layer] = np.bincount(_layer_indices(export, layer, ranks).ravel(), minlength=E)
    return load


def expert_load_imbalance(export: RoutingExport, ranks: int | None = None) -> np.ndarray:
    """Return (L,) max / mean tokens per expert; 1.0 is a perfectly balanced layer."""
    return load_imbalance(expert_load(export, ranks))


# ---------------------------------------------------------------------------------------
# Router saturation


@dataclass(eq=False)
class RouterSaturation:
    """Agreement of each checkpoint's routing with the final checkpoint's, per layer."""

    steps: np.ndarray
    """(C,) checkpoint steps, ascending; the last is the final checkpoint."""
    names: list[str]
    """Export names, in the order of `steps`."""
    top1: np.ndarray
    """(C, L) fraction of tokens whose top-1 expert equals the final checkpoint's."""
    topk: np.ndarray
    """(C, L) mean over tokens of |top-k set ∩ final top-k set| / K."""


def router_saturation(export: RoutingExport, final: RoutingExport) -> tuple[np.ndarray, np.ndarray]:
    """Return (top1, topk), each (L,), comparing `export` with the `final` checkpoint.

    top1[l] is the fraction of tokens whose top-1 expert in layer l agrees. topk[l] is
    the mean over tokens of the overlap of the two top-k sets divided by K. Raises
    `ExportError` naming the files unless both exports route the same tokens with the
    same L, K and E.
    """
    check_same_tokens(export, final)
    L, T, K = export.expert_indices.shape
    top1 = np.empty(L)
    topk = np.empty(L)
    for layer in range(L):
        current = export.expert_indices[layer]
        reference = final.expert_indices[layer]
        top1[layer] = np.mean(current[:, 0] == reference[:, 0])
        # shape: (T, K, K). Experts are distinct within a token's top-k, so the number of
        # equal pairs is the size of the intersection of the two sets.
        matches = current[:, :, None] == reference[:, None, :]
        topk[layer] = matches.sum() / (T * K)
    return top1, topk


def saturation_over_checkpoints(
    exports: Sequence[RoutingExport], final: RoutingExport | None = None
) -> RouterSaturation:
    """Compare every export with the final one (default: the export with the highest step)."""
    if not exports:
        raise ExportError("no exports given: pass at least one RoutingExport")
    ordered = sorted(exports, key=lambda export: export.step)
    final = ordered[-1] if final is None else final
    pairs = [router_saturation(export, final) for export in ordered]
    return RouterSaturation(
        steps=np.array([export.step for export in ordered], dtype=np.int64),
        names=[export.name for export in ordered],
        top1=np.stack([top1 for top1, _ in pairs]),
        topk=np.stack([topk for _, topk in pairs]),
    )


# ---------------------------------------------------------------------------------------
# Expert co-activation


def coactivation(export: RoutingExport, mode: str = "all") -> np.ndarray:
    """Return (L, E, E) co-activation: entry [l, a, b] estimates P(b co-fires | a fires).

    The denominator is the number of tokens with a in their top-k. With ``mode="all"``
    the numerator counts tokens with both a and b in the top-k, so row a sums to K - 1.
    With ``mode="adjacent"`` it counts tokens where a and b sit at neighbouring ranks
    (r, r + 1) in either order, as OLMoE's own analysis script did. The diagonal is 0
    and rows of experts never selected are NaN.
    """
    if mode not in COACTIVATION_MODES:
        raise ValueError(f"mode={mode!r} is invalid: use one of {list(COACTIVATION_MODES)}")
    L, E, K = export.num_layers, export.num_experts, export.top_k
    result = np.full((L, E, E), np.nan)
    for layer in range(L):
        indices = _layer_indices(export, layer, K)
        fires = np.bincount(indices.ravel(), minlength=E)
        if mode == "all":
            # shape: (T, K, K) pair keys a * E + b over all ordered rank pairs
            keys = indices[:, :, None] * E + indices[:, None, :]
        else:
            # shape: (T, K - 1) each way, for rank pairs (r, r + 1) and (r + 1, r)
            left, right = indices[:, :-1], indices[:, 1:]
            keys = np.concatenate([(left * E + right).ravel(), (right * E + left).ravel()])
        pairs = np.bincount(keys.ravel(), minlength=E * E).reshape(E, E)
        np.fill_diagonal(pairs, 0)
        result[layer] = _safe_divide(pairs, fires[:, None])
    return result


def most_coactivated_experts(matrix: np.ndarray, count: int) -> np.ndarray:
    """Return up to `count` expert ids from one layer's (E, E) co-activation matrix.

    Pairs are visited from the highest co-activation down and both experts of each pair
    are added until `count` distinct experts are collected (NaN entries are visited last).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square (E, E), got shape {matrix.shape}")
    E = matrix.shape[0]
    count = min(int(count), E)
    if count <= 0:
        raise ValueError(f"count={count} is invalid: must be >= 1")
    scores = np.where(np.isnan(matrix), -np.inf, matrix)
    np.fill_diagonal(scores, -np.inf)
    chosen: list[int] = []
    # A stable sort keeps the lowest (a, b) first among equal scores.
    for flat in np.argsort(-scores, axis=None, kind="stable"):
        for expert in divmod(int(flat), E):
            if expert not in chosen:
                chosen.append(expert)
        if len(chosen) >= count:
            break
    return np.array(chosen[:count], dtype=np.int64)


# ---------------------------------------------------------------------------------------
# Domain specialization


def domain_token_counts(export: RoutingExport) -> np.ndarray:
    """Return (num_domains,) int64 tokens per domain."""
    return np.bincount(export.domain_ids.astype(np.int64), minlength=export.num_domains)


def uniform_share(export: RoutingExport, ranks: int | None = None) -> float:
    """Return ranks / E, the share every expert gets under uniform routing."""
    return _check_ranks(export, ranks) / export.num_experts


def domain_specialization(export: RoutingExport, ranks: int | None = None) -> np.ndarray:
    """Return (L, num_domains, E): the fraction of a domain's tokens routed to each expert.

    A token counts for expert e when e is among its first `ranks` experts (default K),
    so each row sums to `ranks` and uniform routing gives `uniform_share` = ranks / E.
    Domains without tokens are NaN.
    """
    ranks = _check_ranks(export, ranks)
    L, E, num_domains = export.num_layers, export.num_experts, export.num_domains
    tokens = domain_token_counts(export)
    domains = export.domain_ids.astype(np.int64)[:, None]
    shares = np.empty((L, num_domains, E))
    for layer in range(L):
        # shape: (T, ranks) keys domain * E + expert
        keys = domains * E + _layer_indices(export, layer, ranks)
        counts = np.bincount(keys.ravel(), minlength=num_domains * E).reshape(num_domains, E)
        shares[layer] = _safe_divide(counts, tokens[:, None])
    return shares


# ---------------------------------------------------------------------------------------
# Vocabulary specialization


@dataclass(eq=False)
class VocabularyItems:
    """Per vocabulary item, its most frequent expert in one layer."""

    item_ids: np.ndarray
    """(U,) token ids, ascending."""
    occurrences: np.ndarray
    """(U,) tokens with that id."""
    top_expert: np.ndarray
    """(U,) most frequent expert; ties go to the lowest expert id."""
    share: np.ndarray
    """(U,) fraction of the occurrences routed to `top_expert`."""


@dataclass(eq=False)
class VocabularySpecialization:
    """Vocabulary specialization per layer and per expert for one export."""

    by: str
    """'input' (the token itself) or 'target' (the ground-truth next token)."""
    ranks: int
    """Leading experts per token that count as its routing."""
    min_count: int
    """Items with fewer occurrences are left out of the averages."""
    num_items: int
    """Items with at least `min_count` occurrences (the same in every layer)."""
    per_layer: np.ndarray
    """(L,) mean `share` over those items; NaN when there are none."""
    per_expert: np.ndarray
    """(L, E) mean `share` over those items whose top expert is e; NaN for none."""
    items_per_expert: np.ndarray
    """(L, E) int64 number of those items whose top expert is e."""


def _vocabulary_ids(export: RoutingExport, by: str) -> np.ndarray:
    if by == "input":
        return export.input_ids
    if by == "target":
        return export.target_ids
    raise ValueError(f"by={by!r} is invalid: use one of {list(VOCABULARY_KEYS)}")


def vocabulary_item_shares(
    export: RoutingExport, layer: int, by: str = "input", ranks: int = 1
) -> VocabularyItems:
    """Find each vocabulary item's most frequent expert in `layer` and its share.

    An item v is an input token id, or a next-token id with -1 targets left out. An
    occurrence of v counts for expert e when e is among the token's first `ranks` experts.
    The share is max over e of that count / occurrences of v.
    """
    ranks = _check_ranks(export, ranks)
    if not 0 <= layer < export.num_layers:
        raise ValueError(f"layer={layer} is invalid: must be in [0, {export.num_layers})")
    ids = _vocabulary_ids(export, by)
    keep = ids >= 0
    item_ids, inverse, occurrences = np.unique(ids[keep], return_inverse=True, return_counts=True)
    return _item_shares(export, layer, keep, item_ids, inverse, occurrences, ranks)


def _item_shares(
    export: RoutingExport,
    layer: int,
    keep: np.ndarray,
    item_ids: np.ndarray,
    inverse: np.ndarray,
    occurrences: np.ndarray,
    ranks: int,
) -> VocabularyItems:
    E, U = export.num_experts, item_ids.size
    # shape: (T_kept, ranks) keys item * E + expert
    keys = inverse.astype(np.int64).reshape(-1, 1) * E + _layer_indices(export, layer, ranks)[keep]
    counts = np.bincount(keys.ravel(), minlength=U * E).reshape(U, E)
    top_expert = counts.argmax(axis=1)
    share = counts[np.arange(U), top_expert] / np.maximum(occurrences, 1)
    return VocabularyItems(item_ids, occurrences, top_expert, share)


def vocabulary_specialization(
    export: RoutingExport, by: str = "input", ranks: int = 1, min_count: int = 10
) -> VocabularySpecialization:
    """Average `vocabulary_item_shares` over items seen at least `min_count` times.

    The default ``ranks=1`` (top-1 expert) follows OLMoE's analysis script; with
    ``ranks=K`` the share is how often the item's most frequent expert is in its top-k.
    """
    ranks = _check_ranks(export, ranks)
    if min_count < 1:
        raise ValueError(f"min_count={min_count} is invalid: must be >= 1")
    ids = _vocabulary_ids(export, by)
    keep = ids >= 0
    item_ids, inverse, occurrences = np.unique(ids[keep], return_inverse=True, return_counts=True)
    frequent = occurrences >= min_count
    L, E = export.num_layers, export.num_experts
    per_layer = np.full(L, np.nan)
    per_expert = np.full((L, E), np.nan)
    items_per_expert = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        items = _item_shares(export, layer, keep, item_ids, inverse, occurrences, ranks)
        share, top_expert = items.share[frequent], items.top_expert[frequent]
        if share.size:
            per_layer[layer] = share.mean()
        items_per_expert[layer] = np.bincount(top_expert, minlength=E)
        share_sums = np.bincount(top_expert, weights=share, minlength=E)
        per_expert[layer] = _safe_divide(share_sums, items_per_expert[layer])
    return VocabularySpecialization(
        by=by,
        ranks=ranks,
        min_count=int(min_count),
        num_items=int(frequent.sum()),
        per_layer=per_layer,
        per_expert=per_expert,
        items_per_expert=items_per_expert,
    )
