"""Training-step throughput of olmoe's model against HF's OlmoeForCausalLM, same weights.

Both models are built from one config (default `configs/demo.yaml`: its model section,
global batch size and sequence length) and hold the same initial weights (`to_hf`). Each
is trained by a plain PyTorch loop on the same batches of random token ids, with
`torch.optim.AdamW` and the config's learning rate, betas, epsilon and weight decay:

    ours: OlmoeModel forward, CE + lb_loss_weight * LB + z_loss_weight * Z (the training
          loss of `OlmoeComposerModel`), backward, AdamW step
    HF:   OlmoeForCausalLM(input_ids, labels, output_router_logits=True) forward, its loss
          (CE + router_aux_loss_coef * LB; HF has no z-loss), backward, AdamW step

Run it as a script (it imports `moe_layer.py` from this directory). Each repeat runs one
step of each model in turn, so a change in machine load hits both
alike; the table reports medians. MFU is model FLOPs (`ModelConfig.flops_per_token`)
per second over this machine's fp32 matmul peak, measured in the same run with one
2048^3 `torch.mm`. Gradient clipping and the learning-rate schedule are left out of both.

    python benchmarks/train_step.py                  # configs/demo.yaml, CPU fp32
    python benchmarks/train_step.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from moe_layer import matmul_peak_gflops, tune_glibc_malloc

from olmoe.convert import to_hf
from olmoe.model import OlmoeModel
from olmoe.train.composer_model import OlmoeComposerModel
from olmoe.train.config import TrainConfig, load_config

PHASES = ("forward", "backward", "optimizer")


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    opt = config.optimizer
    return torch.optim.AdamW(
        model.parameters(),
        lr=opt.lr,
        betas=tuple(opt.betas),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
    )


def training_step(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer
) -> Callable[[torch.Tensor], dict[str, float]]:
    """One step: `loss_fn(input_ids)`, backward, AdamW; returns the loss and seconds per phase."""

    def step(input_ids: torch.Tensor) -> dict[str, float]:
        start = time.perf_counter()
        loss = loss_fn(input_ids)
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        return {
            "loss": loss.item(),
            "forward": forward_end - start,
            "backward": backward_end - forward_end,
            "optimizer": end - backward_end,
        }

    return step


def ours_loss(model: OlmoeComposerModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function computing `OlmoeComposerModel`'s loss: CE + weighted LB and Z."""

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids}
        return model.loss(model(batch), batch)["total"]

    return loss_fn


def hf_loss(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return a function computing HF's own loss: shifted CE + router_aux_loss_coef * LB."""

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, labels=input_ids, output_router_logits=True).loss

    return loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="training config YAML")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    parser.add_argument(
        "--malloc-tuning",
        action="store_true",
        help="keep freed memory in glibc's heap (mallopt; Linux with glibc only)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc_tuning:
        tune_glibc_malloc()

    config = load_config(args.config)
    model_config = config.model
    batch_size, seq_len = config.global_batch_size, config.data.seq_len
    torch.manual_seed(args.seed)
    ours = OlmoeComposerModel(model_config)
    theirs = to_hf(ours.model).train()
    steps = {
        "ours": training_step(ours_loss(ours), make_optimizer(ours, config)),
        "hf": training_step(hf_loss(theirs), make_optimizer(theirs, config)),
    }
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, model_config.vocab_size, (batch_size, seq_len), generator=generator)
        for _ in range(args.warmup + args.repeats)
    ]
    with torch.no_grad():
        ours_logits = ours.model(batches[0]).logits
        hf_logits = theirs(input_ids=batches[0]).logits
        logits_diff = (ours_logits - hf_logits).abs().max().item()
        # Ours computes the training cross-entropy in chunks, without the logits.
        ours_ce = ours({"input_ids": batches[0]}).loss.item()
        hf_ce = F.cross_entropy(
            hf_logits[:, :-1].reshape(-1, hf_logits.shape[-1]), batches[0][:, 1:].reshape(-1)
        ).item()

    load_before = os.getloadavg()[0]
    peak = matmul_peak_gflops()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for i, input_ids in enumerate(batches):
        for name, step in steps.items():
            record = step(input_ids)
            if i >= args.warmup:
                results[name].append(record)
    load_after = os.getloadavg()[0]

    tokens = batch_size * seq_len
    flops_per_token = model_config.flops_per_token(seq_len)
    malloc = "tuned" if args.malloc_tuning else "default"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {malloc} malloc")
    print(f"matmul peak (2048^3 torch.mm, best of 10): {peak:.1f} GFLOP/s")
    print(
        f"config {args.config}: batch {batch_size} x seq {seq_len} = {tokens} tokens/step, "
        f"{OlmoeModel.num_params(ours.model) / 1e6:.2f}M params, "
        f"{flops_per_token / 1e6:.1f} MFLOP/token (training), "
        f"HF attention {theirs.config._attn_implementation}, "
        f"max |logits ours - HF| before training {logits_diff:.1e}, "
        f"cross-entropy ours {ours_ce:.6f} HF {hf_ce:.6f}"
    )
    header = f"{'model':<6}{'step ms':>9}" + "".join(f"{p + ' ms':>14}" for p in PHASES)
    print(header + f"{'tokens/s':>10}{'MFU':>7}{'loss first/last':>18}")
    throughput = {}
    for name, records in results.items():
        step_s = statistics.median(sum(r[p] for p in PHASES) for r in records)
        throughput[name] = tokens / step_s
        mfu = throughput[name] * flops_per_token / (peak * 1e9)
        line = f"{name:<6}{step_s * 1e3:>9.1f}"
        line += "".join(f"{statistics.median(r[p] for r in records) * 1e3:>14.1f}" for p in PHASES)
        losses = f"{records[0]['loss']:.3f}/{records[-1]['loss']:.3f}"
        print(line + f"{throughput[name]:>10.0f}{mfu:>7.1%}{losses:>18}")
    print(f"ours / HF tokens/s: {throughput['ours'] / throughput['hf']:.2f}x")
    print(f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after")


if __name__ == "__main__":
    main()
