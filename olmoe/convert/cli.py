"""`olmoe convert --to hf|olmoe SRC DST`: convert model directories (safetensors)."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from olmoe.convert import from_hf, to_hf
from olmoe.model.io import commit_output_dir, load_pretrained, prepare_output_dir, save_pretrained

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        required=True,
        choices=["hf", "olmoe"],
        help="target format: 'hf' writes an OlmoeForCausalLM directory, 'olmoe' an olmoe one",
    )
    parser.add_argument("src", type=Path, help="source model directory")
    parser.add_argument("dst", type=Path, help="destination directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.json or tokenizer directory to save next to an HF export",
    )


def run(args: argparse.Namespace) -> int:
    if not args.src.is_dir():
        raise SystemExit(f"error: source directory {args.src} not found")
    if args.to == "hf":
        model = load_pretrained(args.src)
        save_hf(to_hf(model), args.dst, overwrite=args.overwrite, tokenizer=args.tokenizer)
    else:
        save_pretrained(from_hf(args.src), args.dst, overwrite=args.overwrite)
    log.info("wrote %s model to %s", args.to, args.dst)
    return 0


def save_hf(hf_model, dst: Path, overwrite: bool = False, tokenizer: Path | None = None) -> Path:
    """Write an HF model (safetensors) and optionally its tokenizer, atomically."""
    tmp = prepare_output_dir(dst, overwrite)
    try:
        hf_model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, tmp)
        commit_output_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_hf_tokenizer(tokenizer: Path, dst: Path) -> None:
    """Save a `tokenizer.json` (or a tokenizer directory) as an HF fast tokenizer in `dst`."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Path(tokenizer)
    if tokenizer.is_file():
        hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer))
    elif tokenizer.is_dir():
        hf_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    else:
        raise FileNotFoundError(f"tokenizer {tokenizer} not found")
    hf_tokenizer.save_pretrained(str(dst))
