"""Token data: `olmoe prepare` writes packed MDS shards, and the dataloader streams them back.

Names are imported on first use, so that tokenization worker processes (which import
`olmoe.data.tokenizer`) do not pay for importing `streaming` and `torch`. The tokenizing
pipeline itself is `olmoe.data.prepare.prepare`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataConfig": "olmoe.data.config",
    "StreamConfig": "olmoe.data.config",
    "DataError": "olmoe.data.errors",
    "ShardError": "olmoe.data.errors",
    "Manifest": "olmoe.data.manifest",
    "read_manifest": "olmoe.data.manifest",
    "check_compatible": "olmoe.data.manifest",
    "TokenDataset": "olmoe.data.dataset",
    "TokenDataLoader": "olmoe.data.dataset",
    "build_dataset": "olmoe.data.dataset",
    "build_dataloader": "olmoe.data.dataset",
}

__all__ = [
    "DataConfig",
    "DataError",
    "Manifest",
    "ShardError",
    "StreamConfig",
    "TokenDataLoader",
    "TokenDataset",
    "build_dataloader",
    "build_dataset",
    "check_compatible",
    "read_manifest",
]

if TYPE_CHECKING:
    from olmoe.data.config import DataConfig, StreamConfig
    from olmoe.data.dataset import TokenDataLoader, TokenDataset, build_dataloader, build_dataset
    from olmoe.data.errors import DataError, ShardError
    from olmoe.data.manifest import Manifest, check_compatible, read_manifest


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'olmoe.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
