"""Save and load olmoe model directories: `config.json` plus `model.safetensors`.

Writes go to a temporary sibling directory that is renamed into place when complete,
so an interrupted save never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from olmoe.model.config import ModelConfig
from olmoe.model.model import OlmoeModel

FORMAT_NAME = "olmoe"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_from_dict(data: dict) -> ModelConfig:
    """Build a validated ModelConfig; unknown keys raise an error naming them."""
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create(data))
    return OmegaConf.to_object(merged)


def prepare_output_dir(dst: Path, overwrite: bool) -> Path:
    """Check `dst` and return a fresh temporary directory next to it."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def commit_output_dir(tmp: Path, dst: Path) -> None:
    """Move a completed temporary directory onto `dst`, replacing an old one last."""
    dst = Path(dst)
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def save_pretrained(model: OlmoeModel, dst: str | Path, overwrite: bool = False) -> Path:
    """Write `model` as an olmoe directory at `dst`."""
    dst = Path(dst)
    tmp = prepare_output_dir(dst, overwrite)
    try:
        config = {"format": FORMAT_NAME, **model.config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        commit_output_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_pretrained(src: str | Path, dtype: torch.dtype | None = None) -> OlmoeModel:
    """Load an olmoe directory written by `save_pretrained`."""
    src = Path(src)
    config_path = src / CONFIG_FILE
    weights_path = src / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; is {src} an olmoe model directory?")
    data = json.loads(config_path.read_text())
    if data.pop("format", None) != FORMAT_NAME:
        raise ValueError(
            f'{config_path} is not an olmoe config (no "format": "olmoe"); '
            "for a HuggingFace directory use olmoe.convert.from_hf"
        )
    config = config_from_dict(data)
    model = OlmoeModel(config, init=False)
    state = load_file(str(weights_path))
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model
