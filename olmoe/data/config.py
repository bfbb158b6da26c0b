"""Typed data config of the training dataloaders (an OmegaConf structured config).

A dataset is either one prepared directory (`remote` and/or `local`) or several `streams`
mixed by proportion. The paths follow `streaming`: `remote` is where the shards live (a local
directory or any URI that `streaming` supports, e.g. `s3://`), and `local` is the cache that
shards are copied to. With only `local`, the shards are read in place, and `streaming` writes
each decompressed shard next to its `.zstd` file on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from olmoe.model.config import ConfigError

SHUFFLE_ALGOS = ("naive", "py1b", "py1br", "py1e", "py1s", "py2s")
FOUNDRY_TOKEN_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")


def _fail(name: str, value: Any, constraint: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: {constraint}")


@dataclass
class StreamConfig:
    """One dataset in a mixture."""

    remote: str | None = None
    """Dataset location: a local directory or a URI that `streaming` supports."""
    local: str | None = None
    """Local cache directory for `remote`, or the dataset directory itself without `remote`."""
    proportion: float | None = None
    """Share of each epoch drawn from this stream (set on all streams or none)."""
    repeat: float | None = None
    """Alternatively, how many times to repeat this stream's samples per epoch."""
    token_dtype: str = "int64"
    """Dtype of a `tokens` column stored as raw bytes (llm-foundry layout)."""

    def validate(self, name: str) -> None:
        if not self.remote and not self.local:
            _fail(f"{name}.remote", self.remote, "set remote or local (or both)")
        if self.proportion is not None and not self.proportion > 0:
            _fail(f"{name}.proportion", self.proportion, "must be > 0 or null")
        if self.repeat is not None and not self.repeat > 0:
            _fail(f"{name}.repeat", self.repeat, "must be > 0 or null")
        if self.proportion is not None and self.repeat is not None:
            _fail(f"{name}.repeat", self.repeat, "set proportion or repeat, not both")
        if self.token_dtype not in FOUNDRY_TOKEN_DTYPES:
            _fail(f"{name}.token_dtype", self.token_dtype, f"must be one of {FOUNDRY_TOKEN_DTYPES}")


@dataclass
class DataConfig:
    """Training and validation data: shard location, sequence length, shuffling, workers."""

    remote: str | None = None
    """Dataset directory or URI (see the module docstring)."""
    local: str | None = None
    """Local cache directory, or the dataset directory itself when `remote` is null."""
    streams: dict[str, StreamConfig] | None = None
    """Named datasets mixed by proportion, used instead of `remote` and `local`."""
    seq_len: int = 2048
    """Tokens per sample, which must match the shards (checked against each manifest)."""
    token_dtype: str = "int64"
    """Dtype of a `tokens` column stored as raw bytes in `remote`/`local` (llm-foundry)."""
    shuffle: bool = True
    """Shuffle the training split (validation is read in order unless asked otherwise)."""
    shuffle_seed: int = 17
    """Shuffle seed. The same seed, `num_canonical_nodes` and batch size repeat the order."""
    shuffle_algo: str = "py1e"
    """`streaming` shuffle algorithm."""
    shuffle_block_size: int | None = None
    """Samples per shuffle block (null: streaming's default)."""
    num_canonical_nodes: int | None = None
    """Canonical nodes of the sample partition (null: the number of physical nodes).

    The sample order depends on it, so keep it fixed to resume on a different node count."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    prefetch_factor: int | None = None
    """Batches each worker loads ahead (null: PyTorch's default)."""
    pin_memory: bool = False
    """Return batches in pinned memory (useful with CUDA)."""
    predownload: int | None = None
    """Samples to download ahead per worker (null: 8 * batch size)."""
    cache_limit: str | None = None
    """Maximum bytes of the local cache, e.g. '10gb' (null: no limit)."""
    epoch_size: int | None = None
    """Samples per epoch across all streams (null: every sample once)."""
    validate_hash: str | None = None
    """Check shard checksums when copying or decompressing them, e.g. 'sha1' (null: off)."""
    download_timeout: float = 60.0
    """Seconds to wait for one shard download."""

    def __post_init__(self) -> None:
        if self.streams is not None:
            self.streams = {
                name: StreamConfig(**stream) if isinstance(stream, dict) else stream
                for name, stream in self.streams.items()
            }
        self.validate()

    def validate(self) -> None:
        has_path = bool(self.remote or self.local)
        if self.streams is not None and has_path:
            _fail("data.streams", "...", "set either streams or remote/local, not both")
        if self.streams is not None:
            if not self.streams:
                _fail("data.streams", {}, "must name at least one stream")
            with_proportion = [s.proportion is not None for s in self.streams.values()]
            if any(with_proportion) and not all(with_proportion):
                _fail("data.streams", "...", "set proportion on every stream or on none")
            for name, stream in self.streams.items():
                stream.validate(f"data.streams.{name}")
        for name in ("seq_len", "shuffle_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(f"data.{name}", value, "must be a non-negative integer")
        if self.seq_len == 0:
            _fail("data.seq_len", self.seq_len, "must be positive")
        if self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0")
        if self.shuffle_algo not in SHUFFLE_ALGOS:
            _fail("data.shuffle_algo", self.shuffle_algo, f"must be one of {SHUFFLE_ALGOS}")
        if self.token_dtype not in FOUNDRY_TOKEN_DTYPES:
            _fail("data.token_dtype", self.token_dtype, f"must be one of {FOUNDRY_TOKEN_DTYPES}")
        for name in ("shuffle_block_size", "num_canonical_nodes", "prefetch_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                _fail(f"data.{name}", value, "must be positive or null")
        if self.epoch_size is not None and self.epoch_size <= 0:
            _fail("data.epoch_size", self.epoch_size, "must be positive or null")
        if self.prefetch_factor is not None and self.num_workers == 0:
            _fail("data.prefetch_factor", self.prefetch_factor, "needs num_workers > 0")

    def stream_configs(self) -> dict[str, StreamConfig]:
        """Return the streams, or the single `remote`/`local` dataset as a stream 'default'.

        Raises ConfigError when no dataset is set. `__post_init__` does not check this, so
        that `DataConfig()` can be the default of a larger structured config.
        """
        if self.streams is not None:
            return dict(self.streams)
        if not self.remote and not self.local:
            _fail("data.local", self.local, "set remote or local (or streams)")
        # Checked here rather than on construction, so that the schema's default (no
        # dataset yet) stays valid until a YAML file or an override names one.
        if not (self.remote or self.local):
            _fail("data.local", self.local, "set data.local or data.remote (or data.streams)")
        single = StreamConfig(remote=self.remote, local=self.local, token_dtype=self.token_dtype)
        return {"default": single}
