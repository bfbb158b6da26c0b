"""Fixtures for the training tests: a tiny prepared dataset and streaming cleanup."""

from __future__ import annotations

import pytest

from tests.data.helpers import release_streaming_shm, shm_names, write_token_dataset

SEQ_LEN = 16
VOCAB = 128


@pytest.fixture(autouse=True)
def _release_shared_memory(tmp_path):
    before = shm_names()
    yield
    release_streaming_shm(tmp_path, before)


@pytest.fixture
def token_data(tmp_path):
    """A dataset of 96 train and 16 val samples of 16 tokens in two domains."""
    root = tmp_path / "data"
    write_token_dataset(
        root, 96, seq_len=SEQ_LEN, vocab_size=VOCAB, domains=("alpha", "beta"), val_samples=16
    )
    return root


def tiny_overrides(data, run_dir, **extra) -> list[str]:
    """Overrides that turn the schema defaults into a model and run small enough for tests."""
    values = {
        "run_name": "test",
        "run_dir": str(run_dir),
        "data.local": str(data),
        "data.seq_len": SEQ_LEN,
        "data.num_workers": 0,
        "data.num_canonical_nodes": 1,
        "model.vocab_size": VOCAB,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.max_seq_len": SEQ_LEN,
        "model.moe.num_experts": 4,
        "model.moe.top_k": 2,
        "model.moe.expert_hidden": 16,
        "model.moe.backend": "torch",
        "global_batch_size": 8,
        "device_microbatch_size": 8,
        "max_duration": "6ba",
        "eval_interval": "3ba",
        "eval_batches": 2,
        "optimizer.lr": 1e-2,
        "scheduler.warmup": "2ba",
        "checkpoint.save_interval": "3ba",
        "logging.log_interval": 1,
        "logging.file": False,
        "device": "cpu",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
