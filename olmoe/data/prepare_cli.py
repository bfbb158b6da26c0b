"""Command line of `olmoe prepare`."""

from __future__ import annotations

import argparse
import logging

from olmoe.data.errors import DataError

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  olmoe prepare --output data/shards --seq-len 256
      built-in corpus: Python stdlib source (code), Python reference docs (docs),
      man pages (man) and license texts (license), each limited to 8 MB by default
  olmoe prepare --output data/mix --input code=src/ --input web='crawl/*.jsonl.zst' \\
      --tokenizer path/to/tokenizer.json
"""


def parse_size(text: str) -> int:
    """Parse a byte count: a plain integer or one with a kb/mb/gb suffix (powers of 1000)."""
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "k": 10**3, "m": 10**6, "g": 10**9}
    lowered = text.strip().lower()
    number, factor = lowered, 1
    for suffix, suffix_factor in units.items():
        if lowered.endswith(suffix):
            number, factor = lowered[: -len(suffix)], suffix_factor
            break
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a byte count such as 8000000 or 8mb"
        ) from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be a positive byte count")
    return int(value)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from olmoe.data.prepare import BUILTIN_MAX_BYTES_PER_DOMAIN, PrepareOptions
    from olmoe.data.shards import DEFAULT_SHARD_SIZE_LIMIT

    defaults = PrepareOptions(output="")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="text to tokenize, tagged with a domain: a file, directory or glob of plain text "
        "or JSON Lines (.jsonl, .jsonl.gz, .jsonl.zst); repeatable; none: built-in corpus",
    )
    parser.add_argument(
        "--output",
        default="data/shards",
        help="dataset directory to create (default: data/shards)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory that contains a prepared dataset",
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json file or HuggingFace tokenizer directory (default: train a "
        "byte-level BPE on a sample of the inputs)",
    )
    parser.add_argument("--eos-token", help="end-of-text token of --tokenizer (default: detect it)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=defaults.vocab_size,
        help=f"vocabulary size of a trained tokenizer (default: {defaults.vocab_size})",
    )
    parser.add_argument(
        "--tokenizer-sample-bytes",
        type=parse_size,
        default=defaults.tokenizer_sample_bytes,
        help="text used to train the tokenizer, in bytes (default: "
        f"{defaults.tokenizer_sample_bytes})",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=defaults.seq_len,
        help=f"tokens per packed sample (default: {defaults.seq_len})",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=defaults.val_fraction,
        help="fraction of documents, chosen by a hash of their text, that go to the "
        f"validation split (default: {defaults.val_fraction})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="tokenization worker processes; 0 tokenizes in this process "
        f"(default: CPU count, {defaults.workers})",
    )
    parser.add_argument(
        "--max-docs-per-domain",
        type=int,
        help="stop reading a domain after this many documents (default: no limit)",
    )
    parser.add_argument(
        "--max-bytes-per-domain",
        type=parse_size,
        help="stop reading a domain after the document that reaches this many bytes of text "
        f"(default: {BUILTIN_MAX_BYTES_PER_DOMAIN} for the built-in corpus, no limit for "
        "--input)",
    )
    parser.add_argument(
        "--token-dtype",
        choices=["uint16", "uint32"],
        help="dtype of the stored ids (default: uint16 if the vocabulary fits, else uint32)",
    )
    parser.add_argument(
        "--shard-size-limit",
        type=parse_size,
        default=DEFAULT_SHARD_SIZE_LIMIT,
        help=f"uncompressed bytes per shard (default: {DEFAULT_SHARD_SIZE_LIMIT})",
    )
    parser.add_argument(
        "--text-field",
        default=defaults.text_field,
        help=f"JSON Lines field with the text (default: {defaults.text_field})",
    )
    parser.add_argument(
        "--domain-field",
        default=defaults.domain_field,
        help="JSON Lines field that, when present, overrides the record's domain "
        f"(default: {defaults.domain_field})",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args: argparse.Namespace) -> int:
    from olmoe.data.prepare import PrepareOptions, prepare

    options = PrepareOptions(
        output=args.output,
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        vocab_size=args.vocab_size,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        seq_len=args.seq_len,
        val_fraction=args.val_fraction,
        workers=args.workers,
        max_docs_per_domain=args.max_docs_per_domain,
        max_bytes_per_domain=args.max_bytes_per_domain,
        token_dtype=args.token_dtype,
        shard_size_limit=args.shard_size_limit,
        text_field=args.text_field,
        domain_field=args.domain_field,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    try:
        prepare(options)
    except DataError as err:
        logger.error("%s", err)
        return 2
    return 0
