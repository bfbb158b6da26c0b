"""Fixtures for the data tests: release streaming's shared memory after each test."""

from __future__ import annotations

import pytest

from tests.data.helpers import release_streaming_shm, shm_names


@pytest.fixture(autouse=True)
def _release_shared_memory(tmp_path):
    before = shm_names()
    yield
    release_streaming_shm(tmp_path, before)
