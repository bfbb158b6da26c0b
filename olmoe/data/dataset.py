"""Stream packed token samples back for training, with seeded shuffling and exact resumption.

`TokenDataset` is a `streaming.StreamingDataset` whose samples are

    {"input_ids": (T,) int64 tensor, "domain_id": () int64 tensor}

with T = seq_len. Domain ids index `TokenDataset.domain_names`, the union of the domains of all
streams in stream order (a stream without a manifest is one domain named after the stream).

Resumption: Composer saves `dataset.state_dict(samples_in_epoch, from_beginning=True)` and
calls `dataset.load_state_dict` on resume; a plain loop can use `TokenDataLoader.state_dict()`.
Either way the resumed run yields exactly the samples that an uninterrupted run would have,
provided batch size, world size, `num_canonical_nodes`, shuffle seed and algorithm are the same.
A state saved at the end of an epoch resumes at the start of the next epoch (stock `streaming`
would yield an empty epoch first).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState

from olmoe.data.config import DataConfig, StreamConfig
from olmoe.data.errors import DataError, ShardError
from olmoe.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from olmoe.data.shards import DOMAIN_ID, FOUNDRY_TOKENS, INPUT_IDS, check_shard_files

logger = logging.getLogger(__name__)


@dataclass
class _StreamLayout:
    """How to decode one stream's samples."""

    column: str
    bytes_dtype: np.dtype | None
    """Dtype of a raw-bytes token column (llm-foundry); None for ndarray columns."""
    domain_table: np.ndarray | None
    """Stream domain id -> global domain id, for shards with a `domain_id` column."""
    fixed_domain: int
    """Global domain id of every sample, for shards without a `domain_id` column."""


def _is_uri(path: str) -> bool:
    return "://" in path


def _local_source_dir(config: StreamConfig) -> str | None:
    """Return the local directory the shards are read from, or None for a remote URI."""
    if config.remote is None:
        return config.local
    return None if _is_uri(config.remote) else config.remote


def _read_stream_manifest(config: StreamConfig, stream: Stream, timeout: float) -> Manifest | None:
    """Return the stream's manifest, or None if the dataset has none (e.g. llm-foundry data)."""
    source = _local_source_dir(config)
    if source is not None:
        path = Path(source) / MANIFEST_NAME
        return read_manifest(path) if path.is_file() else None
    from streaming.base.storage import download_file

    local_path = os.path.join(stream.local, MANIFEST_NAME)
    try:
        download_file(f"{config.remote.rstrip('/')}/{MANIFEST_NAME}", local_path, timeout)
    except FileNotFoundError:
        return None
    # NOTE: only FileNotFoundError is taken as "no manifest"; the other errors that remote
    # backends raise for a missing object propagate. Remote URIs are not exercised in tests.
    return read_manifest(local_path)


class TokenDataset(StreamingDataset):
    """A `StreamingDataset` of fixed-length token samples and their domain ids."""

    def __init__(
        self,
        *,
        streams: dict[str, StreamConfig],
        split: str,
        seq_len: int,
        batch_size: int,
        vocab_size: int | None = None,
        shuffle: bool = False,
        shuffle_seed: int = 17,
        shuffle_algo: str = "py1e",
        shuffle_block_size: int | None = None,
        num_canonical_nodes: int | None = None,
        predownload: int | None = None,
        cache_limit: str | None = None,
        epoch_size: int | None = None,
        validate_hash: str | None = None,
        download_timeout: float = 60.0,
    ):
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.epoch_finished = False
        """Set by `TokenDataLoader` when an iteration ran to the end of the epoch."""
        self.samples_this_iteration = 0
        """Samples this rank's `TokenDataLoader` has yielded since its iteration began."""
        self._prepare_error: ShardError | None = None

        stream_objects = []
        for config in streams.values():
            source = _local_source_dir(config)
            if source is not None:
                check_shard_files(Path(source) / split)
            stream_objects.append(
                Stream(
                    remote=config.remote,
                    local=config.local,
                    split=split,
                    proportion=config.proportion,
                    repeat=config.repeat,
                    download_timeout=download_timeout,
                    validate_hash=validate_hash,
                )
            )
        self.manifests: dict[str, Manifest | None] = {}
        for (name, config), stream in zip(streams.items(), stream_objects):
            manifest = _read_stream_manifest(config, stream, download_timeout)
            self._check_manifest(name, manifest, split)
            self.manifests[name] = manifest

        super().__init__(
            streams=stream_objects,
            batch_size=batch_size,
            shuffle=shuffle,
            shuffle_seed=shuffle_seed,
            shuffle_algo=shuffle_algo,
            shuffle_block_size=shuffle_block_size,
            num_canonical_nodes=num_canonical_nodes,
            predownload=predownload,
            cache_limit=cache_limit,
            epoch_size=epoch_size,
        )
        self.domain_names: list[str] = []
        """Global domain names; `domain_id` in a sample indexes this list."""
        self._layouts = [
            self._build_layout(stream_id, name, config)
            for stream_id, (name, config) in enumerate(streams.items())
        ]

    def _check_manifest(self, name: str, manifest: Manifest | None, split: str) -> None:
        if manifest is None:
            return
        where = f"stream {name!r} ({manifest.path})"
        if manifest.seq_len != self.seq_len:
            raise DataError(
                f"{where} has seq_len={manifest.seq_len}, but the data config asks for "
                f"seq_len={self.seq_len}; set data.seq_len={manifest.seq_len} or prepare the "
                "data again"
            )
        if self.vocab_size is not None and manifest.vocab_size > self.vocab_size:
            raise DataError(
                f"{where} has vocab_size={manifest.vocab_size}, larger than the model's "
                f"vocab_size={self.vocab_size}"
            )
        if manifest.split_samples(split) == 0:
            raise DataError(
                f"{where} has no samples in split {split!r}; add text, lower seq_len, or "
                "raise --val-fraction when preparing"
            )

    def _domain_index(self, name: str) -> int:
        if name not in self.domain_names:
            self.domain_names.append(name)
        return self.domain_names.index(name)

    def _build_layout(self, stream_id: int, name: str, config: StreamConfig) -> _StreamLayout:
        shard = self.shards[int(self.shard_offset_per_stream[stream_id])]
        columns = dict(zip(shard.column_names, shard.column_encodings))
        manifest = self.manifests[name]
        if INPUT_IDS in columns and DOMAIN_ID in columns and manifest is not None:
            table = np.array([self._domain_index(d) for d in manifest.domains], np.int64)
            return _StreamLayout(INPUT_IDS, None, table, -1)
        fixed_domain = self._domain_index(name)
        for column in (FOUNDRY_TOKENS, INPUT_IDS):
            encoding = columns.get(column)
            if encoding == "bytes":
                return _StreamLayout(column, np.dtype(config.token_dtype), None, fixed_domain)
            if encoding is not None and encoding.startswith("ndarray"):
                return _StreamLayout(column, None, None, fixed_domain)
        raise DataError(
            f"stream {name!r}: shards have columns {columns}; expected 'input_ids' and "
            "'domain_id' (olmoe prepare) or 'tokens' as bytes or ndarray (llm-foundry)"
        )

    def _shard_path(self, shard_id: int) -> str:
        shard = self.shards[shard_id]
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        info = shard.zip_data if shard.zip_data is not None else shard.raw_data
        return os.path.join(stream.local, stream.split, info.basename)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            # Other workers wait until the shard leaves the PREPARING state and is LOCAL. Mark
            # it LOCAL so that they go on to read it: finding no raw file, get_item prepares
            # the shard again and fails with this error instead of waiting forever.
            self._shard_states[shard_id] = _ShardState.LOCAL
            error = ShardError(f"cannot prepare shard {self._shard_path(shard_id)}: {err}")
            # This usually runs in streaming's background thread, whose exception only stops
            # the iteration early, so __iter__ and get_item raise the stored error.
            self._prepare_error = error
            raise error from err

    def __iter__(self):
        yield from super().__iter__()
        if self._prepare_error is not None:
            raise self._prepare_error

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, torch.Tensor]:
        shard_id, index_in_shard = self.spanner[sample_id]
        try:
            sample = super().get_item(sample_id, retry)
        except Exception as err:
            # Stop streaming's download threads, which otherwise keep the process alive.
            if hasattr(self, "_event"):
                self._event.set()
            if isinstance(err, ShardError):
                raise
            if self._prepare_error is not None:
                raise self._prepare_error from err
            raise ShardError(
                f"cannot read sample {index_in_shard} of shard {self._shard_path(shard_id)}: {err}"
            ) from err
        return self._decode(sample, shard_id, index_in_shard)

    def _decode(self, sample: dict[str, Any], shard_id: int, index: int) -> dict[str, Any]:
        layout = self._layouts[int(self.stream_per_shard[shard_id])]
        where = f"sample {index} of shard {self._shard_path(shard_id)}"
        raw = sample[layout.column]
        if layout.bytes_dtype is not None:
            if len(raw) % layout.bytes_dtype.itemsize:
                raise ShardError(
                    f"{where}: {len(raw)} bytes of tokens is not a multiple of "
                    f"{layout.bytes_dtype} ({layout.bytes_dtype.itemsize} bytes); check token_dtype"
                )
            ids = np.frombuffer(raw, layout.bytes_dtype)
        else:
            ids = np.asarray(raw).reshape(-1)
        if len(ids) < self.seq_len:
            raise ShardError(f"{where} has {len(ids)} tokens, fewer than seq_len={self.seq_len}")
        # shape: (T,)
        ids = ids[: self.seq_len].astype(np.int64)
        if ids.min() < 0 or (self.vocab_size is not None and ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= (self.vocab_size or np.iinfo(np.int64).max))][0]
            raise DataError(
                f"{where} contains token id {int(bad)}, outside the model vocabulary "
                f"[0, {self.vocab_size}); the shards were made with another tokenizer"
            )
        if layout.domain_table is not None:
            local_domain = int(sample[DOMAIN_ID])
            if not 0 <= local_domain < len(layout.domain_table):
                raise ShardError(f"{where} has domain_id {local_domain}, not in its manifest")
            domain = int(layout.domain_table[local_domain])
        else:
            domain = layout.fixed_domain
        return {
            "input_ids": torch.from_numpy(ids),
            "domain_id": torch.tensor(domain, dtype=torch.int64),
        }

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Return the resumption state (see `StreamingDataset.state_dict`).

        At the end of an epoch the state is the start of the next epoch. Composer's epoch-end
        checkpoint passes `num_samples=0` (its timestamp has moved to the next epoch) while the
        loader's iteration has already yielded samples. Composer stops iterating after the last
        batch, so the loader's iteration never reaches its end there.
        """
        state = super().state_dict(num_samples, from_beginning)
        composer_epoch_end = from_beginning and num_samples == 0 and self.samples_this_iteration
        if self.epoch_finished or composer_epoch_end or state["sample_in_epoch"] >= self.epoch_size:
            state = {**state, "epoch": state["epoch"] + 1, "sample_in_epoch": 0}
        return state

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        obj = dict(obj)
        if obj["sample_in_epoch"] >= self.epoch_size:
            obj.update(epoch=obj["epoch"] + 1, sample_in_epoch=0)
        super().load_state_dict(obj)


class TokenDataLoader(StreamingDataLoader):
    """A `StreamingDataLoader` that records the epoch progress on its `TokenDataset`."""

    def __iter__(self):
        dataset = self.dataset if isinstance(self.dataset, TokenDataset) else None
        if dataset is not None:
            dataset.epoch_finished = False
            dataset.samples_this_iteration = 0
        for batch in super().__iter__():
            if dataset is not None:
                dataset.samples_this_iteration = self.num_samples_yielded
            yield batch
        if dataset is not None:
            dataset.epoch_finished = True


def build_dataset(
    data_cfg: DataConfig,
    batch_size: int,
    split: str = "train",
    vocab_size: int | None = None,
    shuffle: bool | None = None,
) -> TokenDataset:
    """Build the dataset of one split (a subdirectory of each stream: 'train' or 'val').

    `batch_size` is the per-rank batch size, which `streaming` needs for deterministic
    resumption. `shuffle` defaults to `data_cfg.shuffle` for 'train' and False otherwise.
    `vocab_size` (the model's) enables a check of every token id.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size={batch_size} is invalid: must be positive")
    if shuffle is None:
        shuffle = data_cfg.shuffle and split == "train"
    return TokenDataset(
        streams=data_cfg.stream_configs(),
        split=split,
        seq_len=data_cfg.seq_len,
        batch_size=batch_size,
        vocab_size=vocab_size,
        shuffle=shuffle,
        shuffle_seed=data_cfg.shuffle_seed,
        shuffle_algo=data_cfg.shuffle_algo,
        shuffle_block_size=data_cfg.shuffle_block_size,
        num_canonical_nodes=data_cfg.num_canonical_nodes,
        predownload=data_cfg.predownload,
        cache_limit=data_cfg.cache_limit,
        epoch_size=data_cfg.epoch_size,
        validate_hash=data_cfg.validate_hash,
        download_timeout=data_cfg.download_timeout,
    )


def build_dataloader(
    data_cfg: DataConfig,
    batch_size: int,
    split: str = "train",
    vocab_size: int | None = None,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
) -> TokenDataLoader:
    """Build the dataloader of one split; batches are {"input_ids": (B, T), "domain_id": (B,)}.

    `drop_last` defaults to True for 'train' and False otherwise. See `build_dataset` for the
    other arguments.
    """
    dataset = build_dataset(data_cfg, batch_size, split, vocab_size, shuffle)
    if drop_last is None:
        drop_last = split == "train"
    extra = {}
    if data_cfg.num_workers > 0 and data_cfg.prefetch_factor is not None:
        extra["prefetch_factor"] = data_cfg.prefetch_factor
    return TokenDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=data_cfg.num_workers,
        drop_last=drop_last,
        pin_memory=data_cfg.pin_memory,
        **extra,
    )
