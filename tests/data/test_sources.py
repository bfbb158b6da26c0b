"""Reading raw text: input specs, file formats, decoding repairs, limits and the built-in corpus."""

from __future__ import annotations

import gzip
import json
import logging

import pytest
import zstandard

from olmoe.data import DataError
from olmoe.data import corpus as corpus_module
from olmoe.data.corpus import default_sources, roff_to_text
from olmoe.data.prepare import limited_documents, tokenizer_training_sample
from olmoe.data.sources import (
    ReadStats,
    expand_input_path,
    file_source,
    parse_input_spec,
    sources_from_specs,
)


def _read(source) -> tuple[list, ReadStats]:
    stats = ReadStats()
    return list(source.documents(stats)), stats


def test_parse_input_spec():
    assert parse_input_spec("code=src/") == ("code", "src/")
    assert parse_input_spec("web=a=b.jsonl") == ("web", "a=b.jsonl")
    for bad in ("src/", "=src", "code=", "bad domain=x"):
        with pytest.raises(DataError, match="invalid"):
            parse_input_spec(bad)


def test_expand_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match=r"input '.*nope' \(domain 'code'\): path not found"):
        expand_input_path(str(tmp_path / "nope"), "code")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no files"):
        expand_input_path(str(tmp_path / "empty"), "code")
    with pytest.raises(DataError, match="the glob matches no files"):
        expand_input_path(str(tmp_path / "*.txt"), "code")


def test_expand_directory_and_glob(tmp_path):
    (tmp_path / "pkg" / ".hidden").mkdir(parents=True)
    for name in ("pkg/b.py", "pkg/a.py", "pkg/.secret", "pkg/.hidden/c.py", "top.md"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in expand_input_path(str(tmp_path / "pkg"), "code")] == ["a.py", "b.py"]
    matched = expand_input_path(str(tmp_path / "**" / "*.py"), "code")
    assert [p.name for p in matched] == ["a.py", "b.py"]


def test_jsonl_formats_and_domain_field(tmp_path):
    records = [
        {"text": "first"},
        {"text": "second", "domain": "forum"},
        {"text": "third", "source": "ignored"},
    ]
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        documents, _ = _read(file_source("web", [tmp_path / name]))
        assert [(d.domain, d.text) for d in documents] == [
            ("web", "first"),
            ("forum", "second"),
            ("web", "third"),
        ]
        assert documents[1].source == f"{tmp_path / name}:2"


def test_jsonl_bad_records_are_counted(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "good"}\n'
        "not json\n"
        '{"body": "no text field"}\n'
        '{"text": "  "}\n'
        '{"text": "bad domain", "domain": "a b"}\n'
    )
    with caplog.at_level(logging.WARNING):
        documents, stats = _read(file_source("web", [path]))
    assert [d.text for d in documents] == ["good"]
    assert stats.skipped == {
        "invalid JSON": 1,
        "no string field 'text'": 1,
        "empty document": 1,
        "invalid 'domain' field": 1,
    }
    assert f"{path}:2" in caplog.text


def test_truncated_or_corrupt_archives_raise(tmp_path):
    lines = "".join(json.dumps({"text": f"record {i} " + "x" * 200}) + "\n" for i in range(500))
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(lines.encode())[:400])
    with pytest.raises(DataError, match=f"cannot read input file {gz}"):
        _read(file_source("web", [gz]))

    compressor = zstandard.ZstdCompressor()
    frames = compressor.compress(lines.encode()) + compressor.compress(lines.encode())
    whole = tmp_path / "two_frames.jsonl.zst"
    whole.write_bytes(frames)
    documents, _ = _read(file_source("web", [whole]))
    assert len(documents) == 1000

    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(frames[: len(frames) // 2 + 7])
    with pytest.raises(DataError, match=f"cannot decompress input file {cut}: it ends inside"):
        _read(file_source("web", [cut]))

    corrupt = tmp_path / "corrupt.jsonl.zst"
    corrupt.write_bytes(frames[:20] + bytes(len(frames) - 20))
    with pytest.raises(DataError, match=f"cannot decompress input file {corrupt}"):
        _read(file_source("web", [corrupt]))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    # 0xE9 starts a 3-byte sequence that the space cuts short; 0xFF and 0xFE are never valid.
    # A literal U+FFFD (valid UTF-8) is kept and not counted.
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 ok \xff\xfe end \xef\xbf\xbd")
    (tmp_path / "clean.txt").write_text("plain")
    documents, stats = _read(file_source("text", sorted(tmp_path.iterdir())))
    assert [d.text for d in documents] == ["plain", "caf\ufffd ok \ufffd\ufffd end \ufffd"]
    assert stats.replaced_bytes == {"text": 3}


def test_binary_and_empty_files_are_skipped(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "blank.txt").write_text(" \n\t")
    (tmp_path / "real.txt").write_text("words")
    documents, stats = _read(file_source("text", sorted(tmp_path.iterdir())))
    assert [d.text for d in documents] == ["words"]
    assert stats.skipped == {"binary file": 1, "empty document": 1}


def test_limits_stop_reading_a_domain(tmp_path):
    for index in range(10):
        (tmp_path / f"{index:02}.txt").write_text("x" * 100)
    (tmp_path / "more.jsonl").write_text(
        "\n".join(json.dumps({"text": "y" * 50, "domain": d}) for d in ["a", "b", "a", "b"])
    )
    text_source = sources_from_specs([f"a={tmp_path}/0*.txt"])[0]
    jsonl_source = file_source("b", [tmp_path / "more.jsonl"])

    by_docs = list(limited_documents([text_source], ReadStats(), max_docs=3, max_bytes=None))
    assert [d.source[-6:] for d, _ in by_docs] == ["00.txt", "01.txt", "02.txt"]

    # The document that reaches the byte limit is kept; the domain then stops.
    by_bytes = list(limited_documents([text_source], ReadStats(), max_docs=None, max_bytes=250))
    assert len(by_bytes) == 3

    # Records of a full domain are skipped while the other domain's records are still read.
    mixed = list(limited_documents([text_source, jsonl_source], ReadStats(), 2, None))
    assert [d.domain for d, _ in mixed] == ["a", "a", "b", "b"]


def test_tokenizer_sample_is_bounded_and_order_free():
    documents = [(None, f"document number {i} ".encode() * 20) for i in range(200)]
    sample = tokenizer_training_sample(documents, budget_bytes=5000)
    reversed_sample = tokenizer_training_sample(documents[::-1], budget_bytes=5000)
    assert sample == reversed_sample
    total = sum(len(text) for text in sample)
    assert 5000 <= total < 5000 + max(len(d) for _, d in documents)
    assert len(set(sample)) == len(sample)


def test_roff_to_text():
    source = "\n".join(
        [
            '.\\" a comment',
            '.TH LS 1 "2024" "GNU"',
            ".SH NAME",
            "ls \\- list directory contents",
            ".SH DESCRIPTION",
            ".B ls",
            "[\\fI\\,OPTION\\/\\fR]... \\(em by default.",
            ".PP",
            "\\fB\\-a\\fR, \\fB\\-\\-all\\fR",
            ".BR dircolors (1)",
            "uses \\e and \\(aqquotes\\(aq.",
        ]
    )
    assert roff_to_text(source) == (
        "NAME\nls - list directory contents\n\nDESCRIPTION\nls\n[OPTION]... -- by default.\n\n"
        "-a, --all\ndircolors(1)\nuses \\ and 'quotes'.\n"
    )


def test_builtin_corpus_has_python_domains():
    sources = default_sources()
    domains = [source.domain for source in sources]
    assert domains[:2] == ["code", "docs"]
    assert set(domains) <= {"code", "docs", "man", "license"}
    stats = ReadStats()
    for source in sources:
        first = next(source.documents(stats))
        assert first.domain == source.domain
        assert first.text.strip()


def test_builtin_corpus_skips_missing_sources(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(corpus_module, "MAN_ROOT", tmp_path / "no-man")
    monkeypatch.setattr(corpus_module, "LICENSE_ROOTS", (tmp_path / "no-licenses",))
    monkeypatch.setattr(corpus_module, "PACKAGE_DOC_ROOT", tmp_path / "no-doc")
    with caplog.at_level(logging.INFO, logger="olmoe.data.corpus"):
        sources = default_sources()
    assert [source.domain for source in sources] == ["code", "docs"]
    assert "skipping 'man'" in caplog.text
    assert "skipping 'license'" in caplog.text
