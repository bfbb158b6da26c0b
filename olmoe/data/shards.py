"""MDS shard layout of token samples, a checked writer, and shard file checks.

Each sample has two columns:

* `input_ids`: `ndarray:<dtype>:<seq_len>`, a fixed-size uint16 or uint32 array.
* `domain_id`: `int32`, an index into the manifest's `domains`.

Shards written by other tools in the llm-foundry layout store a `tokens` column instead, as raw
bytes of a dtype the reader must be told (llm-foundry's default is int64) or as an ndarray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from olmoe.data.errors import DataError, ShardError
from olmoe.data.manifest import TOKEN_DTYPES, check_dtype_holds_vocab

INPUT_IDS = "input_ids"
DOMAIN_ID = "domain_id"
FOUNDRY_TOKENS = "tokens"
DEFAULT_SHARD_SIZE_LIMIT = 1 << 26  # bytes of a shard before compression, as in MDSWriter
DEFAULT_COMPRESSION = "zstd"
SHARD_HASHES = ["sha1"]  # recorded in index.json; streaming checks them with validate_hash


def token_columns(seq_len: int, dtype: str) -> dict[str, str]:
    return {INPUT_IDS: f"ndarray:{dtype}:{seq_len}", DOMAIN_ID: "int32"}


def _token_mds_writer(**kwargs: Any):
    """Return an `MDSWriter` for `token_columns` with a fast `encode_sample`.

    MDS stores fixed-size columns without a size header, in sorted column order, so a sample
    is the int32 domain id followed by the id array. The stock `encode_sample` parses each
    column's encoding string for every sample, which costs more than the tokenizer on
    short samples. The tests check that both produce identical shard files.
    """
    from streaming import MDSWriter  # imported here: `import streaming` takes seconds

    class TokenMDSWriter(MDSWriter):
        def encode_sample(self, sample: dict[str, Any]) -> bytes:
            return np.int32(sample[DOMAIN_ID]).tobytes() + sample[INPUT_IDS].tobytes()

    writer = TokenMDSWriter(**kwargs)
    fixed_size = all(size is not None for size in writer.column_sizes)
    if writer.column_names != [DOMAIN_ID, INPUT_IDS] or not fixed_size:
        raise AssertionError(f"unexpected MDS columns {writer.column_names}")
    return writer


class ShardWriter:
    """Write packed token samples of one split as MDS shards, checking every id.

    Use as a context manager; `finish()` writes `index.json`, the last file.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        seq_len: int,
        dtype: str,
        vocab_size: int,
        compression: str | None = DEFAULT_COMPRESSION,
        size_limit: int = DEFAULT_SHARD_SIZE_LIMIT,
    ):
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"token dtype {dtype!r} is invalid: use one of {list(TOKEN_DTYPES)}")
        check_dtype_holds_vocab(dtype, vocab_size, f"shards in {out_dir}")
        if seq_len <= 0:
            raise DataError(f"seq_len={seq_len} is invalid: must be positive")
        self.out_dir = Path(out_dir)
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.vocab_size = vocab_size
        self.num_samples = 0
        self._writer = _token_mds_writer(
            out=str(self.out_dir),
            columns=token_columns(seq_len, dtype),
            compression=compression,
            hashes=SHARD_HASHES,
            size_limit=size_limit,
        )

    def write(self, input_ids: np.ndarray, domain_id: int) -> None:
        """Write samples of one domain: `input_ids` is (T,) or (N, T) with T = seq_len."""
        samples = np.asarray(input_ids)
        if samples.ndim == 1:
            samples = samples[None]
        if samples.ndim != 2 or samples.shape[1] != self.seq_len:
            raise DataError(
                f"samples of shape {tuple(np.shape(input_ids))} are invalid: "
                f"expected (N, {self.seq_len}) for seq_len={self.seq_len}"
            )
        if samples.size and (samples.min() < 0 or samples.max() >= self.vocab_size):
            bad = samples[(samples < 0) | (samples >= self.vocab_size)][0]
            raise DataError(
                f"token id {int(bad)} is outside the vocabulary [0, {self.vocab_size}); "
                "check that the tokenizer matches vocab_size"
            )
        samples = samples.astype(self.dtype, copy=False)
        for sample in samples:
            self._writer.write({INPUT_IDS: sample, DOMAIN_ID: domain_id})
        self.num_samples += len(samples)

    def finish(self) -> None:
        self._writer.finish()

    def cancel(self) -> None:
        """Stop the writer's threads after an error; the output directory is incomplete."""
        self._writer.cancel_future_jobs()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.cancel()


def read_index(split_dir: str | os.PathLike) -> dict[str, Any]:
    """Read a split's MDS `index.json`; raise ShardError naming the file if it is unusable."""
    path = Path(split_dir) / "index.json"
    if not path.is_file():
        raise ShardError(f"MDS index not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShardError(f"MDS index {path} is not valid JSON: {err}") from err


def check_shard_files(split_dir: str | os.PathLike) -> None:
    """Raise ShardError if a shard listed in `index.json` is missing or has the wrong size.

    A shard counts as present when its compressed file, its raw file, or both exist (streaming
    decompresses next to the compressed file on first use). This catches truncated and
    half-copied shards before training starts. Content corruption of the right size is
    caught when the shard is decompressed or decoded, or by `validate_hash`.
    """
    split_dir = Path(split_dir)
    index = read_index(split_dir)
    for shard in index.get("shards", []):
        present = False
        for key in ("zip_data", "raw_data"):
            info = shard.get(key)
            if not info:
                continue
            path = split_dir / info["basename"]
            if not path.exists():
                continue
            present = True
            size = path.stat().st_size
            if size != info["bytes"]:
                raise ShardError(
                    f"shard {path} has {size} bytes but index.json lists {info['bytes']}: "
                    "the file is truncated or corrupt; copy or prepare the data again"
                )
        if not present:
            names = [shard[k]["basename"] for k in ("zip_data", "raw_data") if shard.get(k)]
            raise ShardError(f"shard {split_dir / names[0]} listed in index.json is missing")
