"""Tokenizers for `olmoe prepare`: load a HuggingFace tokenizer or train a byte-level BPE.

Only `numpy` and `tokenizers` are imported at module level, because tokenization worker
processes import this module and should start fast.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from olmoe.data.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens of common tokenizer families, tried in order when none is named.
KNOWN_EOS_TOKENS = (DEFAULT_EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
MIN_TRAINED_VOCAB = 257  # 256 byte tokens and the EOS token


@dataclass
class TokenizerInfo:
    """A tokenizer as JSON (so it can be sent to worker processes) and its key ids."""

    tokenizer_json: str
    vocab_size: int
    """One more than the largest id the tokenizer can produce, added tokens included."""
    eos_token_id: int
    source: str
    """'trained' or the path it was loaded from."""

    def build(self) -> Tokenizer:
        return Tokenizer.from_str(self.tokenizer_json)

    @property
    def splits_at_newlines(self) -> bool:
        """Whether a document may be encoded in pieces cut by `split_at_newlines`.

        True for a GPT-2 style byte-level pre-tokenizer (regex on, no prefix space) without a
        normalizer. Its regex makes a newline between two non-space characters a pre-token of
        its own, at the end of a piece as inside the document, so the pieces' ids concatenate
        to the whole document's ids (the tests compare them).
        """
        config = json.loads(self.tokenizer_json)
        pre_tokenizer = config.get("pre_tokenizer") or {}
        return (
            config.get("normalizer") is None
            and pre_tokenizer.get("type") == "ByteLevel"
            and pre_tokenizer.get("use_regex", True)
            and not pre_tokenizer.get("add_prefix_space", False)
        )


def _vocab_size(tokenizer: Tokenizer) -> int:
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def _find_eos(tokenizer: Tokenizer, eos_token: str | None, where: str) -> int:
    candidates = (eos_token,) if eos_token else KNOWN_EOS_TOKENS
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    if eos_token:
        raise DataError(f"tokenizer {where} has no token {eos_token!r}; check --eos-token")
    raise DataError(
        f"tokenizer {where} has none of the end-of-text tokens {list(KNOWN_EOS_TOKENS)}; "
        "name its EOS token with --eos-token"
    )


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None) -> TokenizerInfo:
    """Load a `tokenizer.json` file or a directory that `transformers.AutoTokenizer` loads.

    The EOS token is `eos_token` if given, else the directory's configured EOS token, else the
    first of `KNOWN_EOS_TOKENS` in the vocabulary.
    """
    path = Path(path)
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise DataError(f"cannot load tokenizer file {path}: {err}") from err
    elif path.is_dir():
        tokenizer, configured_eos = _load_transformers_tokenizer(path)
        eos_token = eos_token or configured_eos
    else:
        raise DataError(f"tokenizer not found: {path}")
    eos_token_id = _find_eos(tokenizer, eos_token, str(path))
    return TokenizerInfo(tokenizer.to_str(), _vocab_size(tokenizer), eos_token_id, str(path))


def _load_transformers_tokenizer(path: Path) -> tuple[Tokenizer, str | None]:
    from transformers import AutoTokenizer

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"transformers cannot load a tokenizer from {path}: {err}") from err
    if not getattr(hf_tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer in {path} is a slow (Python) tokenizer; convert it to a fast one "
            "(a tokenizer.json) with transformers and pass that"
        )
    return hf_tokenizer.backend_tokenizer, hf_tokenizer.eos_token


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> TokenizerInfo:
    """Train a byte-level BPE (GPT-2 style, no prefix space) with EOS `<|endoftext|>` = id 0.

    Training is deterministic for the same texts in the same order (checked in the tests with
    tokenizers 0.22).
    """
    if vocab_size < MIN_TRAINED_VOCAB:
        raise DataError(
            f"vocab_size={vocab_size} is invalid: a byte-level BPE needs at least "
            f"{MIN_TRAINED_VOCAB} tokens (256 bytes and EOS)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    eos_token_id = tokenizer.token_to_id(DEFAULT_EOS_TOKEN)
    return TokenizerInfo(tokenizer.to_str(), _vocab_size(tokenizer), eos_token_id, "trained")


_PIECE_BOUNDARY = re.compile(r"(?<=\S)\n(?=\S)")


def split_at_newlines(text: str, piece_chars: int) -> list[str]:
    """Cut `text` after single newlines between non-space characters, into pieces of at least
    `piece_chars` characters (except the last). Text without such newlines stays whole."""
    pieces = []
    start = 0
    for match in _PIECE_BOUNDARY.finditer(text):
        if match.end() - start >= piece_chars:
            pieces.append(text[start : match.end()])
            start = match.end()
    pieces.append(text[start:])
    return pieces


class DocumentEncoder:
    """Encode documents to one flat id array, each document followed by EOS.

    Special-token strings inside the text (say a literal "<|endoftext|>") are encoded as plain
    text, so that only the appended EOS marks document ends.
    """

    def __init__(self, tokenizer_json: str, eos_token_id: int):
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True
        self.eos_token_id = eos_token_id
        # `encode_batch_fast` (tokenizers >= 0.21) skips character offsets, which are unused
        # here, and gives the same ids about 20% faster.
        self.encode_batch = getattr(self.tokenizer, "encode_batch_fast", None)
        if self.encode_batch is None:
            self.encode_batch = self.tokenizer.encode_batch

    def encode(
        self, texts: list[str], ends_document: list[bool] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids, lengths): (N,) uint32 ids of all texts and (D,) int64 lengths.

        A text is followed by EOS unless `ends_document` marks it as a leading piece of a
        longer document (see `split_at_newlines`).
        """
        if ends_document is None:
            ends_document = [True] * len(texts)
        # `Encoding.ids` builds a new Python list on every access, so read it once.
        flat: list[int] = []
        lengths = np.empty(len(texts), np.int64)
        for index, (encoding, eos) in enumerate(
            zip(self.encode_batch(texts, add_special_tokens=False), ends_document)
        ):
            ids = encoding.ids
            flat.extend(ids)
            if eos:
                flat.append(self.eos_token_id)
            lengths[index] = len(ids) + eos
        return np.array(flat, np.uint32), lengths


_worker_encoder: DocumentEncoder | None = None


def init_worker(tokenizer_json: str, eos_token_id: int) -> None:
    """Set up a tokenization worker process: one tokenizer thread per process."""
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = DocumentEncoder(tokenizer_json, eos_token_id)


def worker_ready(_: int) -> int:
    """Return this worker's process id once `init_worker` has run (a start-up barrier)."""
    time.sleep(0.05)  # long enough for each start-up task to land on a different worker
    return os.getpid()


def encode_in_worker(texts: list[str], ends_document: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_encoder is not None, "init_worker was not called in this process"
    return _worker_encoder.encode(texts, ends_document)
