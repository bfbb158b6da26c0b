"""Figures: every plot renders to a valid PNG."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from matplotlib import image as mpimg

from olmoe.analysis import load_routing_stats, plots, saturation_over_checkpoints

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} does not start with the PNG signature"
    assert data[12:16] == b"IHDR", f"{path} has no IHDR chunk first"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100, f"{path} is only {width} pixels wide"
    assert height > 100, f"{path} is only {height} pixels high"
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert np.ptp(pixels[..., :3]) > 0, f"{path} is a blank image"


def test_each_figure_is_valid_png(tmp_path, example_run):
    run_dir, exports = example_run
    final = exports[-1]
    figures = {
        "domain": plots.plot_domain_specialization(final),
        "domain_top1": plots.plot_domain_specialization(final, layers=[1], ranks=1),
        "coactivation": plots.plot_coactivation(final, count=4),
        "coactivation_adjacent": plots.plot_coactivation(final, [0], mode="adjacent"),
        "saturation": plots.plot_router_saturation(saturation_over_checkpoints(exports)),
        "vocabulary": plots.plot_vocabulary_specialization(final, min_count=2),
        "load": plots.plot_expert_load(final),
        "training": plots.plot_load_over_training(load_routing_stats(run_dir)),
    }

    for name, figure in figures.items():
        path = plots.save_figure(figure, tmp_path / "figures" / f"{name}.png")
        assert_valid_png(path)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        f"{name}.png" for name in figures
    )


def test_top1_model_figures_render(tmp_path, make_export):
    # K = 1 has no co-activated pairs and a uniform share of 1 / E.
    export = make_export(np.arange(40).reshape(1, 40, 1) % 4, num_experts=4)

    for name, figure in {
        "domain": plots.plot_domain_specialization(export),
        "coactivation": plots.plot_coactivation(export),
        "load": plots.plot_expert_load(export),
    }.items():
        assert_valid_png(plots.save_figure(figure, tmp_path / f"{name}.png"))


def test_default_layers():
    assert plots.default_layers(16) == [0, 8, 15]
    assert plots.default_layers(2) == [0, 1]
    assert plots.default_layers(1) == [0]


def test_invalid_layers_raise(make_random_export):
    with pytest.raises(ValueError, match=r"layers=\[5\] is invalid .* \[0, 3\)"):
        plots.plot_domain_specialization(make_random_export(0), layers=[5])
