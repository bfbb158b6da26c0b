"""The built-in corpus: real text that ships with Python and the operating system.

Domains, each skipped with a log line when the machine lacks it:

* `code`: the Python standard library's `.py` sources (one document per file).
* `docs`: Python's reference documentation, shipped in the standard library as
  `pydoc_data.topics` (one document per topic).
* `man`: English manual pages under `/usr/share/man/man1` .. `man9`, with roff markup
  stripped (one document per page).
* `license`: license texts under `/usr/share/common-licenses` and the `copyright` files of
  installed packages under `/usr/share/doc` (one document per distinct file content).

Files are visited in the order of a hash of their relative path rather than alphabetically, so
that a per-domain byte limit takes a spread-out sample instead of the first directories.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from olmoe.data.sources import Document, DocumentSource, ReadStats, decode_text, read_text_file

logger = logging.getLogger(__name__)

MAN_ROOT = Path("/usr/share/man")
LICENSE_ROOTS = (Path("/usr/share/common-licenses"),)
PACKAGE_DOC_ROOT = Path("/usr/share/doc")
EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def _spread_order(files: list[Path], root: Path) -> list[Path]:
    def key(path: Path) -> bytes:
        relative = path.relative_to(root).as_posix().encode()
        return hashlib.blake2b(relative, digest_size=8).digest()

    return sorted(files, key=key)


def _unique_files(paths: Iterable[Path]) -> list[Path]:
    """Keep regular files, dropping symbolic links and hard links to a file already kept."""
    files = []
    seen = set()
    for path in paths:
        if not path.is_file():
            continue
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            files.append(path)
    return files


def stdlib_code_source() -> DocumentSource | None:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        logger.info("built-in corpus: no standard library sources at %s, skipping 'code'", root)
        return None
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_STDLIB_DIRS)
        files.extend(Path(dirpath) / name for name in filenames if name.endswith(".py"))
    if not files:
        logger.info("built-in corpus: no .py files under %s, skipping 'code'", root)
        return None
    files = _spread_order(files, root)

    def read(stats: ReadStats) -> Iterator[Document]:
        for path in files:
            yield from read_text_file(path, "code", stats)

    return DocumentSource("code", read, str(root))


def python_docs_source() -> DocumentSource | None:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        logger.info("built-in corpus: pydoc_data.topics is not installed, skipping 'docs'")
        return None

    def read(stats: ReadStats) -> Iterator[Document]:
        for name in sorted(topics):
            text = topics[name]
            if text.strip():
                yield Document("docs", text, f"pydoc_data.topics[{name!r}]")

    return DocumentSource("docs", read, "pydoc_data.topics")


def man_page_source() -> DocumentSource | None:
    sections = sorted(MAN_ROOT.glob("man[1-9]")) if MAN_ROOT.is_dir() else []
    files = _unique_files(path for section in sections for path in sorted(section.iterdir()))
    if not files:
        logger.info("built-in corpus: no manual pages under %s, skipping 'man'", MAN_ROOT)
        return None
    files = _spread_order(files, MAN_ROOT)

    def read(stats: ReadStats) -> Iterator[Document]:
        for path in files:
            document = _read_man_page(path, stats)
            if document is not None:
                yield document

    return DocumentSource("man", read, str(MAN_ROOT))


def _read_man_page(path: Path, stats: ReadStats) -> Document | None:
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        stats.skip("unreadable manual page", str(path), str(err))
        return None
    source = decode_text(data, "man", stats)
    if source.lstrip().startswith(".so "):
        return None  # a one-line redirect to another page
    text = roff_to_text(source)
    if not text.strip():
        stats.skip("empty document", str(path))
        return None
    return Document("man", text, str(path))


def license_source() -> DocumentSource | None:
    candidates = []
    for root in LICENSE_ROOTS:
        if root.is_dir():
            candidates.extend(sorted(root.iterdir()))
    if PACKAGE_DOC_ROOT.is_dir():
        candidates.extend(sorted(PACKAGE_DOC_ROOT.glob("*/copyright")))
    files = _unique_files(candidates)
    if not files:
        logger.info("built-in corpus: no license texts under /usr/share, skipping 'license'")
        return None

    def read(stats: ReadStats) -> Iterator[Document]:
        # Many packages ship the same copyright file, so exact copies are read once.
        seen = set()
        for path in files:
            for document in read_text_file(path, "license", stats):
                digest = hashlib.blake2b(document.text.encode(), digest_size=16).digest()
                if digest in seen:
                    stats.skip("duplicate license text", str(path), level=logging.DEBUG)
                    continue
                seen.add(digest)
                yield document

    return DocumentSource("license", read, "/usr/share licenses")


def default_sources() -> list[DocumentSource]:
    """Return the built-in corpus sources available on this machine (possibly none)."""
    builders = (stdlib_code_source, python_docs_source, man_page_source, license_source)
    sources = [source for build in builders if (source := build()) is not None]
    logger.info("built-in corpus domains: %s", ", ".join(s.domain for s in sources) or "none")
    return sources


# roff: requests and macros fill a line that starts with '.' or "'"; escapes start with '\'.
_ROFF_REQUEST = re.compile(r"^[.'][ \t]*(\S*)[ \t]*(.*)$", re.MULTILINE)
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\(..|\[[^\]]*\]|.)|\(..|\[[^\]]*\]|.)"
)
_ROFF_CHARS = {
    "(em": "--",
    "(en": "-",
    "(aq": "'",
    "(dq": '"',
    "(lq": '"',
    "(rq": '"',
    "(oq": "'",
    "(cq": "'",
    "(bu": "*",
    "(co": "(c)",
    "[em]": "--",
    "[aq]": "'",
    "-": "-",
    "e": "\\",
    " ": " ",
    "~": " ",
}
_ROFF_HEADING_MACROS = {"SH", "SS", "Sh", "Ss"}
_ROFF_TEXT_MACROS = {"B", "I", "SM", "SB", "TP", "IP", "Nm", "Nd"} | _ROFF_HEADING_MACROS
_ROFF_ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}
_ROFF_PARAGRAPH_MACROS = {"PP", "LP", "P", "sp", "Pp"}


def _roff_request_text(match: re.Match) -> str:
    macro, rest = match.group(1), match.group(2)
    if macro in _ROFF_HEADING_MACROS:
        return "\n" + _unquote(rest)
    if macro in _ROFF_TEXT_MACROS:
        return _unquote(rest)
    if macro in _ROFF_ALTERNATING_MACROS:
        return "".join(_split_arguments(rest))
    return ""  # comments, paragraph breaks and formatting requests


def roff_to_text(source: str) -> str:
    """Strip the common man(7) and roff markup from a manual page, keeping its words.

    This is a light cleanup for training text, not a roff renderer: tables, conditionals and
    user-defined macros are dropped or left as they are. Escapes other than the common
    characters in `_ROFF_CHARS` (fonts, sizes, strings, zero-width marks) are removed.
    """
    text = _ROFF_REQUEST.sub(_roff_request_text, source)
    text = _ROFF_ESCAPE.sub(lambda match: _ROFF_CHARS.get(match.group(0)[1:], ""), text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _split_arguments(rest: str) -> list[str]:
    return [part.strip('"') for part in re.findall(r'"[^"]*"|\S+', rest)]


def _unquote(rest: str) -> str:
    return " ".join(_split_arguments(rest))
