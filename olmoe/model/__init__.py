"""The OLMoE decoder."""

from olmoe.model.config import ConfigError, ModelConfig, MoEConfig
from olmoe.model.model import OlmoeModel, OlmoeOutput

__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "OlmoeModel", "OlmoeOutput"]
