"""Two ranks (gloo on the CPU) read disjoint samples that together cover the epoch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.helpers import write_token_dataset

NUM_SAMPLES = 1000
WORLD_SIZE = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_split_the_epoch(tmp_path):
    root = tmp_path / "tokens"
    write_token_dataset(root, NUM_SAMPLES, seq_len=8)
    output = tmp_path / "gathered.json"
    script = Path(__file__).with_name("two_rank_reader.py")
    repo_root = Path(__file__).resolve().parents[2]
    port = _free_port()
    processes = []
    for rank in range(WORLD_SIZE):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(WORLD_SIZE),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(WORLD_SIZE),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=str(repo_root),
        )
        command = [sys.executable, str(script), str(root), str(output)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    logs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=TIMEOUT_S)
            logs.append(out.decode(errors="replace"))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, process in enumerate(processes):
        assert process.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"

    result = json.loads(output.read_text())
    rank0, rank1 = result["per_rank"]
    assert result["epoch_size"] == NUM_SAMPLES
    assert len(rank0) == NUM_SAMPLES // WORLD_SIZE
    assert len(rank1) == NUM_SAMPLES // WORLD_SIZE
    assert set(rank0).isdisjoint(rank1)
    assert sorted(rank0 + rank1) == list(range(NUM_SAMPLES))
