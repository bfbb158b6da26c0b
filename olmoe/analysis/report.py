"""Headline numbers as text, and the full set of figures written to a directory."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from olmoe.analysis.export import RoutingExport, check_compatible
from olmoe.analysis.metrics import (
    coactivation,
    domain_specialization,
    domain_token_counts,
    expert_load_imbalance,
    saturation_over_checkpoints,
    uniform_share,
    vocabulary_specialization,
)
from olmoe.analysis.stats import RoutingStats

logger = logging.getLogger(__name__)

REPORT_FILE = "report.txt"


def _ordered(exports: RoutingExport | Sequence[RoutingExport]) -> list[RoutingExport]:
    if isinstance(exports, RoutingExport):
        exports = [exports]
    ordered = sorted(exports, key=lambda export: export.step)
    check_compatible(ordered)
    return ordered


def _numbers(values: np.ndarray) -> str:
    return " ".join("nan" if np.isnan(value) else f"{value:.3f}" for value in values)


def report_text(
    exports: RoutingExport | Sequence[RoutingExport],
    stats: RoutingStats | None = None,
    *,
    vocabulary_ranks: int = 1,
    min_count: int = 10,
) -> str:
    """Summarize the headline routing numbers of the final export (highest step) as text.

    Router saturation is included when there are two or more exports, and the logged
    load imbalance when `stats` is given. Per-layer values are listed from layer 0 up.
    """
    ordered = _ordered(exports)
    final = ordered[-1]
    lines = [
        f"Routing report for {final.name} (step {final.step}): {final.num_layers} layers, "
        f"{final.num_experts} experts, top-{final.top_k}, {final.num_tokens} tokens",
    ]
    tokens = domain_token_counts(final)
    sizes = zip(final.domain_names, tokens, strict=True)
    lines.append("Domains: " + ", ".join(f"{name} ({count} tokens)" for name, count in sizes))

    imbalance = expert_load_imbalance(final)
    lines += [
        "",
        "Load balance, max/mean tokens per expert (1.0 = balanced):",
        f"  per layer: {_numbers(imbalance)}",
        f"  mean {np.mean(imbalance):.3f}, worst {np.max(imbalance):.3f} "
        f"(layer {int(np.argmax(imbalance))})",
    ]

    shares = domain_specialization(final)
    uniform = uniform_share(final)
    lines += [
        "",
        f"Domain specialization, share of a domain's tokens with the expert in the top-"
        f"{final.top_k} (uniform {uniform:.3f}):",
    ]
    for domain, name in enumerate(final.domain_names):
        if tokens[domain] == 0:
            lines.append(f"  {name}: no tokens")
            continue
        # shape: (L, E) for this domain
        domain_shares = shares[:, domain, :]
        layer, expert = np.unravel_index(np.nanargmax(domain_shares), domain_shares.shape)
        lines.append(
            f"  {name}: highest {domain_shares[layer, expert]:.3f} "
            f"(layer {int(layer)}, expert {int(expert)}), "
            f"{domain_shares[layer, expert] / uniform:.1f}x uniform"
        )

    lines += [
        "",
        f"Vocabulary specialization, mean share of the top-{vocabulary_ranks} routings of an "
        f"item that go to its most frequent expert (items seen >= {min_count} times):",
    ]
    for by, label in (("input", "input token"), ("target", "next token")):
        result = vocabulary_specialization(final, by, vocabulary_ranks, min_count)
        lines.append(f"  by {label} ({result.num_items} items): {_numbers(result.per_layer)}")

    lines += ["", "Co-activation, strongest pair per layer, P(b | a) over all top-k pairs:"]
    if final.top_k == 1:
        lines.append("  none: top-1 routing has no pairs")
    else:
        for layer, matrix in enumerate(coactivation(final, "all")):
            a, b = np.unravel_index(np.nanargmax(matrix), matrix.shape)
            lines.append(f"  layer {layer}: {int(a)} -> {int(b)} {matrix[a, b]:.3f}")

    if len(ordered) > 1:
        saturation = saturation_over_checkpoints(ordered)
        lines += ["", f"Router saturation against step {final.step}, mean over layers:"]
        for name, step, top1, topk in zip(
            saturation.names, saturation.steps, saturation.top1, saturation.topk, strict=True
        ):
            lines.append(
                f"  step {int(step)} ({name}): top-1 {top1.mean():.3f}, "
                f"top-{final.top_k} {topk.mean():.3f}"
            )

    if stats is not None:
        last = stats.imbalance[-1]
        lines += [
            "",
            f"Training load imbalance ({stats.steps.size} records, steps "
            f"{int(stats.steps[0])}..{int(stats.steps[-1])}):",
            f"  last record per layer: {_numbers(last)}",
        ]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> Path:
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp_name, 0o644)  # mkstemp creates the file private (0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def write_report(
    exports: RoutingExport | Sequence[RoutingExport],
    out_dir: str | os.PathLike,
    stats: RoutingStats | None = None,
    *,
    layers: Sequence[int] | None = None,
    coactivation_mode: str = "all",
    vocabulary_ranks: int = 1,
    min_count: int = 10,
) -> list[Path]:
    """Write every figure as PNG and the text report into `out_dir`; return the paths.

    Single-checkpoint figures use the final export (highest step). The saturation figure
    needs two or more exports and the training figure needs `stats`; each is skipped
    otherwise. `layers` picks the layers of the per-layer heatmaps (default: first,
    middle and last). Every file is written to a temporary name and then renamed.
    """
    from olmoe.analysis import plots

    ordered = _ordered(exports)
    final = ordered[-1]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    figures = {
        "domain_specialization.png": lambda: plots.plot_domain_specialization(final, layers),
        "coactivation.png": lambda: plots.plot_coactivation(final, layers, coactivation_mode),
        "vocabulary_specialization.png": lambda: plots.plot_vocabulary_specialization(
            final, vocabulary_ranks, min_count
        ),
        "expert_load.png": lambda: plots.plot_expert_load(final),
    }
    if len(ordered) > 1:
        saturation = saturation_over_checkpoints(ordered)
        figures["router_saturation.png"] = lambda: plots.plot_router_saturation(saturation)
    if stats is not None:
        figures["load_over_training.png"] = lambda: plots.plot_load_over_training(stats)

    paths = [plots.save_figure(draw(), out_dir / file_name) for file_name, draw in figures.items()]
    text = report_text(ordered, stats, vocabulary_ranks=vocabulary_ranks, min_count=min_count)
    paths.append(_write_text(out_dir / REPORT_FILE, text))
    logger.info("Wrote routing report for %s to %s (%d files)", final.name, out_dir, len(paths))
    return paths
