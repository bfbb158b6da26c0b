"""Shard writing and reading: exact id round trips, dtypes, and the MDS byte layout."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from streaming import MDSWriter

from olmoe.data import DataConfig, DataError, build_dataset
from olmoe.data.manifest import DomainStats, Manifest, token_dtype_for_vocab, write_manifest
from olmoe.data.shards import ShardWriter, token_columns

EDGE_IDS = [0, 1, 50279, 65535, 65536, 100277]


def _write_edge_dataset(root, vocab_size: int) -> Manifest:
    seq_len = len(EDGE_IDS)
    dtype = token_dtype_for_vocab(vocab_size)
    for split in ("train", "val"):
        with ShardWriter(root / split, seq_len=seq_len, dtype=dtype, vocab_size=vocab_size) as w:
            w.write(np.array(EDGE_IDS), domain_id=0)
            w.write(np.array(EDGE_IDS[::-1]), domain_id=0)
    stats = {"only": DomainStats(documents=1, tokens=2 * seq_len, samples=2)}
    manifest = Manifest(
        vocab_size=vocab_size,
        seq_len=seq_len,
        dtype=dtype,
        eos_token_id=0,
        domains=["only"],
        splits={"train": stats, "val": stats},
    )
    write_manifest(manifest, root)
    return manifest


def test_edge_ids_round_trip_exactly(tmp_path):
    manifest = _write_edge_dataset(tmp_path, vocab_size=100352)
    assert manifest.dtype == "uint32"
    config = DataConfig(local=str(tmp_path), seq_len=len(EDGE_IDS), num_workers=0)
    dataset = build_dataset(config, batch_size=1, split="train", vocab_size=100352)
    first, second = dataset[0], dataset[1]
    assert str(first["input_ids"].dtype) == "torch.int64"
    assert first["input_ids"].tolist() == EDGE_IDS
    assert second["input_ids"].tolist() == EDGE_IDS[::-1]
    assert int(first["domain_id"]) == 0
    assert dataset.domain_names == ["only"]


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(256, "uint16"), (65535, "uint16"), (65536, "uint16"), (65537, "uint32"), (100278, "uint32")],
)
def test_dtype_follows_vocab(vocab_size, dtype):
    assert token_dtype_for_vocab(vocab_size) == dtype


def test_writer_rejects_dtype_too_small(tmp_path):
    with pytest.raises(DataError, match="uint16 holds ids up to 65535.*65537 tokens"):
        ShardWriter(tmp_path / "train", seq_len=4, dtype="uint16", vocab_size=65537)


def test_writer_rejects_id_outside_vocab(tmp_path):
    writer = ShardWriter(tmp_path / "train", seq_len=4, dtype="uint16", vocab_size=1000)
    with pytest.raises(DataError, match="token id 1000 is outside the vocabulary"):
        writer.write(np.array([1, 2, 1000, 3]), domain_id=0)
    with pytest.raises(DataError, match=r"expected \(N, 4\)"):
        writer.write(np.array([1, 2, 3]), domain_id=0)
    writer.cancel()


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_fast_encoding_matches_stock_mds_writer(tmp_path, dtype):
    rng = np.random.default_rng(0)
    seq_len, vocab_size = 16, 60000
    samples = rng.integers(0, vocab_size, size=(300, seq_len))
    domains = rng.integers(0, 3, size=300)

    with ShardWriter(
        tmp_path / "fast", seq_len=seq_len, dtype=dtype, vocab_size=vocab_size, size_limit=4096
    ) as writer:
        for sample, domain in zip(samples, domains):
            writer.write(sample, int(domain))

    stock = MDSWriter(
        out=str(tmp_path / "stock"),
        columns=token_columns(seq_len, dtype),
        compression="zstd",
        hashes=["sha1"],
        size_limit=4096,
    )
    for sample, domain in zip(samples, domains):
        stock.write({"input_ids": sample.astype(dtype), "domain_id": int(domain)})
    stock.finish()

    fast_files = sorted(p.name for p in (tmp_path / "fast").iterdir())
    stock_files = sorted(p.name for p in (tmp_path / "stock").iterdir())
    assert fast_files == stock_files
    assert len(fast_files) > 2  # several shards and the index
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "fast", tmp_path / "stock", fast_files, shallow=False
    )
    assert mismatch == []
    assert errors == []
