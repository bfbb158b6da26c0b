"""`olmoe demo`: the main job, end to end on the built-in corpus, on the CPU.

Steps, each one a command a user can also run on its own:
    1. olmoe prepare --output data/demo ...                 (skipped if already complete)
    2. olmoe train configs/demo.yaml                         (resumes from its checkpoints)
    3. olmoe export runs/demo runs/demo/hf --tokenizer ...   (HuggingFace OlmoeForCausalLM)
    4. greedy generation with transformers, one prompt per domain
    5. olmoe analyze <checkpoints> --data data/demo --out runs/demo/analysis
    6. a summary of where everything is

Interrupting it (Ctrl-C, a killed process) and running it again resumes training from
the last checkpoint. The other steps are redone, or skipped when already complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_PROMPTS = {
    "code": "def main(argv):\n    ",
    "docs": "The Python tutorial",
    "man": "NAME\n       ls - ",
    "license": "Permission is hereby granted",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", help="training config")
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="shard directory")
    parser.add_argument(
        "--max-bytes-per-domain",
        type=int,
        default=3_000_000,
        help="bytes of text read per domain of the built-in corpus",
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size")
    parser.add_argument(
        "--analysis-tokens",
        type=int,
        default=16_000,
        help="validation tokens per domain routed through each checkpoint for the analysis",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the training config")


def prepare_step(data: Path, seq_len: int, vocab_size: int, max_bytes: int) -> None:
    from olmoe.data.prepare import PrepareOptions, prepare

    if (data / "manifest.json").is_file():
        log.info("step 1/5: shards already prepared in %s, skipping", data)
        return
    log.info("step 1/5: preparing the built-in corpus into %s", data)
    prepare(
        PrepareOptions(
            output=str(data),
            vocab_size=vocab_size,
            seq_len=seq_len,
            max_bytes_per_domain=max_bytes,
            val_fraction=0.05,
        )
    )


def read_eval_history(run_dir: Path) -> list[dict]:
    path = run_dir / "eval_history.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def generate_step(hf_dir: Path, domains: list[str], max_new_tokens: int = 32) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    outputs = {}
    for domain in domains:
        prompt = DEMO_PROMPTS.get(domain, "The ")
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id or 0,
            )
        outputs[domain] = tokenizer.decode(generated[0], skip_special_tokens=True)
    return outputs


def run(args: argparse.Namespace) -> int:
    from olmoe.train.config import load_config

    started = time.perf_counter()
    overrides = [f"data.local={args.data}", *args.overrides]
    config = load_config(args.config, overrides)
    run_dir = Path(config.run_dir)

    # 1. shards
    prepare_step(args.data, config.data.seq_len, args.vocab_size, args.max_bytes_per_domain)

    # 2. training (Composer's autoresume continues an interrupted run)
    log.info("step 2/5: training %s into %s", args.config, run_dir)
    from olmoe.train.trainer import train

    trainer = train(config)
    trainer.close()

    # 3. HuggingFace export
    from olmoe.convert import to_hf
    from olmoe.convert.cli import save_hf
    from olmoe.train.checkpoint import load_model_from_checkpoint

    hf_dir = run_dir / "hf"
    log.info("step 3/5: exporting the final checkpoint to %s", hf_dir)
    model, _ = load_model_from_checkpoint(run_dir)
    save_hf(to_hf(model), hf_dir, overwrite=True, tokenizer=args.data / "tokenizer.json")

    # 4. generation
    from olmoe.data import read_manifest

    manifest = read_manifest(args.data)
    log.info("step 4/5: greedy generation with transformers from %s", hf_dir)
    samples = generate_step(hf_dir, manifest.domains)

    # 5. routing analysis over every saved checkpoint
    from olmoe.analysis.cli import analyze

    analysis_dir = run_dir / "analysis"
    checkpoints = sorted((run_dir / "checkpoints").glob("ep*-ba*-rank0.pt"))
    log.info("step 5/5: analyzing routing of %d checkpoints", len(checkpoints))
    report = analyze(
        checkpoints,
        args.data,
        analysis_dir,
        tokens_per_domain=args.analysis_tokens,
        overwrite=True,
    )

    # 6. summary
    history = read_eval_history(run_dir)
    print()
    print("=" * 72)
    print("olmoe demo finished in %.1f min" % ((time.perf_counter() - started) / 60))
    if history:
        first, last = history[0], history[-1]
        print(f"validation loss, step {first['step']} -> step {last['step']}:")
        for key in first["metrics"]:
            name = "all" if key == "CrossEntropy" else key.split("/", 1)[1]
            start, end = first["metrics"][key], last["metrics"].get(key, math.nan)
            print(f"  {name:<10} {start:7.3f} -> {end:7.3f}")
    print("greedy continuations (exported HF model):")
    for domain, text in samples.items():
        print(f"  [{domain}] {text!r}")
    print(report)
    print("outputs:")
    print(f"  shards           {args.data}")
    print(f"  run directory    {run_dir}  (config.yaml, checkpoints/, metrics.log)")
    print(f"  HF export        {hf_dir}")
    print(f"  routing analysis {analysis_dir}  (PNG figures, report.txt, exports)")
    print("=" * 72)
    return 0
