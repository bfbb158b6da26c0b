"""Composer's Trainer saves and restores the dataloader state for an exact resume."""

from __future__ import annotations

import gc

import pytest
import torch

from olmoe.data import DataConfig, build_dataloader
from tests.data.helpers import batch_sample_indices, write_token_dataset

SEQ_LEN = 8
BATCH = 4
NUM_SAMPLES = 48  # 12 batches per epoch


def _recorder_model():
    from composer.models import ComposerModel

    class BatchRecorder(ComposerModel):
        """Records the sample indices of every training batch; its loss trains one scalar."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.seen: list[list[int]] = []

        def forward(self, batch):
            self.seen.append(batch_sample_indices(batch, SEQ_LEN))
            return self.scale * batch["input_ids"].float().mean()

        def loss(self, outputs, batch):
            return outputs**2

    return BatchRecorder()


def _train(root, save_folder, max_duration: str, load_path: str | None = None):
    """Train to `max_duration` and return the batches seen; checkpoint at the end if asked."""
    from composer import Trainer

    config = DataConfig(local=str(root), seq_len=SEQ_LEN, num_workers=2, shuffle_seed=11)
    loader = build_dataloader(config, BATCH)
    model = _recorder_model()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
        save_folder=str(save_folder) if save_folder else None,
        save_interval=max_duration,
        save_filename="ep{epoch}-ba{batch}.pt",
        load_path=load_path,
        progress_bar=False,
        log_to_console=False,
        device="cpu",
        seed=1,
    )
    trainer.fit()
    seen = list(model.seen)
    trainer.close()
    del trainer, loader
    gc.collect()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "checkpoint"),
    [("8ba", "ep0-ba8.pt"), ("1ep", "ep1-ba12.pt")],
    ids=["mid_epoch", "epoch_end"],
)
def test_trainer_resume_is_exact(tmp_path, stop, checkpoint):
    root = tmp_path / "tokens"
    write_token_dataset(root, NUM_SAMPLES, seq_len=SEQ_LEN)
    uninterrupted = _train(root, None, "20ba")
    assert len(uninterrupted) == 20

    first = _train(root, tmp_path / "ckpt", stop)
    resumed = _train(root, None, "20ba", load_path=str(tmp_path / "ckpt" / checkpoint))
    assert first + resumed == uninterrupted
    epoch0 = sorted(i for batch in uninterrupted[:12] for i in batch)
    assert epoch0 == list(range(NUM_SAMPLES))
