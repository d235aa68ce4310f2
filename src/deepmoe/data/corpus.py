"""A tokenized corpus: documents read, split, tokenized and cached as train and held-out token streams."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from deepmoe.data.sources import bundled_corpus, corpus_hash, read_text_path, split_documents
from deepmoe.data.tokenizer import (
    EOT_TOKEN,
    _check_vocab_size,
    _encode_documents,
    _write_cache,
    get_tokenizer,
    resolve_cache_dir,
)

logger = logging.getLogger(__name__)


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
