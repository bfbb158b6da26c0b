"""Text report and the report directory of figures."""

from __future__ import annotations

import numpy as np
import pytest

from olmoe.analysis import (
    ExportError,
    load_exports,
    load_routing_stats,
    report_text,
    write_report,
)


def test_write_report_files(tmp_path, example_run):
    run_dir, _ = example_run
    exports = load_exports(run_dir)

    paths = write_report(exports, tmp_path / "report", load_routing_stats(run_dir))

    assert [path.name for path in paths] == [
        "domain_specialization.png",
        "coactivation.png",
        "vocabulary_specialization.png",
        "expert_load.png",
        "router_saturation.png",
        "load_over_training.png",
        "report.txt",
    ]
    for path in paths:
        assert path.parent == tmp_path / "report"
        assert path.stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in paths)


def test_single_export_skips_saturation(tmp_path, example_run):
    _, exports = example_run

    names = [path.name for path in write_report(exports[-1], tmp_path / "report")]

    assert "router_saturation.png" not in names
    assert "load_over_training.png" not in names
    assert "report.txt" in names


def test_report_text_headline_numbers(example_run):
    run_dir, exports = example_run

    text = report_text(exports, load_routing_stats(run_dir))

    assert text.startswith("Routing report for step200 (step 200): 4 layers, 8 experts, top-2")
    assert "web (100 tokens), code (100 tokens), math (100 tokens)" in text
    assert "(uniform 0.250)" in text
    # The final checkpoint agrees with itself; step 100 keeps the final routing on every
    # other token, so its top-1 agreement is at least one half.
    assert "step 200 (step200): top-1 1.000, top-2 1.000" in text
    middle_line = next(line for line in text.splitlines() if "step 100 (step100)" in line)
    assert float(middle_line.split("top-1 ")[1].split(",")[0]) >= 0.5
    assert "Training load imbalance (3 records, steps 0..200)" in text


def test_report_text_for_top1_model(make_export):
    export = make_export(np.zeros((1, 8, 1)), num_experts=2)

    text = report_text(export)

    assert "none: top-1 routing has no pairs" in text
    assert "per layer: 2.000" in text


def test_report_mismatched_exports_raise(tmp_path, make_random_export):
    exports = [make_random_export(0, K=2, step=1), make_random_export(0, K=3, step=2)]

    with pytest.raises(ExportError, match="top_k=3 differs from top_k=2"):
        write_report(exports, tmp_path / "report")
