"""Seeded shuffling and exact resumption of the training dataloader."""

from __future__ import annotations

import gc

import pytest

from olmoe.data import DataConfig, build_dataloader
from tests.data.helpers import take_batches, write_token_dataset

SEQ_LEN = 8
NUM_SAMPLES = 1000
BATCH = 4
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "tokens"
    write_token_dataset(root, NUM_SAMPLES, seq_len=SEQ_LEN, size_limit=1 << 12)
    return root


def _config(root, **overrides) -> DataConfig:
    values = dict(local=str(root), seq_len=SEQ_LEN, num_workers=2, shuffle=True, shuffle_seed=7)
    values.update(overrides)
    return DataConfig(**values)


def _close(loader) -> None:
    del loader
    gc.collect()


def _state_after(loader, steps: int, composer_style: bool) -> dict:
    """Return the state a checkpoint after `steps` batches holds.

    Composer saves `dataset.state_dict(samples_in_epoch, from_beginning=True)`; a plain loop
    saves `loader.state_dict()`, which counts the samples it yielded.
    """
    if composer_style:
        return loader.dataset.state_dict(steps * BATCH, from_beginning=True)
    return loader.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(dataset_dir) -> dict[str, list[list[int]]]:
    """Return the batches of one uninterrupted run: all of epoch 0, the start of epoch 1."""
    loader = build_dataloader(_config(dataset_dir), BATCH)
    epoch0 = take_batches(loader, STEPS_PER_EPOCH + 1, SEQ_LEN)
    epoch1 = take_batches(loader, 10, SEQ_LEN)
    _close(loader)
    return {"epoch0": epoch0, "epoch1": epoch1}


def test_shuffle_is_seeded(dataset_dir, uninterrupted):
    order_a = uninterrupted["epoch0"][:10]
    second = build_dataloader(_config(dataset_dir), BATCH)
    order_b = take_batches(second, 10, SEQ_LEN)
    _close(second)
    other = build_dataloader(_config(dataset_dir, shuffle_seed=8), BATCH)
    order_c = take_batches(other, 10, SEQ_LEN)
    _close(other)

    flat = [index for batch in order_a for index in batch]
    assert order_a == order_b
    assert order_a != order_c
    assert flat != sorted(flat)


def test_order_does_not_depend_on_workers(dataset_dir, uninterrupted):
    loader = build_dataloader(_config(dataset_dir, num_workers=0), BATCH)
    assert take_batches(loader, 12, SEQ_LEN) == uninterrupted["epoch0"][:12]
    _close(loader)


def test_epoch_covers_every_sample(uninterrupted):
    epoch0, epoch1 = uninterrupted["epoch0"], uninterrupted["epoch1"]
    assert len(epoch0) == STEPS_PER_EPOCH
    assert sorted(i for batch in epoch0 for i in batch) == list(range(NUM_SAMPLES))
    assert epoch1 != epoch0[:10]


@pytest.mark.parametrize("composer_style", [False, True], ids=["loader_state", "composer_state"])
def test_resume_mid_epoch_matches_uninterrupted(dataset_dir, uninterrupted, composer_style):
    first_loader = build_dataloader(_config(dataset_dir), BATCH)
    first = take_batches(first_loader, 10, SEQ_LEN)
    state = _state_after(first_loader, 10, composer_style)
    _close(first_loader)
    assert state["sample_in_epoch"] == 10 * BATCH

    resumed_loader = build_dataloader(_config(dataset_dir), BATCH)
    resumed_loader.load_state_dict(state)
    resumed = take_batches(resumed_loader, 15, SEQ_LEN)
    _close(resumed_loader)

    assert first + resumed == uninterrupted["epoch0"][:25]


@pytest.mark.parametrize("composer_style", [False, True], ids=["loader_state", "composer_state"])
def test_resume_at_epoch_end_starts_next_epoch(dataset_dir, uninterrupted, composer_style):
    first_loader = build_dataloader(_config(dataset_dir), BATCH)
    assert take_batches(first_loader, STEPS_PER_EPOCH + 1, SEQ_LEN) == uninterrupted["epoch0"]
    # Composer's epoch-end checkpoint: its timestamp already reads 0 samples into the next epoch.
    state = _state_after(first_loader, 0, composer_style)
    _close(first_loader)
    assert state["epoch"] == 1
    assert state["sample_in_epoch"] == 0

    resumed_loader = build_dataloader(_config(dataset_dir), BATCH)
    resumed_loader.load_state_dict(state)
    resumed = take_batches(resumed_loader, 10, SEQ_LEN)
    _close(resumed_loader)
    assert resumed == uninterrupted["epoch1"]


def test_resume_from_full_epoch_count(dataset_dir, uninterrupted):
    # A state that counts a whole epoch (as stock streaming saves it) also moves to the next.
    state = {
        "epoch": 0,
        "sample_in_epoch": NUM_SAMPLES,
        "num_canonical_nodes": 1,
        "shuffle_seed": 7,
        "initial_physical_nodes": 1,
    }
    resumed_loader = build_dataloader(_config(dataset_dir), BATCH)
    resumed_loader.load_state_dict(state)
    assert take_batches(resumed_loader, 5, SEQ_LEN) == uninterrupted["epoch1"][:5]
    _close(resumed_loader)
