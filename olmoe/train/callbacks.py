"""Training callbacks: the per-step console line and the non-finite loss guard."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from olmoe.train.grad_norm import GlobalGradClip

log = logging.getLogger(__name__)

# bf16 dense peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def measure_cpu_matmul_tflops(size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput of this CPU (TFLOP/s), the MFU denominator on CPU."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(configured: float | None) -> float:
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_BF16_PEAK_TFLOPS.items():
            if key in name:
                return value
        log.warning("unknown GPU %r: set logging.peak_tflops for a correct MFU", name)
        return math.nan
    return measure_cpu_matmul_tflops()


class StepLogger(Callback):
    """Log one line every `interval` steps on rank 0: losses, imbalance, grad norm, lr, speed."""

    def __init__(
        self,
        interval: int,
        flops_per_token: float,
        peak_tflops: float,
        grad_clip: GlobalGradClip,
        remeasure_peak: bool = False,
    ):
        self.interval = interval
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_tflops * 1e12
        self.remeasure_peak = remeasure_peak
        self.grad_clip = grad_clip
        self._counts: torch.Tensor | None = None
        self._tokens = 0
        self._start = time.perf_counter()
        self._eval_started = 0.0
        self._eval_seconds = 0.0

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_started = time.perf_counter()

    def after_forward(self, state: State, logger: Logger) -> None:
        counts = state.outputs.tokens_per_expert.detach()
        self._counts = counts if self._counts is None else self._counts + counts

    def batch_start(self, state: State, logger: Logger) -> None:
        if self._tokens == 0:
            self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        self._tokens += state.batch["input_ids"].numel() * dist.get_world_size()
        step = int(state.timestamp.batch)
        if step % self.interval != 0:
            return
        counts = self._counts.float()
        # NOTE: every rank joins this all-reduce, which also syncs with the host.
        dist.all_reduce(counts)
        self._counts = None
        # Load imbalance: max over mean tokens per expert, worst layer.
        imbalance = (counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)).max().item()
        # Evaluation time between two lines is not training time.
        elapsed = time.perf_counter() - self._start - self._eval_seconds
        self._eval_seconds = 0.0
        tokens_per_s = self._tokens / max(elapsed, 1e-9)
        if self.remeasure_peak:
            # NOTE: a CPU peak measured while other processes load the cores is too low,
            # so it is measured again at every line and the highest value kept.
            self.peak_flops = max(self.peak_flops, measure_cpu_matmul_tflops(repeats=3) * 1e12)
        mfu = tokens_per_s * self.flops_per_token / self.peak_flops
        self._tokens = 0
        losses = state.total_loss_dict
        lr = state.optimizers[0].param_groups[0]["lr"]
        logger.log_metrics(
            {
                "train/load_imbalance": imbalance,
                "throughput/mfu": mfu,
                "throughput/tokens_per_s": tokens_per_s,
            }
        )
        if dist.get_global_rank() == 0:
            log.info(
                "step %d | loss %.4f | ce %.4f | lb %.4f | z %.4f | imbalance %.2f | "
                "grad_norm %.3f | lr %.2e | tokens/s %.0f | mfu %.1f%%",
                step,
                losses.get("loss/train/total", math.nan),
                losses.get("loss/train/ce", math.nan),
                losses.get("loss/train/lb", math.nan),
                losses.get("loss/train/z", math.nan),
                imbalance,
                self.grad_clip.last_norm,
                lr,
                tokens_per_s,
                100 * mfu,
            )

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._tokens > 0:
            self._eval_seconds += time.perf_counter() - self._eval_started
        if dist.get_global_rank() != 0:
            return
        metrics = state.eval_metric_values
        overall = metrics.get("CrossEntropy", math.nan)
        per_domain = " | ".join(
            f"{k.split('/', 1)[1]} {v:.4f}"
            for k, v in metrics.items()
            if k.startswith("CrossEntropy/")
        )
        log.info(
            "eval step %d | val_loss %.4f | %s", int(state.timestamp.batch), overall, per_domain
        )


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Stop before the optimizer step when the loss is not finite, so no bad state is saved."""

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
        # NOTE: host sync on the loss value every microbatch.
        if not torch.isfinite(loss.detach()).all():
            step = int(state.timestamp.batch) + 1
            raise NonFiniteLossError(
                f"non-finite loss {loss.detach().float().item()} at step {step}; training stopped "
                "before the optimizer step, so the checkpoints on disk hold only finite states. "
                "Lower optimizer.lr or check the data, then resume from the last checkpoint."
            )


class EvalHistory(Callback):
    """Append each evaluation's metrics to `<run_dir>/eval_history.jsonl` on rank 0."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "eval_history.jsonl"

    def eval_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        record = {
            "step": int(state.timestamp.batch),
            "metrics": {k: float(v) for k, v in state.eval_metric_values.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class ExpertLayout(Callback):
    """Records in each checkpoint which global experts each expert-parallel rank holds.

    Checkpoint tensors are saved whole, experts in global order, so they load at any
    `parallelism.ep`; this record (under the checkpoint's "callbacks") documents the layout
    the run had, and a resume at another ep logs the change.
    """

    def __init__(self, ep: int, num_experts: int):
        self.ep = ep
        self.num_experts = num_experts

    def layout(self) -> dict:
        per_rank = self.num_experts // self.ep
        return {
            "ep": self.ep,
            "num_experts": self.num_experts,
            "global_expert_ids_by_ep_rank": [
                list(range(r * per_rank, (r + 1) * per_rank)) for r in range(self.ep)
            ],
        }

    def state_dict(self) -> dict:
        return self.layout()

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_experts") != self.num_experts:
            raise ValueError(
                f"checkpoint has {state.get('num_experts')} experts per layer, the model "
                f"{self.num_experts}; load it with the model config it was trained with"
            )
        if state.get("ep") != self.ep:
            log.info("checkpoint was saved at ep=%s, resuming at ep=%d", state.get("ep"), self.ep)
