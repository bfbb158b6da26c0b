"""Reading shards: stream mixtures, llm-foundry layouts, and bad shards or configs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf
from streaming import MDSWriter

from olmoe.data import (
    DataConfig,
    DataError,
    ShardError,
    StreamConfig,
    build_dataloader,
    build_dataset,
    check_compatible,
    read_manifest,
)
from olmoe.model.config import ConfigError, ModelConfig
from tests.data.helpers import batch_sample_indices, write_token_dataset

SEQ_LEN = 8


def _read_all(dataset) -> list[dict]:
    return [dataset[i] for i in range(dataset.num_samples)]


def test_samples_carry_domain_ids(tmp_path):
    write_token_dataset(tmp_path, 30, seq_len=SEQ_LEN, domains=("alpha", "beta", "gamma"))
    dataset = build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), batch_size=2)
    assert dataset.domain_names == ["alpha", "beta", "gamma"]
    for index, sample in enumerate(_read_all(dataset)):
        assert sample["input_ids"].tolist() == list(range(index * SEQ_LEN, (index + 1) * SEQ_LEN))
        assert int(sample["domain_id"]) == index % 3


def test_local_remote_copies_into_cache(tmp_path):
    source = tmp_path / "dataset"
    write_token_dataset(source, 40, seq_len=SEQ_LEN)
    files_before = sorted(p.name for p in (source / "train").iterdir())
    config = DataConfig(remote=str(source), local=str(tmp_path / "cache"), seq_len=SEQ_LEN)
    dataset = build_dataset(config, batch_size=4)
    samples = _read_all(dataset)
    assert [s["input_ids"][0].item() for s in samples] == [i * SEQ_LEN for i in range(40)]
    assert dataset.domain_names == ["alpha", "beta"]
    # the dataset directory is left as prepared; the shards were copied and decompressed
    assert sorted(p.name for p in (source / "train").iterdir()) == files_before
    assert list((tmp_path / "cache" / "train").glob("shard.*.mds"))


def test_batches_have_expected_shapes(tmp_path):
    write_token_dataset(tmp_path, 20, seq_len=SEQ_LEN, val_samples=6)
    config = DataConfig(local=str(tmp_path), seq_len=SEQ_LEN, num_workers=0)
    val_loader = build_dataloader(config, batch_size=4, split="val")
    batches = list(val_loader)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, SEQ_LEN), (2, SEQ_LEN)]
    assert [tuple(b["domain_id"].shape) for b in batches] == [(4,), (2,)]
    # validation is read in order by default, and keeps its last partial batch
    assert [batch_sample_indices(b, SEQ_LEN) for b in batches] == [[0, 1, 2, 3], [4, 5]]


def test_streams_mix_by_proportion(tmp_path):
    write_token_dataset(tmp_path / "a", 200, seq_len=SEQ_LEN, domains=("code",))
    write_token_dataset(tmp_path / "b", 200, seq_len=SEQ_LEN, domains=("web", "code"), start=1000)
    config = DataConfig(
        streams={
            "a": StreamConfig(local=str(tmp_path / "a"), proportion=3.0),
            "b": StreamConfig(local=str(tmp_path / "b"), proportion=1.0),
        },
        epoch_size=400,
        seq_len=SEQ_LEN,
        num_workers=0,
    )
    loader = build_dataloader(config, batch_size=8)
    assert loader.dataset.domain_names == ["code", "web"]
    from_stream: Counter = Counter()
    for batch in loader:
        for index, domain in zip(batch_sample_indices(batch, SEQ_LEN), batch["domain_id"]):
            stream = "b" if index >= 1000 else "a"
            from_stream[stream] += 1
            if stream == "a":
                assert int(domain) == 0
            else:
                expected_name = ("web", "code")[(index - 1000) % 2]
                assert loader.dataset.domain_names[int(domain)] == expected_name
    assert from_stream == {"a": 300, "b": 100}


def _write_foundry(root, rows: list[np.ndarray], encoding: str) -> None:
    writer = MDSWriter(out=str(root / "train"), columns={"tokens": encoding}, compression="zstd")
    for row in rows:
        writer.write({"tokens": row.tobytes() if encoding == "bytes" else row})
    writer.finish()


def test_foundry_bytes_layout(tmp_path):
    rows = [np.arange(i, i + SEQ_LEN, dtype=np.int64) * 1000 for i in range(5)]
    _write_foundry(tmp_path, rows, "bytes")
    config = DataConfig(local=str(tmp_path), seq_len=SEQ_LEN, token_dtype="int64")
    dataset = build_dataset(config, batch_size=1, vocab_size=20000)
    assert dataset.domain_names == ["default"]
    samples = _read_all(dataset)
    assert [s["input_ids"].tolist() for s in samples] == [row.tolist() for row in rows]
    assert [int(s["domain_id"]) for s in samples] == [0] * 5


def test_foundry_ndarray_layout_truncates_to_seq_len(tmp_path):
    rows = [np.arange(i, i + 12, dtype=np.uint32) for i in range(4)]
    _write_foundry(tmp_path, rows, "ndarray:uint32")
    dataset = build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), batch_size=1)
    assert [s["input_ids"].tolist() for s in _read_all(dataset)] == [
        row[:SEQ_LEN].tolist() for row in rows
    ]


def test_foundry_bytes_with_wrong_dtype_size(tmp_path):
    rows = [np.arange(7, dtype=np.int16)]  # 14 bytes: not a whole number of int64
    _write_foundry(tmp_path, rows, "bytes")
    dataset = build_dataset(DataConfig(local=str(tmp_path), seq_len=2), batch_size=1)
    with pytest.raises(ShardError, match=r"shard\.00000\.mds\.zstd: 14 bytes of tokens"):
        dataset[0]


def test_token_id_outside_model_vocab(tmp_path):
    rows = [np.array([5, 6, 7, 1234, 8, 9, 10, 11], np.int64)]
    _write_foundry(tmp_path, rows, "bytes")
    dataset = build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), 1, vocab_size=1000)
    with pytest.raises(DataError, match=r"shard\.00000\.mds\.zstd contains token id 1234.*1000"):
        dataset[0]


def test_manifest_vocab_larger_than_model(tmp_path):
    write_token_dataset(tmp_path, 10, seq_len=SEQ_LEN, vocab_size=4096)
    config = DataConfig(local=str(tmp_path), seq_len=SEQ_LEN)
    with pytest.raises(DataError, match="vocab_size=4096, larger than the model's vocab_size=1000"):
        build_dataset(config, batch_size=1, vocab_size=1000)


def test_seq_len_mismatch(tmp_path):
    write_token_dataset(tmp_path, 10, seq_len=SEQ_LEN)
    with pytest.raises(DataError, match="seq_len=8, but the data config asks for seq_len=16"):
        build_dataset(DataConfig(local=str(tmp_path), seq_len=16), batch_size=1)


def test_empty_split(tmp_path):
    write_token_dataset(tmp_path, 10, seq_len=SEQ_LEN, val_samples=0)
    with pytest.raises(DataError, match="no samples in split 'val'"):
        build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), 1, split="val")


def _first_shard(root):
    return sorted((root / "train").glob("shard.*.mds.zstd"))[0]


def test_truncated_shard_names_file(tmp_path):
    write_token_dataset(tmp_path, 100, seq_len=SEQ_LEN)
    shard = _first_shard(tmp_path)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=f"shard {shard} has .* bytes but index.json lists"):
        build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), batch_size=1)


def test_missing_shard_names_file(tmp_path):
    write_token_dataset(tmp_path, 100, seq_len=SEQ_LEN)
    shard = _first_shard(tmp_path)
    shard.unlink()
    with pytest.raises(ShardError, match=f"shard {shard} listed in index.json is missing"):
        build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), batch_size=1)


def test_invalid_index_names_file(tmp_path):
    write_token_dataset(tmp_path, 10, seq_len=SEQ_LEN)
    (tmp_path / "train" / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match="index.json is not valid JSON"):
        build_dataset(DataConfig(local=str(tmp_path), seq_len=SEQ_LEN), batch_size=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_names_file(tmp_path, num_workers):
    write_token_dataset(tmp_path, 100, seq_len=SEQ_LEN)
    shard = _first_shard(tmp_path)
    data = bytearray(shard.read_bytes())
    data[4:] = bytes(len(data) - 4)  # keep the zstd magic number, zero the frame
    shard.write_bytes(bytes(data))
    config = DataConfig(local=str(tmp_path), seq_len=SEQ_LEN, num_workers=num_workers)
    loader = build_dataloader(config, batch_size=4, shuffle=False)
    with pytest.raises(ShardError, match=f"cannot prepare shard {shard}"):
        list(loader)


def test_check_compatible(tmp_path):
    write_token_dataset(tmp_path, 10, seq_len=SEQ_LEN, vocab_size=4096)
    model = ModelConfig(vocab_size=4096, max_seq_len=64)
    manifest = check_compatible(tmp_path, model, seq_len=SEQ_LEN)
    assert manifest.vocab_size == 4096
    assert manifest.domains == ["alpha", "beta"]
    assert check_compatible(manifest, ModelConfig(vocab_size=4160, max_seq_len=64), SEQ_LEN)

    with pytest.raises(DataError, match="seq_len=8, but training uses seq_len=16"):
        check_compatible(tmp_path, model, seq_len=16)
    with pytest.raises(DataError, match="vocab_size=4096, larger than model.vocab_size=4000"):
        check_compatible(tmp_path, ModelConfig(vocab_size=4000, max_seq_len=64), SEQ_LEN)
    with pytest.raises(DataError, match="seq_len=8 exceeds model.max_seq_len=4"):
        check_compatible(tmp_path, ModelConfig(vocab_size=4096, max_seq_len=4), SEQ_LEN)


def test_manifest_with_dtype_too_small(tmp_path):
    write_token_dataset(tmp_path, 10, seq_len=SEQ_LEN, vocab_size=4096)
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    data["vocab_size"] = 70000
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="uint16 holds ids up to 65535.*70000 tokens"):
        read_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local": "x", "streams": {"a": StreamConfig(local="y")}}, "not both"),
        ({"streams": {}}, "at least one stream"),
        ({"local": "x", "shuffle_algo": "random"}, "data.shuffle_algo='random' is invalid"),
        ({"local": "x", "seq_len": 0}, "data.seq_len=0 is invalid"),
        ({"local": "x", "num_workers": -1}, "data.num_workers=-1 is invalid"),
        ({"local": "x", "token_dtype": "float32"}, "data.token_dtype='float32' is invalid"),
        (
            {"streams": {"a": StreamConfig(local="y", proportion=1.0), "b": StreamConfig("z")}},
            "proportion on every stream or on none",
        ),
        ({"streams": {"a": StreamConfig()}}, "data.streams.a.remote=None is invalid"),
        ({"streams": {"a": StreamConfig(local="y", proportion=-1.0)}}, "proportion=-1.0"),
    ],
)
def test_config_rejects(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**kwargs)


def test_config_without_dataset_fails_at_build():
    config = DataConfig()
    with pytest.raises(ConfigError, match="data.local=None is invalid: set remote or local"):
        build_dataset(config, batch_size=1)


def test_config_from_omegaconf():
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(
        schema,
        {
            "streams": {"code": {"local": "/a", "proportion": 0.7}, "web": {"local": "/b"}},
            "seq_len": 256,
        },
    )
    with pytest.raises(ConfigError, match="proportion on every stream"):
        OmegaConf.to_object(merged)
    merged.streams.web.proportion = 0.3
    config = OmegaConf.to_object(merged)
    assert isinstance(config, DataConfig)
    assert isinstance(config.streams["web"], StreamConfig)
    assert config.streams["web"].proportion == 0.3
    assert config.seq_len == 256
