"""The training config: a typed OmegaConf schema, YAML files and command-line overrides.

`load_config(path, overrides)` merges the YAML onto the schema, then the `key=value`
overrides, and validates the result. Unknown keys and wrong types raise `ConfigError`
with the key path and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from olmoe.data.config import DataConfig
from olmoe.model.config import ConfigError, ModelConfig

_DURATION = re.compile(r"^\d+(ba|ep|tok|sp)$")


def _check_duration(owner: str, name: str, value: str) -> None:
    if not _DURATION.match(str(value)):
        raise ConfigError(
            f"{owner}.{name}={value!r} is invalid: use a number with a unit, "
            "e.g. '100ba' (batches), '1ep' (epochs), '1000000tok' (tokens) or '5000sp' (samples)"
        )


@dataclass
class OptimizerConfig:
    """Decoupled AdamW."""

    lr: float = 4e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Weight decay on weight matrices, not on norm weights, as in torch's AdamW: each step
    multiplies weights by (1 - lr * weight_decay)."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm over all ranks and expert shards (null: no clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr} is invalid: must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(
                f"optimizer.betas={list(self.betas)} is invalid: two values in [0, 1)"
            )
        if self.weight_decay < 0:
            raise ConfigError(
                f"optimizer.weight_decay={self.weight_decay} is invalid: must be >= 0"
            )
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ConfigError(
                f"optimizer.grad_clip_norm={self.grad_clip_norm}: must be > 0 or null"
            )


@dataclass
class SchedulerConfig:
    """Linear warmup, then cosine decay to alpha_f * lr at the end of training."""

    warmup: str = "100ba"
    """Warmup length as a Composer time string."""
    alpha_f: float = 0.1
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self) -> None:
        _check_duration("scheduler", "warmup", self.warmup)
        if not 0 <= self.alpha_f <= 1:
            raise ConfigError(f"scheduler.alpha_f={self.alpha_f} is invalid: must be in [0, 1]")


@dataclass
class ParallelismConfig:
    """Parallel layout of the model over ranks."""

    ep: int = 1
    """Expert-parallel degree: ranks that split each layer's experts; divides E and world size."""
    fsdp: bool = True
    """Shard parameters with FSDP2 when more than one rank runs."""

    def __post_init__(self) -> None:
        if self.ep < 1:
            raise ConfigError(f"parallelism.ep={self.ep} is invalid: must be >= 1")


@dataclass
class CheckpointConfig:
    """Composer checkpoints in `<run_dir>/checkpoints`."""

    save_interval: str = "500ba"
    """How often to save, as a Composer time string."""
    keep: int = -1
    """How many checkpoints to keep on disk (-1: all)."""
    autoresume: bool = True
    """Resume from the latest checkpoint in the run directory if there is one."""
    load_path: str | None = None
    """Start from this checkpoint instead (weights, optimizer and data position)."""

    def __post_init__(self) -> None:
        _check_duration("checkpoint", "save_interval", self.save_interval)


@dataclass
class LoggingConfig:
    """Console line, Composer loggers and routing statistics."""

    log_interval: int = 10
    """Print one line every this many steps on rank 0."""
    file: bool = True
    """Write Composer's metric log to `<run_dir>/metrics.log`."""
    tensorboard: bool = False
    """Log to TensorBoard in `<run_dir>/tensorboard` (needs the tensorboard package)."""
    wandb: bool = False
    """Log to Weights & Biases in offline mode (needs the wandb package)."""
    wandb_project: str = "olmoe"
    """W&B project name."""
    peak_tflops: float | None = None
    """Accelerator peak for MFU; null measures a matmul on CPU or looks up known GPUs."""
    routing_stats_interval: int = 0
    """Record tokens per expert every this many steps into the run directory (0: off)."""

    def __post_init__(self) -> None:
        if self.log_interval < 1:
            raise ConfigError(f"logging.log_interval={self.log_interval} is invalid: must be >= 1")


@dataclass
class TrainConfig:
    """Everything a training run needs. Saved as `<run_dir>/config.yaml`."""

    run_name: str = "olmoe"
    """Name of the run; also the default run directory name."""
    run_dir: str = "runs/${run_name}"
    """Directory for the resolved config, checkpoints and logs."""
    seed: int = 17
    """Seed for initialization, data order and dropout-free noise (router jitter)."""
    device: str = "auto"
    """'cpu', 'gpu', or 'auto' (gpu when CUDA is available)."""
    precision: str = "auto"
    """'fp32', 'amp_bf16', or 'auto' (amp_bf16 on GPU, fp32 on CPU)."""
    max_duration: str = "1000ba"
    """Training length as a Composer time string."""
    global_batch_size: int = 8
    """Sequences per optimizer step, summed over ranks."""
    device_microbatch_size: int = 8
    """Sequences per forward/backward on one rank; smaller than the per-rank batch accumulates."""
    eval_interval: str = "100ba"
    """How often to compute the validation loss."""
    eval_batches: int = -1
    """Validation batches per evaluation (-1: the whole validation split)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        for name, choices in (
            ("device", ("auto", "cpu", "gpu")),
            ("precision", ("auto", "fp32", "amp_bf16")),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is invalid: must be one of {list(choices)}"
                )
        _check_duration("", "max_duration", self.max_duration)
        _check_duration("", "eval_interval", self.eval_interval)
        for name in ("global_batch_size", "device_microbatch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is invalid: longer than "
                f"model.max_seq_len={self.model.max_seq_len}"
            )
        E = self.model.moe.num_experts
        if E % self.parallelism.ep != 0:
            raise ConfigError(
                f"parallelism.ep={self.parallelism.ep} is invalid: must divide "
                f"model.moe.num_experts={E}"
            )

    def check_world(self, world_size: int) -> None:
        """Check the settings that depend on the number of ranks."""
        if world_size % self.parallelism.ep != 0:
            raise ConfigError(
                f"parallelism.ep={self.parallelism.ep} is invalid: must divide the world size "
                f"{world_size}"
            )
        if self.global_batch_size % world_size != 0:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is invalid: must be divisible by "
                f"the world size {world_size}"
            )
        per_rank = self.global_batch_size // world_size
        if per_rank % self.device_microbatch_size != 0 and self.device_microbatch_size < per_rank:
            raise ConfigError(
                f"device_microbatch_size={self.device_microbatch_size} must divide the per-rank "
                f"batch {per_rank} (global_batch_size / world size)"
            )


def _allowed_keys(key_path: str) -> list[str]:
    """Keys the schema allows next to `key_path` (its siblings)."""
    parent = key_path.rsplit(".", 1)[0] if "." in key_path else ""
    schema = OmegaConf.structured(TrainConfig)
    node = OmegaConf.select(schema, parent) if parent else schema
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        allowed = _allowed_keys(key)
        hint = f"; allowed keys here: {allowed}" if allowed else ""
        return ConfigError(f"{source}: unknown key '{key}'{hint}")
    if isinstance(err, ValidationError):
        return ConfigError(f"{source}: invalid value for '{key}': {err.msg}")
    return ConfigError(f"{source}: {key}: {err.msg if hasattr(err, 'msg') else err}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Merge a YAML file and `key=value` overrides onto the schema and validate."""
    schema = OmegaConf.structured(TrainConfig)
    merged: DictConfig = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is invalid: expected key=value, e.g. optimizer.lr=1e-3"
            )
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override {item!r}") from None
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, str(path or "config")) from None


def to_yaml(config: TrainConfig) -> str:
    """Render the config as YAML with interpolations such as run_dir resolved."""
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)
