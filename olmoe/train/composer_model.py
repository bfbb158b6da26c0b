"""The Composer wrapper: next-token cross-entropy plus the weighted router losses.

Dims: B = batch, S = sequence, V = vocab, L = layers, E = experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torchmetrics import Metric

from olmoe.model import ModelConfig, OlmoeModel, OlmoeOutput
from olmoe.model.cross_entropy import IGNORE_INDEX


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels (B, S): position t predicts token t + 1; the last position and padding are ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        labels[:, :-1][attention_mask[:, 1:] == 0] = IGNORE_INDEX
    return labels


class DomainCrossEntropy(Metric):
    """Mean next-token cross-entropy over the tokens of one domain (or of all domains)."""

    full_state_update = False

    def __init__(self, domain_id: int | None = None):
        super().__init__(dist_sync_on_step=False)
        self.domain_id = domain_id
        self.add_state(
            "loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, domain_ids: torch.Tensor) -> None:
        if self.domain_id is not None:
            keep = domain_ids == self.domain_id
            logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0:
            return
        losses = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        self.loss_sum += losses.double()
        self.tokens += (labels != IGNORE_INDEX).sum()

    def compute(self) -> torch.Tensor:
        if self.tokens == 0:
            return torch.tensor(float("nan"))
        return (self.loss_sum / self.tokens).float()


class OlmoeComposerModel(ComposerModel):
    """Loss = CE + lb_loss_weight * LB + z_loss_weight * Z.

    Every term is a per-microbatch mean (over tokens, and over layers for LB and Z).
    Composer scales each microbatch loss by its share of the batch and data parallelism
    averages gradients over ranks, so with equal-length microbatches the gradients do
    not depend on how the batch is split into microbatches or ranks.
    """

    def __init__(self, config: ModelConfig, domains: list[str] | None = None, init: bool = True):
        super().__init__()
        self.config = config
        self.model = OlmoeModel(config, init=init)
        self.domains = list(domains or [])
        self.val_metrics = {"CrossEntropy": DomainCrossEntropy()}
        for domain_id, name in enumerate(self.domains):
            self.val_metrics[f"CrossEntropy/{name}"] = DomainCrossEntropy(domain_id)
        # The last training microbatch's routing counts (L, E), for logging callbacks.
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, batch: dict) -> OlmoeOutput:
        # The training forward returns the cross-entropy, not the logits (see
        # `OlmoeModel.forward`); evaluation goes through `eval_forward`.
        labels = next_token_labels(batch["input_ids"], batch.get("attention_mask"))
        return self.model(batch["input_ids"], batch.get("attention_mask"), labels=labels)

    def loss(self, outputs: OlmoeOutput, batch: dict) -> dict[str, torch.Tensor]:
        ce = outputs.loss
        moe = self.config.moe
        total = ce + moe.lb_loss_weight * outputs.lb_loss + moe.z_loss_weight * outputs.z_loss
        self.last_tokens_per_expert = outputs.tokens_per_expert.detach()
        return {
            "total": total,
            "ce": ce.detach(),
            "lb": outputs.lb_loss.detach(),
            "z": outputs.z_loss.detach(),
        }

    def eval_forward(self, batch: dict, outputs: OlmoeOutput | None = None) -> OlmoeOutput:
        # Evaluation also returns the per-layer routing, for per-domain routing statistics.
        if outputs is not None:
            return outputs
        return self.model(batch["input_ids"], batch.get("attention_mask"), output_routing=True)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else self.val_metrics

    def update_metric(self, batch: dict, outputs: OlmoeOutput, metric: Metric) -> None:
        labels = next_token_labels(batch["input_ids"], batch.get("attention_mask"))
        domain_ids = batch["domain_id"].view(-1, 1).expand_as(labels)
        metric.update(outputs.logits, labels, domain_ids)
