"""`olmoe export CHECKPOINT DST`: write a training checkpoint as a HuggingFace model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint file, or a run directory (latest checkpoint)"
    )
    parser.add_argument("dst", type=Path, help="output directory for OlmoeForCausalLM")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="run config.yaml (default: found next to the checkpoints)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.json to save with the model"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")


def run(args: argparse.Namespace) -> int:
    from olmoe.convert import to_hf
    from olmoe.convert.cli import save_hf
    from olmoe.train.checkpoint import checkpoint_step, load_model_from_checkpoint

    model, state = load_model_from_checkpoint(args.checkpoint, args.config)
    save_hf(to_hf(model), args.dst, overwrite=args.overwrite, tokenizer=args.tokenizer)
    log.info("exported step %d to %s", checkpoint_step(state), args.dst)
    return 0
