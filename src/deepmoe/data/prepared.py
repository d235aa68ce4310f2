"""Prepared training data (docs/design.md#t2-data): the token shards `deepmoe data prepare` writes, read
memory-mapped, and the batches a run draws from one or several of them (a mixture).

A prepared directory holds `index.json` (format "deepmoe-tokens", version 1), the tokenizer, and per split
("train", "heldout") flat token shards `*.bin` (uint16 or uint32), document start offsets `*.idx` (int64) and,
for chat data, loss masks `*.mask` (uint8, 1 on the assistant's tokens). Nothing is read whole: a batch reads
its rows from the memory-mapped shards, so memory stays constant whatever the data's size.

Windows: text data is packed (each shard cut into consecutive `seq_len` windows, documents joined by the
end-of-text token); chat data is one conversation per window (cut at `seq_len`, padded), so that no sequence
attends or predicts across two conversations. A chat window's labels are -100 (ignored by the loss) wherever
the mask is 0 and on padding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from deepmoe.data.batches import epoch_permutation

FORMAT, VERSION = "deepmoe-tokens", 1
INDEX_NAME = "index.json"
IGNORE_INDEX = -100
"""Labels the loss skips (PyTorch's cross-entropy default)."""


class LabeledBatch(NamedTuple):
    """Input ids and the labels the loss is computed on (-100 where a position does not count), both [B, T]."""

    input_ids: Tensor
    labels: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LabeledBatch:
        return LabeledBatch(self.input_ids.to(device, non_blocking=non_blocking),
                            self.labels.to(device, non_blocking=non_blocking))  # fmt: skip

    def __getitem__(self, rows):  # type: ignore[override]
        if isinstance(rows, int):
            return tuple.__getitem__(self, rows)
        return LabeledBatch(self.input_ids[rows], self.labels[rows])

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape


def split_batch(batch: Tensor | LabeledBatch) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) of a batch: a plain [B, T] tensor is its own labels."""
    return (batch.input_ids, batch.labels) if isinstance(batch, LabeledBatch) else (batch, batch)


def concat_batches(parts: list[Tensor | LabeledBatch]) -> Tensor | LabeledBatch:
    """Batches stacked row-wise; a `LabeledBatch` when one of them is (a plain part is its own labels)."""
    if not any(isinstance(p, LabeledBatch) for p in parts):
        return torch.cat(parts)
    pairs = [split_batch(p) for p in parts]
    return LabeledBatch(torch.cat([ids for ids, _ in pairs]), torch.cat([labels for _, labels in pairs]))


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a prepared directory (an index.json of this format)."""
    index = Path(path) / INDEX_NAME
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class _Shard:
    tokens: np.ndarray  # [n] uint16/uint32, memory-mapped
    starts: np.ndarray  # [d] int64 document starts
    mask: np.ndarray | None  # [n] uint8


class PreparedSplit:
    """One split of a prepared directory: its shards, memory-mapped."""

    def __init__(self, directory: Path, entry: dict[str, Any], dtype: np.dtype, split: str):
        self.shards: list[_Shard] = []
        for shard in entry.get("shards", []):
            tokens = _map(directory / shard["file"], dtype, int(shard["tokens"]), split)
            starts = _map(directory / shard["index"], np.dtype("<i8"), int(shard["documents"]), split)
            mask = (
                _map(directory / shard["mask"], np.dtype("u1"), int(shard["tokens"]), split)
                if shard.get("mask")
                else None
            )
            self.shards.append(_Shard(tokens, starts, mask))
        self.tokens = sum(len(s.tokens) for s in self.shards)
        self.documents = sum(len(s.starts) for s in self.shards)

    def windows(self, seq_len: int, chat: bool, pad_id: int) -> Windows:
        return Windows(self, seq_len, chat, pad_id)


def _map(path: Path, dtype: np.dtype, count: int, split: str) -> np.ndarray:
    """`path` memory-mapped as `count` items of `dtype`; ValueError naming the file when it is missing or its
    size is not what index.json says."""
    if not path.is_file():
        raise ValueError(f"prepared data: {path} (listed in {INDEX_NAME}'s {split} split) is missing")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ValueError(
            f"prepared data: {path} has {size} bytes, {INDEX_NAME} says {count} items of {dtype.itemsize} bytes "
            "(a truncated or replaced file: prepare the data again)"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class Windows:
    """The fixed-length training sequences of a split: packed windows (text) or one per document (chat)."""

    def __init__(self, split: PreparedSplit, seq_len: int, chat: bool, pad_id: int):
        self.split, self.seq_len, self.chat, self.pad_id = split, seq_len, chat, pad_id
        counts = [len(s.starts) if chat else len(s.tokens) // seq_len for s in split.shards]
        self.ends = np.cumsum(counts, dtype=np.int64)
        self.count = int(self.ends[-1]) if len(counts) else 0

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Window `index`: (ids [seq_len] int64, labels [seq_len] int64, or None when they equal the ids)."""
        k = int(np.searchsorted(self.ends, index, side="right"))
        local = index - (int(self.ends[k - 1]) if k else 0)
        shard = self.split.shards[k]
        if not self.chat:
            ids = np.asarray(shard.tokens[local * self.seq_len : (local + 1) * self.seq_len], dtype=np.int64)
            if shard.mask is None:
                return ids, None
            keep = np.asarray(shard.mask[local * self.seq_len : (local + 1) * self.seq_len], dtype=bool)
            return ids, np.where(keep, ids, IGNORE_INDEX)
        start = int(shard.starts[local])
        end = int(shard.starts[local + 1]) if local + 1 < len(shard.starts) else len(shard.tokens)
        end = min(end, start + self.seq_len)
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        ids[: end - start] = shard.tokens[start:end]
        keep = np.asarray(shard.mask[start:end], dtype=bool) if shard.mask is not None else np.ones(end - start, bool)
        labels[: end - start] = np.where(keep, ids[: end - start], IGNORE_INDEX)
        return ids, labels

    def batch(self, indices: list[int]) -> Tensor | LabeledBatch:
        """The windows `indices` as a [len, seq_len] batch (a `LabeledBatch` when some label is masked)."""
        rows = [self.read(i) for i in indices]
        ids = (
            torch.from_numpy(np.stack([r[0] for r in rows])) if rows else torch.zeros(0, self.seq_len, dtype=torch.long)
        )
        if all(r[1] is None for r in rows):
            return ids
        labels = np.stack([r[0] if r[1] is None else r[1] for r in rows])
        return LabeledBatch(ids, torch.from_numpy(labels))


class PreparedDataset:
    """A prepared directory, opened: `index` (index.json), `train` and `heldout` splits, the tokenizer.

    ValueError naming the file for anything that is not a complete prepared directory of this version."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX_NAME
        try:
            self.index: dict[str, Any] = json.loads(index_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{self.path} is not prepared data: {INDEX_NAME} is missing") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"{index_file}: not readable JSON ({err})") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file}: not a deepmoe prepared-data index (format {FORMAT!r})")
        if self.index.get("version") != VERSION:
            raise ValueError(f"{index_file}: version {self.index.get('version')!r}, this deepmoe reads {VERSION}")
        dtype = self.index.get("dtype")
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"{index_file}: dtype {dtype!r} is not uint16 or uint32")
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.chat = bool(self.index.get("chat", False))
        tokenizer = self.index.get("tokenizer") or {}
        self.vocab_size = int(tokenizer["vocab_size"])
        self.eot_id = int(tokenizer["eot_id"]) if tokenizer.get("eot_id") is not None else None
        self.tokenizer_file = self.path / tokenizer.get("file", "tokenizer.json")
        splits = self.index.get("splits") or {}
        self.train = PreparedSplit(self.path, splits.get("train", {}), self.dtype, "train")
        self.heldout = PreparedSplit(self.path, splits.get("heldout", {}), self.dtype, "heldout")
        if self.train.tokens == 0:
            raise ValueError(f"{index_file}: the train split is empty")

    @property
    def data_id(self) -> str:
        """A hash of index.json (tokens, sources and tokenizer): a run checks it when resuming."""
        return hashlib.sha256((self.path / INDEX_NAME).read_bytes()).hexdigest()[:16]

    def tokenizer(self) -> Tokenizer:
        if not self.tokenizer_file.is_file():
            raise ValueError(f"prepared data: its tokenizer {self.tokenizer_file} is missing")
        return Tokenizer.from_file(str(self.tokenizer_file))

    def token_counts(self) -> np.ndarray | None:
        """How often each id occurs in the train split ([vocab_size] int64), from index.json's file; None if absent."""
        name = self.index.get("token_counts")
        if not name or not (self.path / name).is_file():
            return None
        return np.load(self.path / name, allow_pickle=False)


def parse_source(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:WEIGHT` (a mixture source) → (path, weight); weight 1 when not given."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"data source {spec!r}: the weight must be a number > 0")
        return path, value
    return spec, 1.0


class MixtureBatches:
    """Endless [batch_size, seq_len] batches drawn from one or several window sets by weight; deterministic from
    `seed`, resumable (`state_dict`).

    Each row of batch n picks its source with probability ∝ weight (a generator seeded by (seed, n)); each
    source hands out its windows in a seeded permutation per epoch (as `PackedBatches` does), starting the
    next epoch when it runs out. `rows` (this rank's rows of the global batch, torchrun) makes `next` read only
    those rows from the shards while every rank keeps the same position.
    """

    def __init__(self, sources: list[Windows], weights: list[float], batch_size: int, seed: int,
                 rows: slice = slice(None)):  # fmt: skip
        if len(sources) != len(weights) or not sources:
            raise ValueError("a mixture needs one weight per source and at least one source")
        for i, windows in enumerate(sources):
            if windows.count == 0:
                raise ValueError(f"data source {i} has no window of seq_len={windows.seq_len} tokens")
        self.sources, self.batch_size, self.seed, self.rows = sources, batch_size, seed, rows
        total = sum(weights)
        self.weights = torch.tensor([w / total for w in weights], dtype=torch.float64)
        self.step = 0
        self.epochs = [0] * len(sources)
        self.positions = [0] * len(sources)
        self.tokens_per_source = [0] * len(sources)
        """Tokens drawn from each source, over every rank (the global batch's rows)."""
        self._orders: dict[int, tuple[int, Tensor]] = {}

    def _choices(self) -> list[int]:
        if len(self.sources) == 1:
            return [0] * self.batch_size
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.step))
        return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator).tolist()

    def _take(self, source: int) -> int:
        windows = self.sources[source]
        epoch, order = self._orders.get(source, (-1, None))
        if epoch != self.epochs[source]:
            order = epoch_permutation(windows.count, self.seed, self.epochs[source], source)
            self._orders[source] = (self.epochs[source], order)
        index = int(order[self.positions[source]])
        self.positions[source] += 1
        if self.positions[source] == windows.count:
            self.epochs[source] += 1
            self.positions[source] = 0
        return index

    def __iter__(self) -> MixtureBatches:
        return self

    def __next__(self) -> Tensor | LabeledBatch:
        picks = [(source, self._take(source)) for source in self._choices()]
        self.step += 1
        seq_len = self.sources[0].seq_len
        for source, _ in picks:
            self.tokens_per_source[source] += seq_len
        mine = picks[self.rows]
        return concat_batches([self.sources[s].batch([i]) for s, i in mine])

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "epochs": list(self.epochs), "positions": list(self.positions),
                "windows": [w.count for w in self.sources], "batch_size": self.batch_size,
                "tokens_per_source": list(self.tokens_per_source)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        windows = [w.count for w in self.sources]
        if state.get("windows") != windows or state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"data state does not match: saved {state.get('windows')} windows per source and batch_size "
                f"{state.get('batch_size')}, this data has {windows} and {self.batch_size}"
            )
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self.epochs, self.positions = list(state["epochs"]), list(state["positions"])
        self.tokens_per_source = list(state.get("tokens_per_source", [0] * len(windows)))


def _mix_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"deepmoe.MixtureBatches:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers are the same (their canonical serialisations are equal, however their files were
    written)."""
    return a.to_str() == b.to_str()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's canonical serialisation (names it in messages and reports)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]


class PreparedCorpus:
    """What a training run reads from prepared data: one directory, or several mixed by weight (they must share
    one tokenizer, and `tokenizer`, the one of the checkpoint `tokenizer_of` when given). Gives the batches,
    the held-out batches and the baseline the trainer needs."""

    def __init__(
        self, sources: list[tuple[str, float]], tokenizer: Tokenizer | None = None, tokenizer_of: str = "the model"
    ):
        self.datasets = [PreparedDataset(path) for path, _ in sources]
        self.paths = [os.path.abspath(path) for path, _ in sources]
        self.weights = [weight for _, weight in sources]
        first = self.datasets[0]
        self.tokenizer = first.tokenizer()
        for path, dataset in zip(self.paths[1:], self.datasets[1:], strict=True):
            if not same_tokenizer(dataset.tokenizer(), self.tokenizer):
                raise ValueError(
                    f"the mixture's data use different tokenizers: {self.paths[0]} "
                    f"({tokenizer_digest(self.tokenizer)}) and {path} ({tokenizer_digest(dataset.tokenizer())})"
                )
            if dataset.chat != first.chat:
                raise ValueError(f"the mixture mixes chat and plain-text data: {self.paths[0]} and {path}")
        if tokenizer is not None and not same_tokenizer(tokenizer, self.tokenizer):
            raise ValueError(
                f"{self.paths[0]} was prepared with another tokenizer ({tokenizer_digest(self.tokenizer)}) than "
                f"{tokenizer_of}'s ({tokenizer_digest(tokenizer)}): prepare it with --tokenizer {tokenizer_of}"
            )
        self.vocab_size = max(d.vocab_size for d in self.datasets)
        self.eot_id = first.eot_id
        self.chat = first.chat
        key = ";".join(f"{d.data_id}:{w:g}" for d, w in zip(self.datasets, self.weights, strict=True))
        self.corpus_id = "prepared-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        self.train_tokens = sum(d.train.tokens for d in self.datasets)

    def _pad_id(self) -> int:
        return self.eot_id if self.eot_id is not None else 0

    def batches(self, batch_size: int, seq_len: int, seed: int, rows: slice = slice(None)) -> MixtureBatches:
        """The run's training batches (this rank's `rows` of each global batch)."""
        windows = [d.train.windows(seq_len, self.chat, self._pad_id()) for d in self.datasets]
        for path, w in zip(self.paths, windows, strict=True):
            if w.count == 0:
                raise ValueError(f"{path}: no training sequence of seq_len={seq_len} tokens (too little data)")
        return MixtureBatches(windows, self.weights, batch_size, seed, rows)

    def heldout_batches(self, batch_size: int, seq_len: int, max_batches: int | None) -> list[Tensor | LabeledBatch]:
        """The held-out windows of every source taken in turn (window j of each source before window j + 1), in
        batches of `batch_size`, at most `max_batches`; ValueError when there is not one window."""
        return self.ordered_batches("heldout", batch_size, seq_len, max_batches)

    def ordered_batches(
        self, split: str, batch_size: int, seq_len: int, max_batches: int | None
    ) -> list[Tensor | LabeledBatch]:
        """The windows of `split` ("train" or "heldout") in order, as `heldout_batches` takes them."""
        windows = [getattr(d, split).windows(seq_len, self.chat, self._pad_id()) for d in self.datasets]
        order = [(s, j) for j in range(max(w.count for w in windows)) for s, w in enumerate(windows) if j < w.count]
        if not order:
            raise ValueError(
                f"the {split} split of {', '.join(self.paths)} has no sequence of seq_len={seq_len} tokens: prepare "
                "the data with a larger --heldout-fraction, or use a smaller --seq-len"
            )
        if max_batches is not None:
            order = order[: max_batches * batch_size]
        batches = []
        for start in range(0, len(order), batch_size):
            batches.append(concat_batches([windows[s].batch([j]) for s, j in order[start : start + batch_size]]))
        return batches

    def unigram_entropy(self) -> float:
        """Entropy (nats per token) of the train split's unigram distribution, from the prepared token counts
        (mixed by weight)."""
        mixed = np.zeros(self.vocab_size, dtype=np.float64)
        for dataset, weight in zip(self.datasets, self.weights, strict=True):
            counts = dataset.token_counts()
            if counts is None:
                return float("nan")
            mixed[: len(counts)] += weight * counts / max(1, counts.sum())
        p = mixed[mixed > 0] / mixed.sum()
        return max(0.0, float(-(p * np.log(p)).sum()))
