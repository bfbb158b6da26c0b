"""Exceptions raised for bad data: inputs, manifests and shards."""

from __future__ import annotations


class DataError(ValueError):
    """Invalid input data, or prepared data that does not match what the caller expects."""


class ShardError(DataError):
    """A shard file that is missing, truncated or cannot be decoded. The message names the file."""
