"""The OLMoE decoder.

`OlmoeModel` and `OlmoeOutput` are imported on first use: `olmoe.moe` imports the configs
from this package, and an eager import of the model here would import `olmoe.moe` back
before it has finished initializing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from olmoe.model.config import ConfigError, ModelConfig, MoEConfig

if TYPE_CHECKING:
    from olmoe.model.model import OlmoeModel, OlmoeOutput

__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "OlmoeModel", "OlmoeOutput"]


def __getattr__(name: str) -> Any:
    if name in ("OlmoeModel", "OlmoeOutput"):
        from olmoe.model import model

        return getattr(model, name)
    raise AttributeError(f"module 'olmoe.model' has no attribute {name!r}")
