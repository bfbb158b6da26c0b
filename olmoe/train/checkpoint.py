"""Reading Composer checkpoints written by `olmoe train` outside of a Trainer."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from olmoe.model import ModelConfig, OlmoeModel
from olmoe.model.io import config_from_dict

MODEL_PREFIX = "model."


def find_checkpoint(path: str | Path) -> Path:
    """Return a checkpoint file, or the latest one of a run directory or checkpoint folder."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "checkpoints", path):
        latest = folder / "latest-rank0.pt"
        if latest.exists():
            return latest.resolve()
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a .pt file, a run directory with "
        "checkpoints/latest-rank0.pt, or a checkpoint folder"
    )


def find_run_config(checkpoint: Path) -> Path:
    """Find the run's config.yaml next to the checkpoints folder that contains `checkpoint`."""
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config.yaml of the run that wrote {checkpoint} not found; pass --config RUN/config.yaml"
    )


def load_model_config(config_path: str | Path) -> ModelConfig:
    data = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    if "model" not in data:
        raise ValueError(f"{config_path} has no 'model' section; is it an olmoe run config?")
    return config_from_dict(data["model"])


def load_checkpoint_state(checkpoint: Path) -> dict:
    """Load the full checkpoint dictionary (Composer's `state` and metadata) on the CPU."""
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read checkpoint {checkpoint}: {err}") from err


def model_state_dict(checkpoint_state: dict, source: Path) -> dict[str, torch.Tensor]:
    try:
        state = checkpoint_state["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{source} is not a Composer checkpoint with model weights") from None
    return {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def load_model_from_checkpoint(
    checkpoint: str | Path, config_path: str | Path | None = None
) -> tuple[OlmoeModel, dict]:
    """Build the model of a training checkpoint; returns it with the checkpoint dict."""
    checkpoint = find_checkpoint(checkpoint)
    config_path = Path(config_path) if config_path else find_run_config(checkpoint)
    config = load_model_config(config_path)
    state = load_checkpoint_state(checkpoint)
    model = OlmoeModel(config, init=False)
    weights = model_state_dict(state, checkpoint)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not match the model in {config_path}: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    return model.eval(), state


def checkpoint_step(state: dict) -> int:
    """Return the batch count stored in a Composer checkpoint."""
    timestamp = state["state"]["timestamp"]
    if isinstance(timestamp, dict):
        # Composer stores {"Timestamp": {"batch": int, ...}}.
        return int(timestamp.get("Timestamp", timestamp)["batch"])
    return int(timestamp.batch)
