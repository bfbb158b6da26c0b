"""One rank of the two-rank dataloader test (run as a script by test_distributed.py).

Usage: python two_rank_reader.py DATASET_DIR OUTPUT_JSON, with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Each rank reads one epoch and gathers the
sample indices of all ranks over gloo; rank 0 writes them to OUTPUT_JSON.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch.distributed as dist

from olmoe.data import DataConfig, build_dataloader

SEQ_LEN = 8
BATCH = 4


def main(dataset_dir: str, output: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    config = DataConfig(local=dataset_dir, seq_len=SEQ_LEN, num_workers=2, shuffle_seed=3)
    loader = build_dataloader(config, BATCH)
    indices = []
    for batch in loader:
        indices.extend(int(first) // SEQ_LEN for first in batch["input_ids"][:, 0])
    gathered: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, indices)
    if dist.get_rank() == 0:
        with open(output, "w") as handle:
            json.dump({"per_rank": gathered, "epoch_size": loader.dataset.epoch_size}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
