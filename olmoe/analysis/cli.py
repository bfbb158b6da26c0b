"""`olmoe analyze CHECKPOINT [CHECKPOINT ...] --data SHARDS --out DIR`.

For each checkpoint: run the model over the same held-out samples (a token budget per
domain, in shard order), export every token's top-k experts and probabilities per layer
(see docs/analysis.md for the format), then compute the specialization metrics over all
exports and write figures and a text report into DIR.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoint files or run directories"
    )
    parser.add_argument("--data", type=Path, required=True, help="prepared shard directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--split", default="val", help="split to analyze (default: val)")
    parser.add_argument(
        "--tokens-per-domain", type=int, default=20_000, help="token budget per domain"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--config", type=Path, default=None, help="run config.yaml (default: next to checkpoints)"
    )
    parser.add_argument(
        "--coactivation",
        choices=["all", "adjacent"],
        default="all",
        help="co-activation pairs: all pairs within the top-k or adjacent ranks only",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing exports")


def held_out_samples(
    data: Path, split: str, tokens_per_domain: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the first samples of each domain, in shard order, up to the token budget.

    Returns input ids (N, S), domain ids (N,) and the domain names.
    """
    from olmoe.data import DataConfig, build_dataset, read_manifest

    manifest = read_manifest(data)
    config = DataConfig(local=str(data), seq_len=manifest.seq_len, shuffle=False)
    dataset = build_dataset(config, batch_size=1, split=split, shuffle=False)
    budget = dict.fromkeys(range(len(dataset.domain_names)), tokens_per_domain)
    ids, domains = [], []
    for index in range(dataset.num_samples):
        if all(left <= 0 for left in budget.values()):
            break
        sample = dataset[index]
        domain = int(sample["domain_id"])
        if budget[domain] <= 0:
            continue
        ids.append(sample["input_ids"].numpy())
        domains.append(domain)
        budget[domain] -= ids[-1].size
    if not ids:
        raise ValueError(f"no {split} samples found in {data}")
    return np.stack(ids), np.asarray(domains, dtype=np.int64), list(dataset.domain_names)


@torch.no_grad()
def route_samples(model, input_ids: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts (L, N * S, K) and their probabilities for every token."""
    indices, probs = [], []
    for start in range(0, len(input_ids), batch_size):
        batch = torch.from_numpy(input_ids[start : start + batch_size])
        out = model(batch, output_routing=True)
        indices.append(torch.stack([x.reshape(-1, x.shape[-1]) for x in out.expert_indices]))
        probs.append(torch.stack([x.reshape(-1, x.shape[-1]) for x in out.expert_probs]))
    return torch.cat(indices, dim=1).numpy(), torch.cat(probs, dim=1).float().numpy()


def analyze(
    checkpoints: list[Path],
    data: Path,
    out: Path,
    *,
    split: str = "val",
    tokens_per_domain: int = 20_000,
    batch_size: int = 8,
    config: Path | None = None,
    coactivation: str = "all",
    overwrite: bool = False,
) -> str:
    """Export routing of each checkpoint, write figures and report; return the report text."""
    from olmoe.analysis.export import write_export
    from olmoe.analysis.report import report_text, write_report
    from olmoe.analysis.stats import load_routing_stats
    from olmoe.train.checkpoint import (
        checkpoint_step,
        find_checkpoint,
        find_run_config,
        load_model_from_checkpoint,
    )

    if not checkpoints:
        raise ValueError("no checkpoints given to analyze")
    out.mkdir(parents=True, exist_ok=True)
    exports = []
    samples = None
    for checkpoint in checkpoints:
        model, state = load_model_from_checkpoint(checkpoint, config)
        step = checkpoint_step(state)
        if samples is None:
            samples = held_out_samples(data, split, tokens_per_domain)
        input_ids, sample_domains, domain_names = samples
        log.info("routing %d tokens through %s (step %d)", input_ids.size, checkpoint, step)
        expert_indices, expert_probs = route_samples(model, input_ids, batch_size)
        targets = np.full_like(input_ids, -1)
        targets[:, :-1] = input_ids[:, 1:]
        token_domains = np.repeat(sample_domains, input_ids.shape[1])
        exports.append(
            write_export(
                out / "exports" / f"step{step:08d}",
                step=step,
                expert_indices=expert_indices,
                expert_probs=expert_probs,
                input_ids=input_ids.reshape(-1),
                target_ids=targets.reshape(-1),
                domain_ids=token_domains,
                domain_names=domain_names,
                model_config=model.config.to_dict(),
                tokenizer=str(data / "tokenizer.json"),
                extra={"checkpoint": str(checkpoint)},
                overwrite=overwrite,
            )
        )
    # Routing counts recorded during training, if the run kept them.
    stats = None
    run_config = config or find_run_config(find_checkpoint(checkpoints[-1]))
    stats_file = Path(run_config).parent / "routing_stats.jsonl"
    if stats_file.is_file():
        stats = load_routing_stats(stats_file, strict=False)
    paths = write_report(exports, out, stats, coactivation_mode=coactivation)
    log.info("wrote %d files into %s", len(paths), out)
    return report_text(exports, stats)


def run(args: argparse.Namespace) -> int:
    report = analyze(
        args.checkpoints,
        args.data,
        args.out,
        split=args.split,
        tokens_per_domain=args.tokens_per_domain,
        batch_size=args.batch_size,
        config=args.config,
        coactivation=args.coactivation,
        overwrite=args.overwrite,
    )
    print(report)
    return 0
