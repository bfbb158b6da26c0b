"""`olmoe prepare`: tokenize raw text in worker processes and pack it into MDS shards.

Plan:

1. Gather document sources (the `--input` specs, or the built-in corpus) and check paths.
2. Load the tokenizer, or train a byte-level BPE on a hash-chosen sample of the documents.
3. Read documents again in a fixed order and assign each to train or val by a hash of its
   text. Worker processes tokenize batches of them, and their results are consumed in
   submission order, so the output does not depend on the number of workers.
4. Per split and domain, append EOS-terminated documents to a token stream and cut it into
   samples of `seq_len` tokens. A sample therefore never mixes domains. The last partial
   sample of each (split, domain) is dropped and counted.
5. Write shards, tokenizer and manifest into a temporary directory and rename it into place.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from olmoe.data import tokenizer as tokenization
from olmoe.data.corpus import default_sources
from olmoe.data.errors import DataError
from olmoe.data.manifest import (
    MANIFEST_NAME,
    SPLITS,
    TOKEN_DTYPES,
    TOKENIZER_NAME,
    DomainStats,
    Manifest,
    check_dtype_holds_vocab,
    token_dtype_for_vocab,
    write_manifest,
)
from olmoe.data.shards import DEFAULT_COMPRESSION, DEFAULT_SHARD_SIZE_LIMIT, ShardWriter
from olmoe.data.sources import Document, DocumentSource, ReadStats, sources_from_specs

logger = logging.getLogger(__name__)

BUILTIN_MAX_BYTES_PER_DOMAIN = 8_000_000
"""Default per-domain byte limit for the built-in corpus (about 25 MB of text in all)."""
MAX_SAMPLE_DOCUMENT_BYTES = 100_000
"""Longer documents contribute only their first bytes to the tokenizer-training sample."""
VAL_HASH_BUCKETS = 1_000_000
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class PrepareOptions:
    """Options of `olmoe prepare`, each described by `olmoe prepare --help`."""

    output: str
    inputs: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    eos_token: str | None = None
    vocab_size: int = 8192
    tokenizer_sample_bytes: int = 4_000_000
    seq_len: int = 2048
    val_fraction: float = 0.05
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_docs_per_domain: int | None = None
    max_bytes_per_domain: int | None = None
    token_dtype: str | None = None
    shard_size_limit: int = DEFAULT_SHARD_SIZE_LIMIT
    compression: str | None = DEFAULT_COMPRESSION
    text_field: str = "text"
    domain_field: str = "domain"
    overwrite: bool = False
    batch_bytes: int = 1 << 18
    progress: bool = True

    def validate(self) -> None:
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataError(f"{name}={value!r} is invalid: must be a positive integer")

        for name in ("seq_len", "vocab_size", "tokenizer_sample_bytes", "batch_bytes"):
            positive(name)
        for name in ("max_docs_per_domain", "max_bytes_per_domain"):
            positive(name, allow_none=True)
        positive("shard_size_limit")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction={self.val_fraction} is invalid: must be in [0, 1)")
        if self.workers < 0:
            raise DataError(f"workers={self.workers} is invalid: must be >= 0 (0: no processes)")
        if self.token_dtype is not None and self.token_dtype not in TOKEN_DTYPES:
            raise DataError(
                f"token_dtype={self.token_dtype!r} is invalid: use one of {list(TOKEN_DTYPES)}"
            )


@dataclass
class PrepareResult:
    """Output directory, manifest, counts and timings of one `prepare` run."""

    output: Path
    manifest: Manifest
    documents: int
    tokens: int
    seconds: float
    """Whole run, tokenizer training included."""
    tokenize_seconds: float
    """Reading, tokenizing, packing and writing, after the worker processes have started
    (the pass that `tokens_per_second` uses)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.tokenize_seconds, 1e-9)


def document_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def split_of(doc_hash: int, val_fraction: float) -> str:
    """Assign a document to 'val' or 'train' by its text hash, so duplicates stay together."""
    threshold = round(val_fraction * VAL_HASH_BUCKETS)
    return "val" if doc_hash % VAL_HASH_BUCKETS < threshold else "train"


def _utf8(document: Document, stats: ReadStats) -> tuple[Document, bytes]:
    try:
        return document, document.text.encode("utf-8")
    except UnicodeEncodeError:
        # JSON may escape lone surrogates ("\ud800"), which UTF-8 cannot encode.
        text, count = _LONE_SURROGATE.subn("\ufffd", document.text)
        stats.replaced_bytes[document.domain] += count
        return Document(document.domain, text, document.source), text.encode("utf-8")


def limited_documents(
    sources: Iterable[DocumentSource],
    stats: ReadStats,
    max_docs: int | None,
    max_bytes: int | None,
) -> Iterator[tuple[Document, bytes]]:
    """Yield (document, UTF-8 text) in source order, stopping each domain at its limits.

    A domain stops after the document that reaches `max_docs` documents or `max_bytes` bytes.
    """
    docs: Counter = Counter()
    nbytes: Counter = Counter()
    full: set[str] = set()
    for source in sources:
        if source.domain in full and source.single_domain:
            continue
        for document in source.documents(stats):
            if document.domain in full:
                if source.single_domain:
                    break
                continue
            document, data = _utf8(document, stats)
            yield document, data
            docs[document.domain] += 1
            nbytes[document.domain] += len(data)
            reached_docs = max_docs is not None and docs[document.domain] >= max_docs
            reached_bytes = max_bytes is not None and nbytes[document.domain] >= max_bytes
            if reached_docs or reached_bytes:
                full.add(document.domain)
                logger.info(
                    "domain %r reached its limit at %d documents, %d bytes",
                    document.domain,
                    docs[document.domain],
                    nbytes[document.domain],
                )


def tokenizer_training_sample(
    documents: Iterable[tuple[Document, bytes]], budget_bytes: int
) -> list[str]:
    """Keep the documents with the smallest text hashes, up to `budget_bytes` in all.

    Hash order makes the sample an unbiased, deterministic choice that needs one pass and
    bounded memory. Documents keep at most their first `MAX_SAMPLE_DOCUMENT_BYTES` bytes.
    """
    heap: list[tuple[int, bytes]] = []  # max-heap on hash: (-hash, data)
    total = 0
    for _, data in documents:
        data = data[:MAX_SAMPLE_DOCUMENT_BYTES]
        doc_hash = document_hash(data)
        if total >= budget_bytes and heap and doc_hash > -heap[0][0]:
            continue
        heapq.heappush(heap, (-doc_hash, data))
        total += len(data)
        while len(heap) > 1 and total - len(heap[0][1]) >= budget_bytes:
            total -= len(heapq.heappop(heap)[1])
    ordered = sorted(heap, reverse=True)  # ascending hash
    return [data.decode("utf-8", errors="ignore") for _, data in ordered]


class Packer:
    """Concatenate EOS-terminated documents per (split, domain) and cut samples of seq_len."""

    def __init__(self, seq_len: int, writers: dict[str, ShardWriter]):
        self.seq_len = seq_len
        self.writers = writers
        self._pending: dict[tuple[str, int], list[np.ndarray]] = {}
        self._pending_tokens: Counter = Counter()
        self.samples: Counter = Counter()
        self.dropped_tokens: Counter = Counter()

    def add(self, split: str, domain_id: int, ids: np.ndarray) -> None:
        key = (split, domain_id)
        self._pending.setdefault(key, []).append(ids)
        self._pending_tokens[key] += len(ids)
        if self._pending_tokens[key] < self.seq_len:
            return
        stream = np.concatenate(self._pending[key])
        num_samples = len(stream) // self.seq_len
        cut = num_samples * self.seq_len
        # shape: (num_samples, seq_len)
        self.writers[split].write(stream[:cut].reshape(num_samples, self.seq_len), domain_id)
        self.samples[key] += num_samples
        self._pending[key] = [stream[cut:]]
        self._pending_tokens[key] = len(stream) - cut

    def finish(self) -> None:
        for key, count in self._pending_tokens.items():
            self.dropped_tokens[key] += count
        self._pending.clear()
        self._pending_tokens.clear()


def _choose_tokenizer(
    options: PrepareOptions, sources: list[DocumentSource], max_bytes: int | None
) -> tokenization.TokenizerInfo:
    if options.tokenizer:
        info = tokenization.load_tokenizer(options.tokenizer, options.eos_token)
        logger.info(
            "loaded tokenizer %s: vocab %d, EOS id %d",
            options.tokenizer,
            info.vocab_size,
            info.eos_token_id,
        )
        return info
    start = time.perf_counter()
    quiet_stats = ReadStats(quiet=True)
    documents = limited_documents(sources, quiet_stats, options.max_docs_per_domain, max_bytes)
    sample = tokenizer_training_sample(documents, options.tokenizer_sample_bytes)
    if not sample:
        raise DataError("the inputs contain no documents; check the --input paths")
    info = tokenization.train_bpe_tokenizer(sample, options.vocab_size)
    logger.info(
        "trained a byte-level BPE tokenizer (vocab %d) on %d documents, %.1f MB, in %.1f s",
        info.vocab_size,
        len(sample),
        sum(len(text.encode()) for text in sample) / 1e6,
        time.perf_counter() - start,
    )
    return info


def _check_output(output: Path, overwrite: bool) -> None:
    """Raise DataError unless `output` is free: missing, an empty directory, or a prepared
    dataset with `overwrite`."""
    if not output.exists():
        return
    if output.is_dir() and not any(output.iterdir()):
        return
    if not overwrite:
        raise DataError(f"output {output} already exists; pass --overwrite to replace it")
    if not output.is_dir() or not (output / MANIFEST_NAME).is_file():
        raise DataError(
            f"output {output} exists and is not a prepared dataset (no {MANIFEST_NAME}); "
            "remove it yourself or choose another --output"
        )


def _prepare_output_dir(output: Path, overwrite: bool) -> Path:
    _check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _move_into_place(staging: Path, output: Path) -> None:
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def resolve_sources(options: PrepareOptions) -> tuple[list[DocumentSource], int | None]:
    """Return the sources and the per-domain byte limit that applies to them."""
    if options.inputs:
        sources = sources_from_specs(options.inputs, options.text_field, options.domain_field)
        return sources, options.max_bytes_per_domain
    sources = default_sources()
    if not sources:
        raise DataError("no --input given and the built-in corpus found no text on this machine")
    max_bytes = options.max_bytes_per_domain or BUILTIN_MAX_BYTES_PER_DOMAIN
    return sources, max_bytes


def prepare(options: PrepareOptions) -> PrepareResult:
    """Run `olmoe prepare`; see the module docstring for the steps."""
    start = time.perf_counter()
    options.validate()
    output = Path(options.output)
    _check_output(output, options.overwrite)
    sources, max_bytes = resolve_sources(options)
    info = _choose_tokenizer(options, sources, max_bytes)
    dtype = options.token_dtype or token_dtype_for_vocab(info.vocab_size)
    check_dtype_holds_vocab(dtype, info.vocab_size, "--token-dtype")

    staging = _prepare_output_dir(output, options.overwrite)
    try:
        run = _TokenizeRun(options, info, dtype, staging)
        tokenize_seconds = run.run(sources, max_bytes)
        (staging / TOKENIZER_NAME).write_text(info.tokenizer_json)
        manifest = run.build_manifest(info)
        write_manifest(manifest, staging)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest.path = str(output)

    result = PrepareResult(
        output=output,
        manifest=manifest,
        documents=run.total_documents,
        tokens=run.total_tokens,
        seconds=time.perf_counter() - start,
        tokenize_seconds=tokenize_seconds,
    )
    _log_summary(result, run.stats)
    return result


def _log_summary(result: PrepareResult, stats: ReadStats) -> None:
    manifest = result.manifest
    for domain, count in sorted(stats.replaced_bytes.items()):
        logger.warning("domain %r: replaced %d undecodable byte sequences", domain, count)
    for reason, count in sorted(stats.skipped.items()):
        logger.warning("skipped %d inputs: %s", count, reason)
    for split in SPLITS:
        for domain, domain_stats in manifest.splits[split].items():
            logger.info(
                "%s/%s: %d documents, %d tokens, %d samples, %d tokens dropped",
                split,
                domain,
                domain_stats.documents,
                domain_stats.tokens,
                domain_stats.samples,
                domain_stats.dropped_tokens,
            )
    logger.info(
        "prepared %d documents, %d tokens (%d train and %d val samples of %d tokens) into %s "
        "in %.1f s; tokenizing took %.1f s: %.0f tokens/s",
        result.documents,
        result.tokens,
        manifest.split_samples("train"),
        manifest.split_samples("val"),
        manifest.seq_len,
        result.output,
        result.seconds,
        result.tokenize_seconds,
        result.tokens_per_second,
    )


class _TokenizeRun:
    """Steps 3 and 4 of the plan: read, tokenize in workers, pack and write."""

    def __init__(
        self,
        options: PrepareOptions,
        info: tokenization.TokenizerInfo,
        dtype: str,
        staging: Path,
    ):
        self.options = options
        self.dtype = dtype
        self.stats = ReadStats()
        self.domain_ids: dict[str, int] = {}
        self.documents: Counter = Counter()  # (split, domain_id) -> documents
        self.tokens: Counter = Counter()  # (split, domain_id) -> tokens
        self.writers = {
            split: ShardWriter(
                staging / split,
                seq_len=options.seq_len,
                dtype=dtype,
                vocab_size=info.vocab_size,
                compression=options.compression,
                size_limit=options.shard_size_limit,
            )
            for split in SPLITS
        }
        self.packer = Packer(options.seq_len, self.writers)
        self.info = info
        self._progress = None

    @property
    def total_documents(self) -> int:
        return sum(self.documents.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def run(self, sources: list[DocumentSource], max_bytes: int | None) -> float:
        """Tokenize, pack and write everything; return the seconds after worker start-up."""
        from tqdm.auto import tqdm

        options = self.options
        executor = None
        encoder = None
        if options.workers > 0:
            executor = ProcessPoolExecutor(
                max_workers=options.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=tokenization.init_worker,
                initargs=(self.info.tokenizer_json, self.info.eos_token_id),
            )
            # Start every worker (imports and tokenizer) before the clock starts.
            list(executor.map(tokenization.worker_ready, range(options.workers)))
        else:
            encoder = tokenization.DocumentEncoder(self.info.tokenizer_json, self.info.eos_token_id)
        self._progress = tqdm(
            desc="tokenizing", unit="B", unit_scale=True, disable=not options.progress
        )
        start = time.perf_counter()
        try:
            self._tokenize_all(sources, max_bytes, executor, encoder)
            self.packer.finish()
            for writer in self.writers.values():
                writer.finish()
        except BaseException:
            for writer in self.writers.values():
                writer.cancel()
            raise
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)
            self._progress.close()
        seconds = time.perf_counter() - start
        if self.total_documents == 0:
            raise DataError("the inputs contain no documents; check the --input paths")
        train_samples = sum(v for (split, _), v in self.packer.samples.items() if split == "train")
        if train_samples == 0:
            raise DataError(
                f"the inputs give {self.total_tokens} tokens, too few for one training sample "
                f"of seq_len={options.seq_len}; add text or lower --seq-len"
            )
        return seconds

    def _tokenize_all(self, sources, max_bytes, executor, encoder) -> None:
        options = self.options
        # In-order consumption blocks on the oldest batch, so keep enough batches in flight
        # that the other workers stay busy behind a slow one.
        max_pending = 16 * max(options.workers, 1)
        pending: deque[tuple[Future, list[tuple[str, int]], int]] = deque()
        texts: list[str] = []
        ends_document: list[bool] = []
        meta: list[tuple[str, int]] = []
        batch_bytes = 0
        # A multi-megabyte document would keep one worker busy while the others wait at the
        # end, so long documents go out in pieces where the tokenizer allows it.
        splittable = self.info.splits_at_newlines

        def submit() -> None:
            nonlocal texts, ends_document, meta, batch_bytes
            if executor is None:
                self._consume(encoder.encode(texts, ends_document), meta, batch_bytes)
            else:
                future = executor.submit(tokenization.encode_in_worker, texts, ends_document)
                pending.append((future, meta, batch_bytes))
                while len(pending) > max_pending:
                    future, done_meta, done_bytes = pending.popleft()
                    self._consume(future.result(), done_meta, done_bytes)
            texts, ends_document, meta, batch_bytes = [], [], [], 0

        documents = limited_documents(sources, self.stats, options.max_docs_per_domain, max_bytes)
        for document, data in documents:
            split = split_of(document_hash(data), options.val_fraction)
            domain_id = self.domain_ids.setdefault(document.domain, len(self.domain_ids))
            self.documents[split, domain_id] += 1
            pieces = [document.text]
            if splittable and len(data) > options.batch_bytes:
                pieces = tokenization.split_at_newlines(document.text, options.batch_bytes)
            for index, piece in enumerate(pieces):
                texts.append(piece)
                ends_document.append(index == len(pieces) - 1)
                meta.append((split, domain_id))
                batch_bytes += len(piece)
                if batch_bytes >= options.batch_bytes:
                    submit()
        if texts:
            submit()
        while pending:
            future, done_meta, done_bytes = pending.popleft()
            self._consume(future.result(), done_meta, done_bytes)

    def _consume(
        self, encoded: tuple[np.ndarray, np.ndarray], meta: list[tuple[str, int]], nbytes: int
    ) -> None:
        ids, lengths = encoded
        ends = np.cumsum(lengths)
        for (split, domain_id), end, length in zip(meta, ends, lengths):
            self.packer.add(split, domain_id, ids[end - length : end])
            self.tokens[split, domain_id] += int(length)
        self._progress.update(nbytes)
        self._progress.set_postfix(tokens=self.total_tokens, refresh=False)

    def build_manifest(self, info: tokenization.TokenizerInfo) -> Manifest:
        domains = sorted(self.domain_ids, key=self.domain_ids.get)
        splits = {}
        for split in SPLITS:
            splits[split] = {}
            for domain, domain_id in self.domain_ids.items():
                key = (split, domain_id)
                splits[split][domain] = DomainStats(
                    documents=self.documents[key],
                    tokens=self.tokens[key],
                    samples=self.packer.samples[key],
                    dropped_tokens=self.packer.dropped_tokens[key],
                )
        for domain, domain_id in self.domain_ids.items():
            if self.packer.samples["train", domain_id] == 0:
                logger.warning(
                    "domain %r has no training sample: its %d tokens are fewer than seq_len=%d",
                    domain,
                    self.tokens["train", domain_id],
                    self.options.seq_len,
                )
        return Manifest(
            vocab_size=info.vocab_size,
            seq_len=self.options.seq_len,
            dtype=self.dtype,
            eos_token_id=info.eos_token_id,
            domains=domains,
            splits=splits,
            tokenizer=TOKENIZER_NAME,
            tokenizer_source=info.source,
            val_fraction=self.options.val_fraction,
            replaced_bytes=dict(sorted(self.stats.replaced_bytes.items())),
            skipped=dict(sorted(self.stats.skipped.items())),
        )
