"""Training-time routing statistics: JSON-lines records and their loader."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from olmoe.analysis import (
    RoutingStatsError,
    append_routing_stats,
    load_imbalance,
    load_routing_stats,
    make_stats_record,
)
from olmoe.analysis.stats import STATS_FILE


def _counts(seed: int, L: int = 2, E: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50, (L, E))


def test_load_imbalance_known_values():
    counts = np.array([[2, 2, 2, 2], [4, 0, 0, 0], [3, 1, 0, 0], [0, 0, 0, 0]])

    imbalance = load_imbalance(counts)

    assert imbalance[0] == 1.0
    assert imbalance[1] == 4.0
    assert imbalance[2] == 3.0
    assert np.isnan(imbalance[3])


def test_record_has_documented_keys():
    record = make_stats_record(10, [[1, 3], [2, 2]], {"web": [[1, 1], [0, 2]]})

    assert set(record) == {"step", "layer_counts", "domain_counts", "imbalance"}
    assert record["step"] == 10
    assert record["layer_counts"] == [[1, 3], [2, 2]]
    assert record["domain_counts"] == {"web": [[1, 1], [0, 2]]}
    assert record["imbalance"] == [1.5, 1.0]


def test_append_writes_one_json_line_per_call(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 1, _counts(0))
    append_routing_stats(path, 2, _counts(1))

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1])["layer_counts"] == _counts(1).tolist()


def test_roundtrip_matches_counts(tmp_path):
    path = tmp_path / STATS_FILE
    for step in (10, 20, 30):
        web, code = _counts(step), _counts(step + 1)
        append_routing_stats(path, step, web + code, {"web": web, "code": code})

    stats = load_routing_stats(path)

    np.testing.assert_array_equal(stats.steps, [10, 20, 30])
    assert stats.layer_counts.shape == (3, 2, 4)
    assert (stats.num_layers, stats.num_experts) == (2, 4)
    for row, step in enumerate((10, 20, 30)):
        total = _counts(step) + _counts(step + 1)
        np.testing.assert_array_equal(stats.layer_counts[row], total)
        np.testing.assert_array_equal(stats.domain_counts["web"][row], _counts(step))
        np.testing.assert_array_equal(stats.domain_counts["code"][row], _counts(step + 1))
        for layer in range(2):
            expected = total[layer].max() / total[layer].mean()
            assert stats.imbalance[row, layer] == pytest.approx(expected, rel=1e-12)
    assert stats.path == path


def test_load_from_run_directory(tmp_path):
    append_routing_stats(tmp_path / STATS_FILE, 1, _counts(0))

    assert load_routing_stats(tmp_path).steps.tolist() == [1]


def test_repeated_step_keeps_later_record(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 10, _counts(0))
    append_routing_stats(path, 20, _counts(1))
    append_routing_stats(path, 10, _counts(2))  # resumed run logs step 10 again

    stats = load_routing_stats(path)

    np.testing.assert_array_equal(stats.steps, [10, 20])
    np.testing.assert_array_equal(stats.layer_counts[0], _counts(2))


def test_domain_absent_in_some_records_is_zero(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 1, _counts(0), {"web": _counts(0)})
    append_routing_stats(path, 2, _counts(1))

    stats = load_routing_stats(path)

    np.testing.assert_array_equal(stats.domain_counts["web"][1], np.zeros((2, 4)))


def test_truncated_last_line_strict_raises(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 1, _counts(0))
    with open(path, "a") as f:
        f.write('{"step": 2, "layer_counts": [[1, 2')

    with pytest.raises(RoutingStatsError, match=re.escape(f"{path}:2: invalid JSON")):
        load_routing_stats(path)


def test_truncated_last_line_skipped_when_not_strict(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 1, _counts(0))
    with open(path, "a") as f:
        f.write('{"step": 2, "layer_counts": [[1, 2')

    assert load_routing_stats(path, strict=False).steps.tolist() == [1]


def test_malformed_middle_line_raises_even_when_not_strict(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 1, _counts(0))
    with open(path, "a") as f:
        f.write("not json\n")
    append_routing_stats(path, 3, _counts(1))

    with pytest.raises(RoutingStatsError, match=re.escape(f"{path}:2: invalid JSON")):
        load_routing_stats(path, strict=False)


def test_shape_change_raises_with_line(tmp_path):
    path = tmp_path / STATS_FILE
    append_routing_stats(path, 1, _counts(0))
    append_routing_stats(path, 2, _counts(1, L=3))

    with pytest.raises(RoutingStatsError, match=re.escape(f"{path}:2: layer_counts shape")):
        load_routing_stats(path)


def test_missing_key_raises_with_line(tmp_path):
    path = tmp_path / STATS_FILE
    path.write_text('{"step": 1}\n')

    with pytest.raises(RoutingStatsError, match="required key 'layer_counts' is missing"):
        load_routing_stats(path)


def test_empty_file_raises(tmp_path):
    path = tmp_path / STATS_FILE
    path.write_text("")

    with pytest.raises(RoutingStatsError, match="contains no records"):
        load_routing_stats(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(RoutingStatsError, match="file not found"):
        load_routing_stats(tmp_path / STATS_FILE)


@pytest.mark.parametrize(
    "step, counts, domains, message",
    [
        (-1, [[1, 2]], None, "step=-1 is invalid"),
        (1, [1, 2], None, r"non-empty \(L, E\) array"),
        (1, [[1, -2]], None, "negative count -2"),
        (1, [[1.5, 2.0]], None, "whole counts"),
        (1, [[1, 2]], {"web": [[1, 2, 3]]}, r"domain_counts\['web'\] shape \(1, 3\)"),
    ],
    ids=["negative step", "1-d counts", "negative count", "fractional", "domain shape"],
)
def test_invalid_record_raises(step, counts, domains, message):
    with pytest.raises(RoutingStatsError, match=message):
        make_stats_record(step, counts, domains)
