"""Tokenizers: the byte-level BPE trained locally on a corpus (cached), and the one loader of the
`tokenizer.json` saved with a checkpoint."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepmoe.data.sources import _FORMAT, TextSource, corpus_hash
from deepmoe.io.checkpoint import checkpoint_dir
from deepmoe.io.files import atomic_write

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
"""The end-of-text token that separates documents in a token stream (the tokenizer's only special token)."""


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


def load_tokenizer(
    model_dir: str | os.PathLike,
    needed_for: str = "reading text",
    tokenizer: str | os.PathLike | Tokenizer | None = None,
) -> Tokenizer:
    """The `tokenizer.json` saved with a checkpoint (a run directory means its newest step): the one loader
    of every command and tool. `tokenizer` overrides it: a `Tokenizer`, or a path (`read_tokenizer`: a
    tokenizer.json file or a directory holding one), for a checkpoint saved without one (e.g. by
    transformers). ValueError naming the file when it is missing or unreadable."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        return read_tokenizer(tokenizer)
    path = checkpoint_dir(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} not found: {needed_for} needs the checkpoint's tokenizer (give one with --tokenizer PATH)"
        )
    return read_tokenizer(path)


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from `path`: a tokenizer.json file, or a directory holding one. ValueError naming the
    file when it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"tokenizer {path} not found: give a tokenizer.json file or a directory holding one")
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


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (special token ``EOT_TOKEN``, pairs seen at least twice) trained
    on `texts`, streamed."""
    tokenizer = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
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
    tokenizer = train_bpe((s.text for s in sources), vocab_size, length=len(sources))
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
