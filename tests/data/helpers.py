"""Builders for small token datasets and corpora, and shared-memory cleanup for streaming."""

from __future__ import annotations

import gc
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from olmoe.data.manifest import DomainStats, Manifest, token_dtype_for_vocab, write_manifest
from olmoe.data.shards import ShardWriter

SHM_DIR = Path("/dev/shm")


def sample_ids(index: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """Return the (T,) ids of synthetic sample `index`: a run starting at index * seq_len."""
    return (index * seq_len + np.arange(seq_len)) % vocab_size


def write_token_dataset(
    root: Path,
    num_samples: int,
    *,
    seq_len: int = 8,
    vocab_size: int = 65536,
    domains: tuple[str, ...] = ("alpha", "beta"),
    val_samples: int = 0,
    size_limit: int = 1 << 12,
    start: int = 0,
) -> Manifest:
    """Write a prepared dataset whose sample i contains `sample_ids(start + i)` and whose
    domain is i % len(domains).

    With (start + num_samples) * seq_len <= vocab_size, the first id identifies a sample.
    """
    dtype = token_dtype_for_vocab(vocab_size)
    splits = {}
    for split, count in (("train", num_samples), ("val", val_samples)):
        stats = {domain: DomainStats() for domain in domains}
        with ShardWriter(
            root / split, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size, size_limit=size_limit
        ) as writer:
            for index in range(count):
                domain_id = index % len(domains)
                writer.write(sample_ids(start + index, seq_len, vocab_size), domain_id)
                stats[domains[domain_id]].samples += 1
                stats[domains[domain_id]].tokens += seq_len
        splits[split] = stats
    manifest = Manifest(
        vocab_size=vocab_size,
        seq_len=seq_len,
        dtype=dtype,
        eos_token_id=0,
        domains=list(domains),
        splits=splits,
    )
    write_manifest(manifest, root)
    return manifest


def batch_sample_indices(batch, seq_len: int) -> list[int]:
    """Recover the synthetic sample index of each row of a batch from its first id."""
    return [int(first) // seq_len for first in batch["input_ids"][:, 0]]


def take_batches(loader, steps: int, seq_len: int) -> list[list[int]]:
    """Return the sample indices of the first `steps` batches of a fresh iteration."""
    batches = []
    for batch in loader:
        batches.append(batch_sample_indices(batch, seq_len))
        if len(batches) == steps:
            break
    return batches


def shm_names() -> set[str]:
    return set(os.listdir(SHM_DIR)) if SHM_DIR.is_dir() else set()


def release_streaming_shm(root: Path, before: set[str]) -> None:
    """Unlink the shared memory of streaming datasets a test created under `root`.

    streaming keeps a dataset's shared memory until the process exits. This unlinks the
    segments of each prefix registered since `before` whose directories are under `root`, or
    whose registration is empty because the dataset was deleted, and removes the prefix's
    file locks from the temporary directory.
    """
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _unpack_locals

    gc.collect()
    for name in sorted(shm_names() - before):
        match = re.fullmatch(r"(\d{6})_locals", name)
        if match is None:
            continue
        try:
            shm = SharedMemory(name, create=False)
            registered, _ = _unpack_locals(bytes(shm.buf))
            shm.close()
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            continue
        if not all(path.startswith(str(root)) for path in registered):
            continue
        prefix_int = int(match.group(1))
        for suffix in SHM_TO_CLEAN:
            (SHM_DIR / _get_path(prefix_int, suffix)).unlink(missing_ok=True)
        for suffix in (BARRIER_FILELOCK, CACHE_FILELOCK):
            (Path(tempfile.gettempdir()) / _get_path(prefix_int, suffix)).unlink(missing_ok=True)
