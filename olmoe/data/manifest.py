"""The JSON manifest written next to prepared shards, and checks against a model config.

A prepared dataset directory looks like this::

    manifest.json       this file's `Manifest`
    tokenizer.json      the HuggingFace `tokenizers` tokenizer that produced the ids
    train/index.json    MDS index and shards of the training split
    val/index.json      MDS index and shards of the validation split
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from olmoe.data.errors import DataError

MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_NAME = "olmoe-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype_for_vocab(vocab_size: int) -> str:
    """Return the smallest unsigned dtype that holds every id below `vocab_size`."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size={vocab_size} is invalid: must be positive")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def check_dtype_holds_vocab(dtype: str, vocab_size: int, where: str) -> None:
    """Raise DataError when ids below `vocab_size` do not fit in `dtype`."""
    max_id = int(np.iinfo(np.dtype(dtype)).max)
    if vocab_size - 1 > max_id:
        raise DataError(
            f"{where}: token dtype {dtype} holds ids up to {max_id}, but the vocabulary has "
            f"{vocab_size} tokens; use uint32 (or let the dtype follow the vocabulary)"
        )


@dataclass
class DomainStats:
    """Counts for one domain in one split."""

    documents: int = 0
    """Documents assigned to this split."""
    tokens: int = 0
    """Tokens produced by the tokenizer, one EOS per document included."""
    samples: int = 0
    """Packed samples of `seq_len` tokens written to the shards."""
    dropped_tokens: int = 0
    """Tokens after the last full sample, which are not written (fewer than `seq_len`)."""


@dataclass
class Manifest:
    """Metadata of a prepared dataset: tokenizer, packing and per-domain, per-split counts."""

    vocab_size: int
    """Tokenizer vocabulary size: every id in the shards is below it."""
    seq_len: int
    """Tokens per sample."""
    dtype: str
    """NumPy dtype of the `input_ids` column: uint16 or uint32."""
    eos_token_id: int
    """Id appended after every document."""
    domains: list[str]
    """Domain names; a sample's `domain_id` indexes this list."""
    splits: dict[str, dict[str, DomainStats]]
    """Split name -> domain name -> counts."""
    tokenizer: str = TOKENIZER_NAME
    """Tokenizer file, relative to the dataset directory."""
    tokenizer_source: str = "trained"
    """Tokenizer origin: 'trained', or the path it was loaded from."""
    val_fraction: float = 0.0
    """Fraction of documents (by hash of their text) assigned to the validation split."""
    replaced_bytes: dict[str, int] = field(default_factory=dict)
    """Per domain: undecodable UTF-8 byte sequences replaced with U+FFFD."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Per reason: files or records skipped (binary files, bad JSON, empty documents)."""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    path: str | None = field(default=None, compare=False)
    """Directory the manifest was read from (not stored in the file)."""

    @property
    def tokenizer_path(self) -> str:
        """Absolute path of the tokenizer file (needs `path`, set by `read_manifest`)."""
        if self.path is None:
            raise DataError("manifest has no directory: read it with read_manifest(path)")
        return os.path.join(self.path, self.tokenizer)

    def split_samples(self, split: str) -> int:
        return sum(stats.samples for stats in self.splits.get(split, {}).values())

    def split_tokens(self, split: str) -> int:
        return sum(stats.tokens for stats in self.splits.get(split, {}).values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | None = None) -> Manifest:
        data = dict(data)
        if data.get("format") != FORMAT_NAME:
            raise DataError(f"manifest format={data.get('format')!r} is not {FORMAT_NAME!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"manifest format_version={data.get('format_version')!r} is not supported "
                f"(expected {FORMAT_VERSION}); prepare the data again"
            )
        splits = {
            split: {domain: DomainStats(**stats) for domain, stats in per_domain.items()}
            for split, per_domain in data.pop("splits").items()
        }
        return cls(splits=splits, path=path, **data)


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write `manifest.json` into `directory` through a temporary file and a rename."""
    path = Path(directory) / MANIFEST_NAME
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp_path, path)
    return path


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read the manifest of a prepared dataset directory (or of its `manifest.json` file)."""
    path = Path(path)
    file = path if path.name == MANIFEST_NAME else path / MANIFEST_NAME
    if not file.is_file():
        raise DataError(
            f"manifest not found: {file}; run `olmoe prepare --output {file.parent}` first"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"manifest {file} is not valid JSON: {err}") from err
    try:
        manifest = Manifest.from_dict(data, path=str(file.parent))
    except TypeError as err:
        raise DataError(f"manifest {file} has unexpected fields: {err}") from err
    check_dtype_holds_vocab(manifest.dtype, manifest.vocab_size, f"manifest {file}")
    return manifest


def check_compatible(manifest_or_path: Manifest | str | os.PathLike, model_cfg, seq_len: int):
    """Raise DataError unless prepared data fits a model config and a training sequence length.

    The shards' `seq_len` must equal `seq_len`, which must not exceed `model_cfg.max_seq_len`.
    The model's vocabulary may be larger than the tokenizer's (embedding rows are often padded
    to a multiple of 64 or 128), but not smaller. Returns the manifest.
    """
    if isinstance(manifest_or_path, Manifest):
        manifest = manifest_or_path
    else:
        manifest = read_manifest(manifest_or_path)
    where = f"data in {manifest.path}" if manifest.path else "data"
    if manifest.seq_len != seq_len:
        raise DataError(
            f"{where} has seq_len={manifest.seq_len}, but training uses seq_len={seq_len}; "
            f"prepare the data again with --seq-len {seq_len} or set seq_len={manifest.seq_len}"
        )
    if seq_len > model_cfg.max_seq_len:
        raise DataError(
            f"seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}; "
            "raise model.max_seq_len or use shorter samples"
        )
    if manifest.vocab_size > model_cfg.vocab_size:
        raise DataError(
            f"{where} has vocab_size={manifest.vocab_size}, larger than "
            f"model.vocab_size={model_cfg.vocab_size}; set model.vocab_size >= "
            f"{manifest.vocab_size} or prepare the data with a smaller tokenizer"
        )
    check_dtype_holds_vocab(manifest.dtype, manifest.vocab_size, where)
    return manifest
