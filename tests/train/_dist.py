"""Run a function in N spawned CPU processes joined by a gloo process group on 127.0.0.1.

    results = run_distributed(check_step, world_size=2, timeout_s=60.0, args=(config,))

Each rank calls `fn(*args, **kwargs)` after `torch.distributed` is initialized and returns
a picklable value; `run_distributed` returns those values ordered by rank. The function
must be defined at module top level (spawned processes import it by name). A failure in
any rank raises `DistributedRunError` with that rank's traceback; a run that does not
finish in `timeout_s` raises `TimeoutError` after killing every rank.

The rendezvous is a `TCPStore` that the parent opens on an OS-assigned port, so parallel
test runs never race for a port.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

_HOST = "127.0.0.1"


class DistributedRunError(RuntimeError):
    """A rank raised an exception or exited without returning a result."""


def _run_rank(
    rank: int,
    world_size: int,
    store_port: int,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    results: mp.Queue,
) -> None:
    # Loopback only, and one thread per rank so that N ranks share the CPU cores fairly.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    try:
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(_HOST, store_port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        try:
            value = fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensor data. The queue's own pickler would share tensors through
        # file descriptors, which vanish when this process exits.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - any failure is reported to the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout_s: float = 60.0,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: must be >= 1")
    context = mp.get_context("spawn")
    results: mp.Queue = context.Queue()
    timeout = datetime.timedelta(seconds=timeout_s)
    # Port 0 lets the OS pick a free port. The parent keeps the store open until the ranks finish.
    store = dist.TCPStore(
        _HOST, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False
    )
    processes = [
        context.Process(
            target=_run_rank,
            args=(rank, world_size, store.port, timeout_s, fn, args, kwargs or {}, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()

    values: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        # Drain the queue before joining: a child blocks on exit until its result is read.
        while len(values) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - values.keys() - failures.keys())
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish {fn.__name__} within "
                    f"{timeout_s} s; raise timeout_s or look for a collective that some "
                    "ranks skip"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                dead = _find_dead_ranks(processes, values.keys() | failures.keys())
                if not dead:
                    continue
                # A rank that exits right after its `put` may still have its result in flight.
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    codes = {rank: processes[rank].exitcode for rank in dead}
                    raise DistributedRunError(
                        f"ranks {dead} of {world_size} exited without a result (exit codes {codes})"
                    ) from None
            if ok:
                values[rank] = pickle.loads(value)
            else:
                failures[rank] = value
                # The other ranks may now wait forever on a collective, so stop at once.
                break
    finally:
        # Ranks that returned exit at once; the others may hang in a collective.
        grace_s = 5.0 if len(values) == world_size else 0.5
        for process in processes:
            process.join(timeout=grace_s)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()

    if failures:
        rank = min(failures)
        raise DistributedRunError(f"rank {rank} of {world_size} failed:\n{failures[rank]}")
    return [values[rank] for rank in range(world_size)]


def _find_dead_ranks(processes: list, finished: set[int]) -> list[int]:
    return [
        rank
        for rank, process in enumerate(processes)
        if rank not in finished and process.exitcode is not None
    ]
