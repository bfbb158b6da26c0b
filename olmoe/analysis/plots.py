"""Figures of the routing metrics.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so no global
backend is touched; `save_figure` renders it to PNG with Agg. Dims as in
`olmoe.analysis.metrics`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from olmoe.analysis.export import RoutingExport
from olmoe.analysis.metrics import (
    RouterSaturation,
    coactivation,
    domain_specialization,
    expert_load,
    most_coactivated_experts,
    uniform_share,
    vocabulary_specialization,
)
from olmoe.analysis.stats import RoutingStats

DPI = 120


def default_layers(num_layers: int) -> list[int]:
    """Return the first, middle and last layer (fewer when the model has under 3 layers)."""
    return sorted({0, num_layers // 2, num_layers - 1})


def _check_layers(export: RoutingExport, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return default_layers(export.num_layers)
    layers = [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < export.num_layers]
    if not layers or bad:
        raise ValueError(
            f"layers={layers} is invalid for {export.source}: give at least one layer "
            f"in [0, {export.num_layers})"
        )
    return layers


def _centered_norm(low: float, center: float, high: float) -> colors.Normalize:
    # TwoSlopeNorm needs low < center < high; fall back to a linear scale otherwise.
    if low < center < high:
        return colors.TwoSlopeNorm(vmin=low, vcenter=center, vmax=high)
    return colors.Normalize(vmin=low, vmax=max(high, low + 1e-9))


def _expert_ticks(ax, num_experts: int) -> None:
    step = max(1, num_experts // 16)
    ax.set_xticks(np.arange(0, num_experts, step))


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    """Render `figure` as a PNG at `path` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temp_name, 0o644)  # mkstemp creates the file private (0o600)
        with os.fdopen(fd, "wb") as f:
            figure.savefig(f, format="png", dpi=DPI)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def plot_domain_specialization(
    export: RoutingExport, layers: Sequence[int] | None = None, ranks: int | None = None
) -> Figure:
    """Draw one domain x expert heatmap per layer, white at the uniform share ranks / E.

    The colorbar carries a black line at the uniform share: red cells are experts that a
    domain uses more than uniform routing would, blue cells less.
    """
    layers = _check_layers(export, layers)
    shares = domain_specialization(export, ranks)
    uniform = uniform_share(export, ranks)
    ranks_label = f"top-{export.top_k if ranks is None else ranks}"

    height = 1.0 + len(layers) * (0.6 + 0.3 * export.num_domains)
    figure = Figure(figsize=(12, height), layout="constrained")
    axes = figure.subplots(len(layers), 1, squeeze=False)[:, 0]
    # The top of the scale is the largest share seen, at least twice uniform and at most 1,
    # so that mild specialization still shows.
    highest = float(np.nanmax(shares, initial=0.0))
    norm = _centered_norm(0.0, uniform, min(1.0, max(highest, 2.0 * uniform)))
    image = None
    for ax, layer in zip(axes, layers, strict=True):
        image = ax.imshow(shares[layer], aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_yticks(np.arange(export.num_domains), labels=export.domain_names)
        _expert_ticks(ax, export.num_experts)
        ax.set_title(f"layer {layer}")
    axes[-1].set_xlabel("expert")
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.9)
    colorbar.ax.axhline(uniform, color="black", linewidth=2)
    colorbar.set_label(
        f"share of domain tokens with expert in {ranks_label}\n(line: uniform {uniform:.3f})"
    )
    figure.suptitle(f"Domain specialization, {export.name} (step {export.step})")
    return figure


def plot_coactivation(
    export: RoutingExport,
    layers: Sequence[int] | None = None,
    mode: str = "all",
    count: int = 16,
) -> Figure:
    """Draw, per layer, the co-activation heatmap of the `count` most co-activated experts."""
    layers = _check_layers(export, layers)
    matrices = coactivation(export, mode)
    figure = Figure(figsize=(5.2 * len(layers), 5.0), layout="constrained")
    axes = figure.subplots(1, len(layers), squeeze=False)[0]
    vmax = max(float(np.nanmax(matrices[layers], initial=0.0)), 1e-6)
    image = None
    for ax, layer in zip(axes, layers, strict=True):
        experts = most_coactivated_experts(matrices[layer], count)
        block = matrices[layer][np.ix_(experts, experts)]
        image = ax.imshow(block, cmap="Reds", vmin=0.0, vmax=vmax)
        labels = [str(expert) for expert in experts]
        ax.set_xticks(np.arange(experts.size), labels=labels, rotation=90, fontsize=7)
        ax.set_yticks(np.arange(experts.size), labels=labels, fontsize=7)
        ax.set_xlabel("expert b")
        ax.set_ylabel("expert a")
        ax.set_title(f"layer {layer}")
    colorbar = figure.colorbar(image, ax=list(axes), shrink=0.9)
    pairs = "all pairs in the top-k" if mode == "all" else "adjacent ranks"
    colorbar.set_label(f"P(b co-activated | a), {pairs}")
    figure.suptitle(f"Expert co-activation, {export.name} (step {export.step})")
    return figure


def plot_router_saturation(saturation: RouterSaturation) -> Figure:
    """Draw top-1 and top-k router saturation against checkpoint step, one line per layer."""
    num_layers = saturation.top1.shape[1]
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    palette = [colors.to_hex(c) for c in _layer_colors(num_layers)]
    panels = (("top-1 expert agrees", saturation.top1), ("top-k overlap / k", saturation.topk))
    for ax, (title, values) in zip(axes, panels, strict=True):
        for layer in range(num_layers):
            ax.plot(
                saturation.steps,
                values[:, layer],
                marker="o",
                color=palette[layer],
                label=str(layer),
            )
        ax.set_title(title)
        ax.set_xlabel("checkpoint step")
        ax.set_ylim(0.0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"agreement with final checkpoint (step {int(saturation.steps[-1])})")
    axes[1].legend(title="layer", ncol=2 if num_layers > 8 else 1, fontsize=7, loc="lower right")
    figure.suptitle("Router saturation")
    return figure


def _layer_colors(num_layers: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["viridis"](np.linspace(0.0, 0.9, num_layers))


def plot_vocabulary_specialization(
    export: RoutingExport, ranks: int = 1, min_count: int = 10
) -> Figure:
    """Draw vocabulary specialization per layer (input and next token) and per expert."""
    by_input = vocabulary_specialization(export, "input", ranks, min_count)
    by_target = vocabulary_specialization(export, "target", ranks, min_count)
    layers = np.arange(export.num_layers)

    figure = Figure(figsize=(13, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.6])
    for result, marker, label in ((by_input, "o", "input token"), (by_target, "s", "next token")):
        label = f"{label} ({result.num_items} items)"
        left.plot(layers, result.per_layer, marker=marker, label=label)
    left.axhline(ranks / export.num_experts, color="gray", linestyle="--", label="ranks / E")
    left.set_xlabel("layer")
    left.set_ylabel("mean share routed to the item's top expert")
    left.set_ylim(0.0, 1.05)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title(f"per layer (top-{ranks}, items seen >= {min_count} times)")

    image = right.imshow(by_input.per_expert, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    right.set_xlabel("expert")
    right.set_ylabel("layer")
    _expert_ticks(right, export.num_experts)
    right.set_title("per expert: mean share of the input tokens it is top expert for")
    figure.colorbar(image, ax=right)
    figure.suptitle(f"Vocabulary specialization, {export.name} (step {export.step})")
    return figure


def plot_expert_load(export: RoutingExport, ranks: int | None = None) -> Figure:
    """Draw tokens per expert relative to the mean (L x E heatmap) and max/mean per layer."""
    load = expert_load(export, ranks).astype(np.float64)
    relative = load / load.mean(axis=1, keepdims=True)
    imbalance = relative.max(axis=1)

    figure = Figure(figsize=(13, 1.5 + 0.3 * export.num_layers), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[4, 1])
    norm = _centered_norm(0.0, 1.0, max(2.0, float(relative.max())))
    image = left.imshow(relative, aspect="auto", cmap="RdBu_r", norm=norm)
    left.set_xlabel("expert")
    left.set_ylabel("layer")
    _expert_ticks(left, export.num_experts)
    figure.colorbar(image, ax=left, label="tokens / mean tokens per expert")
    right.barh(np.arange(export.num_layers), imbalance, color="tab:red")
    right.axvline(1.0, color="black", linewidth=1)
    right.set_ylim(export.num_layers - 0.5, -0.5)
    right.set_xlabel("max / mean")
    right.set_title("imbalance")
    figure.suptitle(f"Expert load, {export.name} (step {export.step})")
    return figure


def plot_load_over_training(stats: RoutingStats) -> Figure:
    """Draw the logged max/mean load imbalance of every layer against training step."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    palette = _layer_colors(stats.num_layers)
    for layer in range(stats.num_layers):
        ax.plot(stats.steps, stats.imbalance[:, layer], color=palette[layer], label=str(layer))
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.grid(alpha=0.3)
    ax.legend(title="layer", ncol=2 if stats.num_layers > 8 else 1, fontsize=7)
    ax.set_title("Load imbalance during training")
    return figure
