"""Tokenizing and writing of `deepmoe data prepare` (`deepmoe.data.prepare`): batches of documents encoded in
forked worker processes (ordered results, a bounded number in flight), and the shard files of one split, each
written as *.tmp files and renamed when complete."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from deepmoe.data.tokenizer import _encode_documents
from deepmoe.io.files import fsync_path

_BATCH_DOCUMENTS, _BATCH_CHARS = 512, 1 << 20

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eot_id: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=Tokenizer.from_str(tokenizer_json), eot_id=eot_id)


def _encode_in_worker(documents: list) -> list[tuple[np.ndarray, np.ndarray | None]]:
    return encode_documents(_WORKER["tokenizer"], documents, _WORKER["eot_id"])


def encode_documents(tokenizer: Tokenizer, documents: list, eot_id: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(ids, mask) of each document: a text is its ids followed by `eot_id` (mask None); a rendered chat
    (text, assistant spans) is its ids as the template wrote them (special tokens recognised) and a uint8 mask,
    1 on every token whose characters overlap an assistant span."""
    if not documents or isinstance(documents[0], str):
        return [(ids, None) for ids in _encode_documents(tokenizer, documents, eot_id)]
    encodings = tokenizer.encode_batch([text for text, _ in documents], add_special_tokens=False)
    out = []
    for (_, spans), encoding in zip(documents, encodings, strict=True):
        offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(offsets), dtype=bool)
        for a, b in spans:
            mask |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
        out.append((np.array(encoding.ids, dtype=np.int64), mask.astype(np.uint8)))
    return out


def make_batches(documents: Iterator[tuple[int, str, object]]) -> Iterator[tuple[list, list]]:
    """([(index, split)], [document]) batches of at most 512 documents or about 1 MB of text."""
    meta, docs, chars = [], [], 0
    for index, split, document in documents:
        meta.append((index, split))
        docs.append(document)
        chars += len(document if isinstance(document, str) else document[0])
        if len(docs) >= _BATCH_DOCUMENTS or chars >= _BATCH_CHARS:
            yield meta, docs
            meta, docs, chars = [], [], 0
    if docs:
        yield meta, docs


def encode_in_workers(batches: Iterator[tuple[list, list]], tokenizer_json: str, eot_id: int, workers: int) -> Iterator:
    """(meta, encodings) of each batch in order, tokenized by `workers` forked processes, at most 2 batches per
    worker in flight (bounded memory)."""
    context = multiprocessing.get_context("fork")
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before the fork: the children start with it
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_json, eot_id))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        pending: deque = deque()
        for meta, docs in batches:
            pending.append((meta, pool.apply_async(_encode_in_worker, (docs,))))
            if len(pending) >= 2 * workers:
                meta, result = pending.popleft()
                yield meta, result.get()
        while pending:
            meta, result = pending.popleft()
            yield meta, result.get()
    finally:
        pool.terminate()
        pool.join()


# ---- shard files --------------------------------------------------------------------------------------------


@dataclass
class ShardWriter:
    """The shards of one split: the open one is written as *.tmp files, renamed when complete."""

    directory: Path
    split: str
    dtype: str
    chat: bool
    shards: list[dict] = field(default_factory=list)
    _files: dict | None = None
    _tokens: int = 0
    _documents: int = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        if self._files is None:
            stem = f"{self.split}-{len(self.shards):05d}"
            names = {"bin": f"{stem}.bin", "idx": f"{stem}.idx", "mask": f"{stem}.mask" if self.chat else None}
            self._files = {k: (n, open(self.directory / f"{n}.tmp", "wb")) for k, n in names.items() if n}
            self._tokens = self._documents = 0
        self._files["idx"][1].write(np.array([self._tokens], dtype="<i8").tobytes())
        self._files["bin"][1].write(ids.astype(f"<{'u2' if self.dtype == 'uint16' else 'u4'}").tobytes())
        if self.chat:
            self._files["mask"][1].write(mask.astype(np.uint8).tobytes())
        self._tokens += len(ids)
        self._documents += 1

    @property
    def open_tokens(self) -> int:
        return self._tokens if self._files is not None else 0

    def close(self) -> dict | None:
        """Complete the open shard (fsync, rename from *.tmp); its index.json entry, None when none is open."""
        if self._files is None:
            return None
        for name, f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(self.directory / f"{name}.tmp", self.directory / name)
        fsync_path(self.directory, directory=True)
        entry = {
            "file": self._files["bin"][0],
            "index": self._files["idx"][0],
            "mask": self._files["mask"][0] if self.chat else None,
            "tokens": self._tokens,
            "documents": self._documents,
        }
        self._files = None
        self.shards.append(entry)
        return entry

    def abandon(self) -> None:
        for _, f in (self._files or {}).values():
            f.close()
        self._files = None
