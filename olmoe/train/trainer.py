"""Build and run a Composer Trainer from a TrainConfig.

Order of work:
    1. start torch.distributed (torchrun or Composer's launcher set the env variables)
    2. check the config against the world size and the shards, before any heavy work
    3. build the model on every rank with the same seed, then apply expert parallelism
       and FSDP2 onto the plain modules
    4. optimizer, schedule, dataloaders, callbacks, loggers, checkpoints -> Trainer
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from pathlib import Path

import torch
from composer import Evaluator, Trainer
from composer.loggers import FileLogger
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from composer.utils import dist, reproducibility

from olmoe.data import build_dataloader
from olmoe.train.callbacks import (
    EvalHistory,
    ExpertLayout,
    NonFiniteLossGuard,
    StepLogger,
    peak_tflops,
)
from olmoe.train.composer_model import OlmoeComposerModel
from olmoe.train.config import TrainConfig, to_yaml
from olmoe.train.grad_norm import GlobalGradClip

log = logging.getLogger(__name__)


def resolve_device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if config.device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device='gpu' but CUDA is not available; set device=cpu or device=auto")
    return config.device


def resolve_precision(config: TrainConfig, device: str) -> str:
    if config.precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    return config.precision


def init_distributed(device: str) -> None:
    """Start the process group when launched by torchrun or Composer (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.initialize_dist(device, timeout=datetime.timedelta(minutes=5).total_seconds())


def merge_nodes_on_one_host(device: str) -> None:
    """Count ranks that share a host as one node, as streaming requires on the CPU.

    streaming keeps one shared-memory registry per node and host, so two launcher "nodes"
    on one machine (a multi-node test on one box) would collide. On the CPU this sets
    LOCAL_RANK and LOCAL_WORLD_SIZE from the hostnames of all ranks. GPU runs keep the
    launcher's values, which also pick each rank's device.
    """
    if device != "cpu" or dist.get_world_size() == 1:
        return
    hosts = dist.all_gather_object(socket.gethostname())
    rank = dist.get_global_rank()
    same_host = [r for r, host in enumerate(hosts) if host == hosts[rank]]
    if same_host != list(range(same_host[0], same_host[0] + len(same_host))):
        return
    local_rank, local_world = str(same_host.index(rank)), str(len(same_host))
    launcher_values = (os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE"))
    if launcher_values != (local_rank, local_world):
        log.info("ranks %s share this host: treating them as one node", same_host)
        os.environ["LOCAL_RANK"] = local_rank
        os.environ["LOCAL_WORLD_SIZE"] = local_world


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear, embedding, experts, router); none on norm weights."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def save_resolved_config(config: TrainConfig, run_dir: Path) -> Path:
    """Write `<run_dir>/config.yaml` atomically (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(f".yaml.tmp-{os.getpid()}")
    tmp.write_text(to_yaml(config))
    os.replace(tmp, path)
    return path


def build_trainer(config: TrainConfig) -> Trainer:
    device = resolve_device(config)
    precision = resolve_precision(config, device)
    init_distributed(device)
    merge_nodes_on_one_host(device)
    world_size = dist.get_world_size()

    # 2. checks before heavy work; building the datasets checks the shards' seq_len and vocab
    config.check_world(world_size)
    per_rank_batch = config.global_batch_size // world_size
    train_loader = build_dataloader(
        config.data, per_rank_batch, split="train", vocab_size=config.model.vocab_size
    )
    val_loader = build_dataloader(
        config.data,
        min(config.device_microbatch_size, per_rank_batch),
        split="val",
        vocab_size=config.model.vocab_size,
    )
    domains = list(train_loader.dataset.domain_names)
    run_dir = Path(config.run_dir)
    if dist.get_global_rank() == 0:
        save_resolved_config(config, run_dir)

    # 3. the model: same seed everywhere, so every rank builds the same weights
    reproducibility.seed_all(config.seed)
    composer_model = OlmoeComposerModel(config.model, domains=domains)
    if world_size > 1:
        from olmoe.train.parallel import parallelize

        parallelize(composer_model.model, ep=config.parallelism.ep, fsdp=config.parallelism.fsdp)

    # 4. optimizer, schedule, data, callbacks
    # Composer's DecoupledAdamW multiplies weights by (1 - wd * lr / peak_lr) each step. The
    # config's weight decay follows torch's AdamW (1 - lr * wd), so it is scaled by the peak lr.
    decay = config.optimizer.weight_decay * config.optimizer.lr
    optimizer = DecoupledAdamW(
        param_groups(composer_model, decay),
        lr=config.optimizer.lr,
        betas=tuple(config.optimizer.betas),
        eps=config.optimizer.eps,
        weight_decay=decay,
    )
    scheduler = CosineAnnealingWithWarmupScheduler(
        t_warmup=config.scheduler.warmup, alpha_f=config.scheduler.alpha_f
    )
    evaluator = Evaluator(
        label="val",
        dataloader=val_loader,
        metric_names=list(composer_model.val_metrics),
        subset_num_batches=config.eval_batches,
    )
    grad_clip = GlobalGradClip(config.optimizer.grad_clip_norm)
    flops = config.model.flops_per_token(config.data.seq_len)
    callbacks = [
        StepLogger(
            config.logging.log_interval,
            flops,
            peak_tflops(config.logging.peak_tflops),
            grad_clip,
            remeasure_peak=device == "cpu" and config.logging.peak_tflops is None,
        ),
        NonFiniteLossGuard(),
        EvalHistory(run_dir),
        ExpertLayout(config.parallelism.ep, config.model.moe.num_experts),
    ]
    if config.logging.routing_stats_interval > 0:
        from olmoe.analysis.callback import RoutingStatsCallback

        callbacks.append(
            RoutingStatsCallback(run_dir, config.logging.routing_stats_interval, domains=domains)
        )

    return Trainer(
        model=composer_model,
        train_dataloader=train_loader,
        eval_dataloader=evaluator,
        eval_interval=config.eval_interval,
        max_duration=config.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=[grad_clip],
        callbacks=callbacks,
        loggers=build_loggers(config, run_dir),
        run_name=config.run_name,
        save_folder=str(run_dir / "checkpoints"),
        save_interval=config.checkpoint.save_interval,
        save_num_checkpoints_to_keep=config.checkpoint.keep,
        save_overwrite=not config.checkpoint.autoresume,
        autoresume=config.checkpoint.autoresume,
        load_path=config.checkpoint.load_path,
        device=device,
        precision=precision,
        device_train_microbatch_size=config.device_microbatch_size,
        seed=config.seed,
        progress_bar=False,
        log_to_console=False,
        python_log_level=None,
    )


def build_loggers(config: TrainConfig, run_dir: Path) -> list:
    loggers = []
    if config.logging.file:
        loggers.append(FileLogger(filename=str(run_dir / "metrics.log"), flush_interval=10))
    if config.logging.tensorboard:
        from composer.loggers import TensorboardLogger

        loggers.append(TensorboardLogger(log_dir=str(run_dir / "tensorboard")))
    if config.logging.wandb:
        from composer.loggers import WandBLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(
            WandBLogger(
                project=config.logging.wandb_project,
                name=config.run_name,
                init_kwargs={"dir": str(run_dir)},
            )
        )
    return loggers


def train(config: TrainConfig) -> Trainer:
    """Build the trainer, fit, and return it (for callers that inspect the final state)."""
    trainer = build_trainer(config)
    if int(trainer.state.timestamp.batch) == 0:
        # The loss before any step, so the history shows where training started.
        trainer.eval()
    trainer.fit()
    return trainer
