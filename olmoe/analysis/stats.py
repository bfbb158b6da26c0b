"""Training-time routing statistics: one JSON line per logging interval.

Dims: L = MoE layers, E = experts, S = records (logged steps).

Each line of ``routing_stats.jsonl`` is an object::

    {"step": 1000,
     "layer_counts": [[...E ints...], ...L rows...],
     "domain_counts": {"web": [[...E...], ...L...], ...},
     "imbalance": [...L floats...]}

``layer_counts[l][e]`` is the number of (token, expert) assignments of expert e in layer l
over the tokens of the interval that ends at ``step`` (each token counts once for each of
its K experts). ``domain_counts`` splits the same counts by the domain of each token's
sample and may be empty. ``imbalance[l]`` is max over experts / mean over experts of
``layer_counts[l]``, where 1.0 is perfect balance and null marks a layer without tokens.
The loader recomputes it from the counts. Unknown keys are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

STATS_FILE = "routing_stats.jsonl"


class RoutingStatsError(ValueError):
    """A routing statistics file or record that is malformed or inconsistent."""


@dataclass(eq=False)
class RoutingStats:
    """Routing counts over training, one row per logged step, sorted by step."""

    steps: np.ndarray
    """(S,) int64 training steps."""
    layer_counts: np.ndarray
    """(S, L, E) int64 (token, expert) assignments per layer and expert in each interval."""
    domain_counts: dict[str, np.ndarray]
    """Domain name to (S, L, E) int64 counts; zeros where a record lacks the domain."""
    imbalance: np.ndarray
    """(S, L) float64 max/mean tokens per expert, recomputed from `layer_counts`."""
    path: Path | None = None
    """File the stats were loaded from."""

    @property
    def num_layers(self) -> int:
        return int(self.layer_counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.layer_counts.shape[2])


def load_imbalance(counts: np.ndarray) -> np.ndarray:
    """Return max / mean over the last (expert) axis of a count array.

    Works for one layer (E,), all layers (L, E) or a time series (S, L, E). Rows whose
    counts are all zero give NaN, because their balance is undefined.
    """
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, counts.max(axis=-1) / np.where(mean > 0, mean, 1.0), np.nan)


def _as_count_matrix(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim != 2 or array.size == 0:
        raise RoutingStatsError(f"{what} must be a non-empty (L, E) array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise RoutingStatsError(f"{what} must contain whole counts, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.min() < 0:
        raise RoutingStatsError(f"{what} contains a negative count {int(array.min())}")
    return array


def make_stats_record(
    step: int,
    layer_counts: Any,
    domain_counts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate the counts and build one record (a JSON-serializable dict).

    `layer_counts` is (L, E), e.g. the model's per-layer tokens-per-expert counts summed
    over the interval; each entry of `domain_counts` is (L, E) as well.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise RoutingStatsError(f"step={step!r} is invalid: must be an integer >= 0")
    counts = _as_count_matrix(layer_counts, "layer_counts")
    record_domains: dict[str, list[list[int]]] = {}
    for domain, value in (domain_counts or {}).items():
        matrix = _as_count_matrix(value, f"domain_counts[{domain!r}]")
        if matrix.shape != counts.shape:
            raise RoutingStatsError(
                f"domain_counts[{domain!r}] shape {matrix.shape} must equal layer_counts "
                f"shape {counts.shape}"
            )
        record_domains[str(domain)] = matrix.tolist()
    imbalance = load_imbalance(counts)
    return {
        "step": int(step),
        "layer_counts": counts.tolist(),
        "domain_counts": record_domains,
        "imbalance": [None if np.isnan(value) else float(value) for value in imbalance],
    }


def append_routing_stats(
    path: str | os.PathLike,
    step: int,
    layer_counts: Any,
    domain_counts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one record to the JSON-lines file `path` and return the record.

    The line goes out in a single ``write`` on a file opened for appending and is fsynced,
    so an interrupted run leaves at most its last line truncated. `load_routing_stats`
    skips such a line when called with ``strict=False``.
    """
    record = make_stats_record(step, layer_counts, domain_counts)
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return record


def _parse_record(record: Any, where: str) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
    if not isinstance(record, dict):
        raise RoutingStatsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("step", "layer_counts"):
        if key not in record:
            raise RoutingStatsError(f"{where}: required key {key!r} is missing")
    step = record["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RoutingStatsError(f"{where}: step={step!r} is invalid: must be an integer >= 0")
    try:
        counts = _as_count_matrix(record["layer_counts"], "layer_counts")
        domains = {
            str(name): _as_count_matrix(value, f"domain_counts[{name!r}]")
            for name, value in (record.get("domain_counts") or {}).items()
        }
    except (RoutingStatsError, ValueError, TypeError) as error:
        raise RoutingStatsError(f"{where}: {error}") from None
    for name, matrix in domains.items():
        if matrix.shape != counts.shape:
            raise RoutingStatsError(
                f"{where}: domain_counts[{name!r}] shape {matrix.shape} differs from "
                f"layer_counts shape {counts.shape}"
            )
    return step, counts, domains


def load_routing_stats(path: str | os.PathLike, *, strict: bool = True) -> RoutingStats:
    """Load a ``routing_stats.jsonl`` file (or the file of that name in a directory).

    Records are sorted by step. When a step appears more than once (a run resumed from an
    earlier checkpoint logs those steps again) the later line wins. Raises
    `RoutingStatsError` naming the file and line for malformed lines and for records whose
    (L, E) shape differs from the first. With ``strict=False`` a malformed last line
    without a trailing newline (a write cut short) is skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RoutingStatsError(f"{path}: file not found") from None
    lines = text.split("\n")
    complete = text.endswith("\n")

    by_step: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    shape: tuple[int, ...] | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        is_cut_short = number == len(lines) and not complete
        try:
            step, counts, domains = _parse_record(json.loads(line), where)
        except json.JSONDecodeError as error:
            if is_cut_short and not strict:
                logger.warning("Skipping truncated last line %s (%s)", where, error)
                continue
            raise RoutingStatsError(f"{where}: invalid JSON ({error})") from None
        if shape is None:
            shape = counts.shape
        elif counts.shape != shape:
            raise RoutingStatsError(
                f"{where}: layer_counts shape {counts.shape} differs from {shape} in earlier "
                "lines; one file must come from one model"
            )
        if step in by_step:
            logger.info("%s: step %d logged again; keeping the later record", where, step)
        by_step[step] = (counts, domains)

    if not by_step:
        raise RoutingStatsError(f"{path}: contains no records")
    steps = np.array(sorted(by_step), dtype=np.int64)
    layer_counts = np.stack([by_step[int(step)][0] for step in steps])
    domain_names = sorted({name for _, domains in by_step.values() for name in domains})
    domain_counts = {}
    for name in domain_names:
        series = np.zeros_like(layer_counts)
        for row, step in enumerate(steps):
            matrix = by_step[int(step)][1].get(name)
            if matrix is not None:
                series[row] = matrix
        domain_counts[name] = series
    return RoutingStats(
        steps=steps,
        layer_counts=layer_counts,
        domain_counts=domain_counts,
        imbalance=load_imbalance(layer_counts),
        path=path,
    )
