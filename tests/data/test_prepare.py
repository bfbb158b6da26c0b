"""`olmoe prepare`: round trips through the shards, splits, determinism and bad input."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer, models, pre_tokenizers

from olmoe.cli import main as cli_main
from olmoe.data import DataConfig, DataError, build_dataset, read_manifest
from olmoe.data.prepare import PrepareOptions, prepare
from olmoe.data.tokenizer import split_at_newlines

EOS = "<|endoftext|>"
SEQ_LEN = 32

CODE_FILES = {
    "a.py": "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "b.py": "class Greeter:\n    def hello(self, name):\n        return f'hello {name}'\n",
    "c.py": "import os\n\nfor root, dirs, files in os.walk('.'):\n    print(root, len(files))\n",
}
WEB_RECORDS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 3},
    {"text": "A forum post about compilers and interpreters.", "domain": "forum"},
    {"text": "Café menu: crème brûlée, 中文 text, and emoji 🎉 at the end."},
    {"text": "Special strings like <|endoftext|> inside a document are plain text."},
]
ZST_RECORDS = [{"text": f"compressed record {i}: " + "lorem ipsum dolor " * 4} for i in range(5)]


def _write_corpus(root: Path) -> list[str]:
    """Write a small corpus of plain text and JSON Lines; return the --input specs."""
    (root / "code").mkdir(parents=True)
    for name, text in CODE_FILES.items():
        (root / "code" / name).write_text(text)
    (root / "notes.md").write_text("# Notes\n\nMarkdown documents are plain text too.\n")
    (root / "web.jsonl").write_text("\n".join(json.dumps(r) for r in WEB_RECORDS) + "\n")
    gz_lines = [json.dumps({"text": f"gzip record {i} " + "sit amet " * 5}) for i in range(4)]
    (root / "web.jsonl.gz").write_bytes(gzip.compress("\n".join(gz_lines).encode()))
    zst_lines = "\n".join(json.dumps(r) for r in ZST_RECORDS).encode()
    (root / "web.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst_lines))
    return [
        f"code={root / 'code'}",
        f"docs={root / 'notes.md'}",
        f"web={root / 'web.jsonl'}",
        f"web={root / 'web.jsonl.gz'}",
        f"web={root / 'web.jsonl.zst'}",
    ]


def _expected_documents(root: Path) -> dict[str, list[str]]:
    """Return each domain's documents in input order, read without the code under test."""
    expected = defaultdict(list)
    for name in sorted(CODE_FILES):
        expected["code"].append(CODE_FILES[name])
    expected["docs"].append((root / "notes.md").read_text())
    for record in WEB_RECORDS:
        expected[record.get("domain", "web")].append(record["text"])
    for line in gzip.decompress((root / "web.jsonl.gz").read_bytes()).decode().splitlines():
        expected["web"].append(json.loads(line)["text"])
    for record in ZST_RECORDS:
        expected["web"].append(record["text"])
    return expected


def _options(inputs, output, **overrides) -> PrepareOptions:
    values = dict(
        inputs=inputs,
        output=str(output),
        vocab_size=400,
        seq_len=SEQ_LEN,
        val_fraction=0.0,
        workers=0,
        progress=False,
    )
    values.update(overrides)
    return PrepareOptions(**values)


def _decoded_streams(output: Path, split: str = "train") -> dict[str, list[int]]:
    """Read every sample in shard order; return each domain's concatenated ids."""
    manifest = read_manifest(output)
    config = DataConfig(local=str(output), seq_len=manifest.seq_len, num_workers=0)
    dataset = build_dataset(config, batch_size=1, split=split, shuffle=False)
    streams = defaultdict(list)
    for index in range(dataset.num_samples):
        sample = dataset[index]
        streams[dataset.domain_names[int(sample["domain_id"])]].extend(sample["input_ids"].tolist())
    return streams


def test_round_trip_gives_back_documents(tmp_path):
    inputs = _write_corpus(tmp_path / "corpus")
    output = tmp_path / "out"
    result = prepare(_options(inputs, output))
    manifest = result.manifest
    expected = _expected_documents(tmp_path / "corpus")
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    eos_id = tokenizer.token_to_id(EOS)

    assert manifest.domains == ["code", "docs", "web", "forum"]
    assert manifest.eos_token_id == eos_id
    assert manifest.dtype == "uint16"
    assert manifest.tokenizer_source == "trained"
    streams = _decoded_streams(output)
    for domain, documents in expected.items():
        stats = manifest.splits["train"][domain]
        ids = streams.get(domain, [])
        assert stats.documents == len(documents)
        assert len(ids) == stats.samples * SEQ_LEN
        assert stats.samples * SEQ_LEN + stats.dropped_tokens == stats.tokens
        assert stats.dropped_tokens < SEQ_LEN
        # Every document ends with EOS, so the domain's stream is the EOS-joined documents,
        # cut after the last full sample.
        joined = "".join(document + EOS for document in documents)
        decoded = tokenizer.decode(ids, skip_special_tokens=False).rstrip("\ufffd")
        assert joined.startswith(decoded)
        # EOS ids mark exactly the ends of the documents kept whole, never the literal string
        # "<|endoftext|>" inside a document.
        ends = np.cumsum([len(document + EOS) for document in documents])
        assert ids.count(eos_id) == int((ends <= len(decoded)).sum())
    assert any(EOS in document for document in expected["web"])
    assert len(streams["web"]) > 3 * SEQ_LEN
    assert result.documents == sum(len(docs) for docs in expected.values())
    assert result.tokens == manifest.split_tokens("train")


def test_output_is_deterministic_across_processes(tmp_path):
    inputs = _write_corpus(tmp_path / "corpus")
    prepare(_options(inputs, tmp_path / "in_process", val_fraction=0.3, workers=0))

    command = [sys.executable, "-m", "olmoe.cli", "prepare", "--output", str(tmp_path / "cli")]
    for spec in inputs:
        command += ["--input", spec]
    command += ["--vocab-size", "400", "--seq-len", str(SEQ_LEN), "--val-fraction", "0.3"]
    command += ["--workers", "2", "--no-progress"]
    env = dict(os.environ, PYTHONHASHSEED="123")
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "prepared 17 documents" in completed.stderr

    compared = filecmp.dircmp(tmp_path / "in_process", tmp_path / "cli")
    files = ["manifest.json", "tokenizer.json"]
    files += [
        f"{split}/{p.name}"
        for split in ("train", "val")
        for p in (tmp_path / "cli" / split).iterdir()
    ]
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "in_process", tmp_path / "cli", files, shallow=False
    )
    assert mismatch == []
    assert errors == []
    assert compared.left_only == []
    assert compared.right_only == []


def test_split_keeps_each_document_on_one_side(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [{"text": f"marker{i:03d} " + "filler words here " * 3} for i in range(40)]
    records.insert(6, dict(records[5]))  # an exact duplicate goes where its twin goes
    (corpus / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    output = tmp_path / "out"
    manifest = prepare(
        _options([f"web={corpus / 'docs.jsonl'}"], output, val_fraction=0.5)
    ).manifest

    train_docs = manifest.splits["train"]["web"].documents
    val_docs = manifest.splits["val"]["web"].documents
    assert train_docs + val_docs == 41
    assert train_docs > 5
    assert val_docs > 5
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    texts = {}
    for split in ("train", "val"):
        texts[split] = tokenizer.decode(_decoded_streams(output, split)["web"])
    found = 0
    for i in range(40):
        marker = f"marker{i:03d}"
        in_train = marker in texts["train"]
        in_val = marker in texts["val"]
        if in_train:
            assert not in_val, marker
        found += in_train or in_val
    assert found >= 36  # markers of documents cut off after the last full sample are lost
    twin = "marker005"
    side, other = ("train", "val") if twin in texts["train"] else ("val", "train")
    assert texts[side].count(twin) == 2
    assert texts[other].count(twin) == 0


def test_transformers_tokenizer_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    inputs = _write_corpus(tmp_path / "corpus")
    trained = prepare(_options(inputs, tmp_path / "first"))
    hf_dir = tmp_path / "hf_tokenizer"
    tokenizer = Tokenizer.from_file(str(tmp_path / "first" / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS).save_pretrained(hf_dir)

    loaded = prepare(_options(inputs, tmp_path / "second", tokenizer=str(hf_dir))).manifest
    assert loaded.tokenizer_source == str(hf_dir)
    assert loaded.eos_token_id == trained.manifest.eos_token_id
    assert loaded.splits == trained.manifest.splits


def _wordlevel_tokenizer(path: Path, size: int, eos: str | None = EOS) -> Path:
    vocab = {"<unk>": 0}
    if eos:
        vocab[eos] = 1
    vocab.update({f"w{i}": len(vocab) + i for i in range(size - len(vocab))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_large_vocab_uses_uint32_and_keeps_ids(tmp_path):
    tokenizer = _wordlevel_tokenizer(tmp_path / "big.json", 70000)
    words = ["w0", "w65533", "w65534", "w69997", "w5"]
    (tmp_path / "doc.txt").write_text(" ".join(words * 4))
    options = _options([f"text={tmp_path / 'doc.txt'}"], tmp_path / "out", seq_len=7)
    options.tokenizer = str(tokenizer)
    manifest = prepare(options).manifest
    assert manifest.dtype == "uint32"
    assert manifest.vocab_size == 70000
    expected = [int(w[1:]) + 2 for w in words] * 4 + [1]  # words follow <unk> and EOS
    ids = _decoded_streams(tmp_path / "out")["text"]
    assert ids == expected[: len(ids)]
    assert max(ids) == 69999

    options.output = str(tmp_path / "out16")
    options.token_dtype = "uint16"
    with pytest.raises(DataError, match="uint16 holds ids up to 65535.*70000 tokens"):
        prepare(options)
    assert not (tmp_path / "out16").exists()


def test_tokenizer_without_eos(tmp_path):
    tokenizer = _wordlevel_tokenizer(tmp_path / "no_eos.json", 100, eos=None)
    (tmp_path / "doc.txt").write_text("w3 w4 w5 " * 20)
    options = _options([f"t={tmp_path / 'doc.txt'}"], tmp_path / "out", seq_len=8)
    options.tokenizer = str(tokenizer)
    with pytest.raises(DataError, match="none of the end-of-text tokens"):
        prepare(options)
    options.eos_token = "w98"  # ids: <unk> = 0, w0 = 1, ..., w98 = 99
    assert prepare(options).manifest.eos_token_id == 99


def test_missing_tokenizer(tmp_path):
    (tmp_path / "doc.txt").write_text("text " * 50)
    options = _options([f"t={tmp_path / 'doc.txt'}"], tmp_path / "out")
    options.tokenizer = str(tmp_path / "absent.json")
    with pytest.raises(DataError, match="tokenizer not found"):
        prepare(options)


def test_existing_output_and_overwrite(tmp_path):
    inputs = _write_corpus(tmp_path / "corpus")
    output = tmp_path / "out"
    output.mkdir()  # an empty directory is free to use
    prepare(_options(inputs, output))
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        prepare(_options(inputs, output))
    result = prepare(_options(inputs, output, seq_len=16, overwrite=True))
    assert read_manifest(output).seq_len == 16
    assert result.manifest.seq_len == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]

    not_a_dataset = tmp_path / "home"
    not_a_dataset.mkdir()
    (not_a_dataset / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare(_options(inputs, not_a_dataset, overwrite=True))
    assert (not_a_dataset / "precious.txt").read_text() == "keep me"


def test_failures_leave_no_output(tmp_path):
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no documents"):
        prepare(_options([f"t={blank}"], tmp_path / "out_blank"))

    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(DataError, match="too few for one training sample of seq_len=4096"):
        prepare(_options([f"t={short}"], tmp_path / "out_short", seq_len=4096))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank", "short.txt"]


def test_repairs_are_counted_in_manifest(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "latin1.txt").write_bytes(b"caf\xe9 ok \xff\xfe end " * 20)
    (corpus / "blob.bin").write_bytes(b"\x00binary")
    (corpus / "records.jsonl").write_text(
        '{"text": "lone \\ud800 surrogate ' + "padding " * 30 + '"}\nnot json\n'
    )
    manifest = prepare(_options([f"mixed={corpus}"], tmp_path / "out", seq_len=16)).manifest
    assert manifest.replaced_bytes == {"mixed": 61}
    assert manifest.skipped == {"binary file": 1, "invalid JSON": 1}
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    text = tokenizer.decode(_decoded_streams(tmp_path / "out")["mixed"])
    assert "caf\ufffd ok \ufffd\ufffd end" in text
    assert "lone \ufffd surrogate" in text


def test_builtin_corpus_with_small_limits(tmp_path):
    options = PrepareOptions(
        output=str(tmp_path / "builtin"),
        vocab_size=512,
        tokenizer_sample_bytes=300_000,
        seq_len=64,
        max_bytes_per_domain=150_000,
        workers=2,
        progress=False,
    )
    result = prepare(options)
    manifest = result.manifest
    assert manifest.domains[:2] == ["code", "docs"]
    for domain in manifest.domains:
        stats = manifest.splits["train"][domain]
        assert stats.samples > 0
        # A domain stops after the document that reaches the limit.
        assert stats.documents >= 1
    # each domain reads at least 150 kB, at well under 8 bytes of text per token
    assert result.tokens > len(manifest.domains) * 150_000 / 8


def test_cli_reports_bad_input(tmp_path, caplog):
    output = str(tmp_path / "out")
    code = cli_main(["prepare", "--input", f"t={tmp_path / 'missing'}", "--output", output])
    assert code == 2
    assert "path not found" in caplog.text
    with pytest.raises(SystemExit):
        cli_main(["prepare", "--max-bytes-per-domain", "lots"])


def test_packed_ids_match_tokenizer(tmp_path):
    text = "Tokenize me exactly as the tokenizer library does. " * 10
    (tmp_path / "doc.txt").write_text(text)
    output = tmp_path / "out"
    prepare(_options([f"t={tmp_path / 'doc.txt'}"], output, seq_len=16))
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    expected = tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.token_to_id(EOS)]
    ids = _decoded_streams(output)["t"]
    assert len(ids) == len(expected) // 16 * 16
    assert np.array_equal(ids, expected[: len(ids)])


def test_long_document_pieces_match_whole(tmp_path):
    # Lines of words, blank lines and indentation: documents longer than batch_bytes are
    # encoded in pieces cut at newlines, which must give the whole document's ids.
    lines = []
    for i in range(300):
        lines.append(f"Line {i}: words, numbers {i * 7} and punctuation!")
        if i % 7 == 0:
            lines.append("")
        if i % 11 == 0:
            lines.append(f"    indented {i}\t tab")
    text = "\n".join(lines) + "\n"
    (tmp_path / "long.txt").write_text(text)
    output = tmp_path / "out"
    options = _options([f"t={tmp_path / 'long.txt'}"], output, seq_len=16, batch_bytes=500)
    prepare(options)
    tokenizer = Tokenizer.from_file(str(output / "tokenizer.json"))
    assert len(split_at_newlines(text, 500)) > 10  # the document really goes out in pieces
    expected = tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.token_to_id(EOS)]
    ids = _decoded_streams(output)["t"]
    assert len(ids) == len(expected) // 16 * 16
    assert ids == expected[: len(ids)]
