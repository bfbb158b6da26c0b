"""Raw-text inputs: `DOMAIN=PATH` specs, file discovery and document reading.

A plain-text file (`.txt`, `.md`, source code, anything not JSON Lines) is one document.
A JSON Lines file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) contains one document per line in a
text field. A record may name its own domain in a domain field, which overrides the domain of
its input. Bytes that are not valid UTF-8 are replaced with U+FFFD and counted per domain.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from olmoe.data.errors import DataError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
DOMAIN_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
BINARY_PROBE_BYTES = 8192
MAX_LOGGED_PROBLEMS = 5


@dataclass(frozen=True)
class Document:
    """One document of raw text and the domain it belongs to."""

    domain: str
    text: str
    source: str
    """File path, with `:LINE` for a JSON Lines record."""


@dataclass
class ReadStats:
    """Counts of repaired and skipped input, shared by all sources of one run."""

    replaced_bytes: Counter = field(default_factory=Counter)
    """Domain -> undecodable byte sequences replaced with U+FFFD."""
    skipped: Counter = field(default_factory=Counter)
    """Reason -> files or records skipped."""
    quiet: bool = False
    """Count without logging (for a second read of the same inputs)."""
    _logged: Counter = field(default_factory=Counter)

    def skip(self, reason: str, where: str, detail: str = "", level: int = logging.WARNING):
        """Count a skipped file or record and log the first few of each reason."""
        self.skipped[reason] += 1
        if self.quiet:
            return
        self._logged[reason] += 1
        if self._logged[reason] <= MAX_LOGGED_PROBLEMS:
            suffix = f": {detail}" if detail else ""
            logger.log(level, "skipping %s (%s)%s", where, reason, suffix)
        elif self._logged[reason] == MAX_LOGGED_PROBLEMS + 1:
            logger.log(level, "more inputs skipped for %s; see the final counts", reason)


class DocumentSource:
    """Documents of one domain, read lazily so that per-domain limits stop reading early.

    `single_domain` is False when records may name their own domain (JSON Lines), so that
    reading continues after `domain` reaches its limit.
    """

    def __init__(
        self,
        domain: str,
        read: Callable[[ReadStats], Iterator[Document]],
        name: str,
        single_domain: bool = True,
    ):
        self.domain = domain
        self.name = name
        self.single_domain = single_domain
        self._read = read

    def documents(self, stats: ReadStats) -> Iterator[Document]:
        return self._read(stats)

    def __repr__(self) -> str:
        return f"DocumentSource({self.domain!r}, {self.name!r})"


def validate_domain(domain: str, where: str) -> str:
    if not DOMAIN_PATTERN.match(domain):
        raise DataError(
            f"{where}: domain {domain!r} is invalid: use letters, digits, '_', '-' or '.'"
        )
    return domain


def parse_input_spec(spec: str) -> tuple[str, str]:
    """Split `DOMAIN=PATH` into its parts (PATH may be a file, a directory or a glob)."""
    domain, sep, path = spec.partition("=")
    if not sep or not domain or not path:
        raise DataError(
            f"--input {spec!r} is invalid: expected DOMAIN=PATH, e.g. --input code=src/"
        )
    return validate_domain(domain.strip(), f"--input {spec!r}"), path.strip()


def expand_input_path(path: str, domain: str) -> list[Path]:
    """Return the files a file, directory or glob names, sorted; raise DataError if none.

    A directory contributes every regular file below it, skipping hidden files and directories.
    """
    where = f"input {path!r} (domain {domain!r})"
    if glob.has_magic(path):
        matches = sorted(glob.glob(path, recursive=True))
        if not matches:
            raise DataError(f"{where}: the glob matches no files")
        files: list[Path] = []
        for match in matches:
            files.extend(_files_under(Path(match)))
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(f"{where}: path not found")
        files = _files_under(root)
    if not files:
        raise DataError(f"{where}: contains no files")
    return files


def _files_under(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                file = Path(dirpath) / name
                if file.is_file():
                    files.append(file)
    return files


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def decode_text(data: bytes, domain: str, stats: ReadStats) -> str:
    """Decode UTF-8, replacing each undecodable byte sequence with U+FFFD and counting it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # A literal U+FFFD in the input (bytes EF BF BD) always decodes as itself, so the
        # replacements are the U+FFFD characters beyond those.
        replaced = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
        stats.replaced_bytes[domain] += replaced
        return text


def read_text_file(path: Path, domain: str, stats: ReadStats) -> Iterator[Document]:
    """Yield a plain-text file as one document; skip binary files and empty ones."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read input file {path}: {err}") from err
    if b"\0" in data[:BINARY_PROBE_BYTES]:
        stats.skip("binary file", str(path))
        return
    text = decode_text(data, domain, stats)
    if not text.strip():
        stats.skip("empty document", str(path))
        return
    yield Document(domain, text, str(path))


def _zstd_chunks(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Decompress a `.zst` file frame by frame; raise DataError if it ends inside a frame.

    `zstandard`'s stream reader returns a silent EOF for a truncated file, so this drives
    decompression objects directly and checks that the last frame is complete.
    """
    import zstandard

    context = zstandard.ZstdDecompressor()
    decompressor = context.decompressobj()
    pending = b""
    try:
        with open(path, "rb") as handle:
            while chunk := pending or handle.read(chunk_bytes):
                pending = b""
                yield decompressor.decompress(chunk)
                if decompressor.eof:  # the frame ended: the rest starts the next frame
                    pending = decompressor.unused_data
                    decompressor = context.decompressobj()
                    if not pending:
                        pending = handle.read(chunk_bytes)
                        if not pending:
                            return
    except zstandard.ZstdError as err:
        raise DataError(f"cannot decompress input file {path}: {err}") from err
    raise DataError(f"cannot decompress input file {path}: it ends inside a zstd frame")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _binary_lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        yield from _lines(_zstd_chunks(path))
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            yield from handle
    except (OSError, EOFError) as err:
        # A truncated .gz file raises EOFError, a corrupt one gzip.BadGzipFile (an OSError).
        raise DataError(f"cannot read input file {path}: {err}") from err


def read_jsonl_file(
    path: Path, domain: str, stats: ReadStats, text_field: str, domain_field: str
) -> Iterator[Document]:
    """Yield one document per JSON Lines record; a bad record is skipped and counted."""
    for line_number, raw in enumerate(_binary_lines(path), start=1):
        if not raw.strip():
            continue
        document = _parse_record(raw, path, line_number, domain, stats, text_field, domain_field)
        if document is not None:
            yield document


def _parse_record(
    raw: bytes,
    path: Path,
    line_number: int,
    domain: str,
    stats: ReadStats,
    text_field: str,
    domain_field: str,
) -> Document | None:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(decode_text(raw, domain, stats))
    except json.JSONDecodeError as err:
        stats.skip("invalid JSON", where, str(err))
        return None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        stats.skip(f"no string field {text_field!r}", where)
        return None
    record_domain = record.get(domain_field)
    if record_domain is not None:
        if not isinstance(record_domain, str) or not DOMAIN_PATTERN.match(record_domain):
            stats.skip(f"invalid {domain_field!r} field", where, repr(record_domain))
            return None
        domain = record_domain
    text = record[text_field]
    if not text.strip():
        stats.skip("empty document", where)
        return None
    return Document(domain, text, where)


def file_source(
    domain: str, files: Iterable[Path], text_field: str = "text", domain_field: str = "domain"
) -> DocumentSource:
    """Return a source that reads `files` in order as plain text or JSON Lines by suffix."""
    files = list(files)

    def read(stats: ReadStats) -> Iterator[Document]:
        for path in files:
            if is_jsonl(path):
                yield from read_jsonl_file(path, domain, stats, text_field, domain_field)
            else:
                yield from read_text_file(path, domain, stats)

    name = str(files[0]) if len(files) == 1 else f"{len(files)} files"
    return DocumentSource(domain, read, name, single_domain=not any(map(is_jsonl, files)))


def sources_from_specs(
    specs: Iterable[str], text_field: str = "text", domain_field: str = "domain"
) -> list[DocumentSource]:
    """Build one source per `DOMAIN=PATH` spec, checking that every path exists up front."""
    sources = []
    for spec in specs:
        domain, path = parse_input_spec(spec)
        files = expand_input_path(path, domain)
        sources.append(file_source(domain, files, text_field, domain_field))
    return sources
