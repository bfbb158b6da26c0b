"""The Composer training loop across gloo CPU ranks: gradient accumulation and launches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch.distributed.tensor import DTensor

from olmoe.train.checkpoint import load_model_from_checkpoint
from olmoe.train.config import load_config
from olmoe.train.trainer import build_trainer
from tests.train._dist import run_distributed
from tests.train.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


class RouterGradients(Callback):
    """Full router gradients of every layer after the first backward, before clipping."""

    def __init__(self):
        self.grads: list[torch.Tensor] = []

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if self.grads:
            return
        for layer in state.model.model.layers:
            grad = layer.mlp.router.weight.grad
            grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
            self.grads.append(grad.detach().clone())


def _router_gradients(data: str, run_dir: str, microbatch: int, global_batch: int = 8):
    # The load-balancing loss depends on which tokens share a microbatch, so it is off here.
    # Cross-entropy and the z-loss are token means and must not depend on the split.
    overrides = tiny_overrides(
        data,
        run_dir,
        max_duration="1ba",
        global_batch_size=global_batch,
        device_microbatch_size=microbatch,
        **{
            "model.moe.lb_loss_weight": 0.0,
            "model.moe.z_loss_weight": 1.0,
            "optimizer.grad_clip_norm": "null",
            "checkpoint.autoresume": False,
            "eval_interval": "100ba",
            "data.shuffle": False,
        },
    )
    recorder = RouterGradients()
    trainer = build_trainer(load_config(None, overrides))
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    trainer.close()
    return [g.numpy() for g in recorder.grads]


def _ranked_router_gradients(data: str, run_dir: str):
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        NODE_RANK="0",
    )
    return _router_gradients(data, run_dir, microbatch=4)


def test_gradient_accumulation_and_ranks_agree(token_data, tmp_path):
    whole = _router_gradients(str(token_data), str(tmp_path / "whole"), microbatch=8)
    micro = _router_gradients(str(token_data), str(tmp_path / "micro"), microbatch=2)
    ranks = run_distributed(
        _ranked_router_gradients,
        2,
        args=(str(token_data), str(tmp_path / "ranks")),
        timeout_s=240.0,
    )
    for layer, reference in enumerate(whole):
        reference = torch.from_numpy(reference)
        scale = reference.abs().max()
        assert scale > 0
        for name, other in (("4 microbatches", micro[layer]), ("2 ranks", ranks[0][layer])):
            diff = (torch.from_numpy(other) - reference).abs().max() / scale
            assert diff < 1e-5, f"layer {layer}, {name}: relative difference {diff:.2e}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_node_launch_then_resume_at_ep1(token_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        token_data,
        run_dir,
        max_duration="4ba",
        **{"parallelism.ep": 2, "eval_interval": "2ba", "checkpoint.save_interval": "2ba"},
    )
    env = dict(
        os.environ,
        NNODES="2",
        NPROC="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHON=sys.executable,
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "launch" / "multinode.sh"), "configs/demo.yaml", *overrides],
            cwd=REPO,
            env=dict(env, NODE_RANK=str(node)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = []
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        outputs.append(out)
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    assert "step 4 |" in "".join(outputs)

    # The checkpoint written at ep=2 contains all 4 experts and loads in one process.
    model, state = load_model_from_checkpoint(run_dir)
    assert model.layers[0].mlp.experts.gate_up_weight.shape[0] == 4
    layout = state["state"]["callbacks"]["ExpertLayout"]
    assert layout["global_expert_ids_by_ep_rank"] == [[0, 1], [2, 3]]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # Training continues from it in one process (ep=1) for two more steps.
    resumed = load_config(None, tiny_overrides(token_data, run_dir, max_duration="6ba"))
    trainer = build_trainer(resumed)
    assert int(trainer.state.timestamp.batch) == 4
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 6
    trainer.close()
