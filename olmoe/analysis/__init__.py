"""Routing analysis: export format, metrics, figures and a text report.

Needs only numpy and matplotlib. The figure and report functions are imported on first
use, so code that only writes exports or statistics does not import matplotlib.
"""

from olmoe.analysis.export import (
    ExportError,
    RoutingExport,
    check_compatible,
    check_same_tokens,
    load_export,
    load_exports,
    write_export,
)
from olmoe.analysis.metrics import (
    RouterSaturation,
    VocabularyItems,
    VocabularySpecialization,
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
from olmoe.analysis.stats import (
    RoutingStats,
    RoutingStatsError,
    append_routing_stats,
    load_imbalance,
    load_routing_stats,
    make_stats_record,
)

_LAZY = {"report_text": "report", "write_report": "report", "plots": None}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    if _LAZY[name] is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [
    "ExportError",
    "RouterSaturation",
    "RoutingExport",
    "RoutingStats",
    "RoutingStatsError",
    "VocabularyItems",
    "VocabularySpecialization",
    "append_routing_stats",
    "check_compatible",
    "check_same_tokens",
    "coactivation",
    "domain_specialization",
    "domain_token_counts",
    "expert_load",
    "expert_load_imbalance",
    "load_export",
    "load_exports",
    "load_imbalance",
    "load_routing_stats",
    "make_stats_record",
    "most_coactivated_experts",
    "report_text",
    "router_saturation",
    "saturation_over_checkpoints",
    "uniform_share",
    "vocabulary_item_shares",
    "vocabulary_specialization",
    "write_export",
    "write_report",
]
