"""Throughput of `olmoe prepare` and of the training dataloader, each against its reference.

1. Tokenizing: `prepare` (reading, tokenizing in worker processes, packing, writing zstd
   shards) against one bare `tokenizers` batch encode of the same documents, already in
   memory, with the same tokenizer, method (`encode_batch_fast` where available) and
   settings. The batch encode uses every core through its own thread pool, so it is the
   ceiling. Both count one EOS per document.
2. Loading: `build_dataloader` over the prepared shards (the demo config's data settings,
   batch size and sequence length) against the demo model's training step: forward,
   CE + weighted router losses, backward and an AdamW step, fp32 on the CPU.

Each repeat runs both sides of a comparison in turn, so that a change in machine load hits
both alike. The table reports the best repeat of each. The text is the built-in corpus with a
per-domain byte limit.

    python benchmarks/data.py                         # configs/demo.yaml, 2 MB per domain
    python benchmarks/data.py --workers 2 --record docs/benchmarks.md
    python benchmarks/data.py --train-tokens-per-s 20000   # skip timing the training step
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from olmoe.data.corpus import default_sources
from olmoe.data.prepare import PrepareOptions, limited_documents, prepare
from olmoe.data.sources import ReadStats
from olmoe.data.tokenizer import DocumentEncoder, train_bpe_tokenizer

# torch, streaming and the training code are imported inside the functions: `prepare`
# starts its workers with the spawn method, which re-imports this script in each of them.
SECTION_TITLE = "## Data"


def bare_encode_tokens_per_s(tokenizer_json: str, eos_id: int, texts: list[str]) -> float:
    """Tokens/s of one batch encode over all texts, with the method and settings that the
    tokenization workers use (`encode_batch_fast` where available)."""
    encoder = DocumentEncoder(tokenizer_json, eos_id)
    start = time.perf_counter()
    encodings = encoder.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(encoding.ids) for encoding in encodings) + len(texts)
    return tokens / seconds


def loader_tokens_per_s(data_cfg, batch_size: int, batches: int) -> float:
    """Tokens/s of the train dataloader, timed after the first 5 batches (worker start-up)."""
    from olmoe.data import build_dataloader

    loader = build_dataloader(data_cfg, batch_size)
    tokens = 0
    start = None
    for index, batch in enumerate(loader):
        if index == 5:
            start = time.perf_counter()
        elif index > 5:
            tokens += batch["input_ids"].numel()
        if index == 5 + batches:
            break
    seconds = time.perf_counter() - start
    del loader
    return tokens / seconds


def train_step_tokens_per_s(config, steps: int) -> float:
    """Tokens/s of the demo model's training step on random ids (fp32, this process)."""
    import torch

    from olmoe.model import OlmoeModel

    torch.manual_seed(0)
    model = OlmoeModel(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr)
    batch, seq_len = config.global_batch_size, config.data.seq_len
    input_ids = torch.randint(0, config.model.vocab_size, (batch, seq_len))
    moe = config.model.moe

    def step() -> None:
        out = model(input_ids[:, :-1])
        # shape: (B * (S - 1), V) logits against the next tokens
        ce = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), input_ids[:, 1:].reshape(-1)
        )
        loss = ce + moe.lb_loss_weight * out.lb_loss + moe.z_loss_weight * out.z_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * seq_len / (time.perf_counter() - start)


def format_section(rows: list[tuple[str, str]], notes: list[str]) -> str:
    lines = [SECTION_TITLE, "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines + [""] + notes) + "\n"


def record_section(path: Path, section: str) -> None:
    """Replace the `## Data` section of `path` (or append it), keeping the other sections."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(section.rstrip("\n") + "\n\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="training config")
    parser.add_argument("--max-bytes-per-domain", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument(
        "--train-tokens-per-s",
        type=float,
        help="training-step consumption to compare against (default: time the demo model)",
    )
    parser.add_argument("--record", type=Path, help="write the results into this markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from olmoe.train.config import load_config

    config = load_config(args.config, [])
    seq_len, batch_size = config.data.seq_len, config.global_batch_size

    # 1. the documents and one tokenizer for every run
    documents = limited_documents(default_sources(), ReadStats(), None, args.max_bytes_per_domain)
    texts = [document.text for document, _ in documents]
    text_bytes = sum(len(text.encode()) for text in texts)
    info = train_bpe_tokenizer(texts[::10], config.model.vocab_size)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.json"
        tokenizer_path.write_text(info.tokenizer_json)

        # 2. prepare against the bare batch encode, interleaved
        bare_runs, prepare_runs = [], []
        for repeat in range(args.repeats):
            bare_runs.append(
                bare_encode_tokens_per_s(info.tokenizer_json, info.eos_token_id, texts)
            )
            options = PrepareOptions(
                output=str(Path(tmp) / "shards"),
                tokenizer=str(tokenizer_path),
                seq_len=seq_len,
                max_bytes_per_domain=args.max_bytes_per_domain,
                workers=args.workers,
                overwrite=True,
                progress=False,
            )
            result = prepare(options)
            prepare_runs.append(result.tokens_per_second)
            print(
                f"repeat {repeat}: bare {bare_runs[-1]:,.0f} tok/s, prepare "
                f"{prepare_runs[-1]:,.0f} tok/s ({result.tokens:,} tokens)"
            )

        # 3. loader against the training step
        from olmoe.data import DataConfig

        data_cfg = DataConfig(
            local=str(Path(tmp) / "shards"),
            seq_len=seq_len,
            num_workers=config.data.num_workers,
            num_canonical_nodes=config.data.num_canonical_nodes,
        )
        loader_runs = [
            loader_tokens_per_s(data_cfg, batch_size, args.loader_batches)
            for _ in range(args.repeats)
        ]
    if args.train_tokens_per_s is not None:
        train_rate, train_source = args.train_tokens_per_s, "given with --train-tokens-per-s"
    else:
        train_rate = train_step_tokens_per_s(config, args.train_steps)
        train_source = f"timed: demo model, batch {batch_size} x {seq_len}, fp32"

    bare, prepared, loader = max(bare_runs), max(prepare_runs), max(loader_runs)
    per_repeat = list(zip(prepare_runs, bare_runs))
    import torch

    load = os.getloadavg()[0]
    rows = [
        ("text (built-in corpus)", f"{text_bytes / 1e6:.1f} MB, {len(texts)} documents"),
        ("bare batch encode (ceiling)", f"{bare:,.0f} tokens/s"),
        (f"`olmoe prepare`, {args.workers} workers", f"{prepared:,.0f} tokens/s"),
        ("prepare / ceiling (target >= 0.8)", f"{prepared / bare:.2f}"),
        (
            "prepare / ceiling, each repeat (median)",
            ", ".join(f"{p / b:.2f}" for p, b in per_repeat)
            + f" ({statistics.median(p / b for p, b in per_repeat):.2f})",
        ),
        (f"dataloader, {config.data.num_workers} worker(s)", f"{loader:,.0f} tokens/s"),
        (f"training step ({train_source})", f"{train_rate:,.0f} tokens/s"),
        ("loader / training step (target >= 10)", f"{loader / train_rate:.1f}"),
    ]
    notes = [
        f"Measured with `python benchmarks/data.py` ({args.config}, "
        f"{args.max_bytes_per_domain:,} bytes per domain, best of {args.repeats}) on "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, 1-minute load average "
        f"{load:.1f} at the end. The dataloader was timed alone; in training its workers share "
        "the cores with the training step.",
    ]
    section = format_section(rows, notes)
    print(section)
    if args.record:
        record_section(args.record, section)


if __name__ == "__main__":
    main()
