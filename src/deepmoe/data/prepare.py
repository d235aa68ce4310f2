"""`deepmoe data prepare`: text, JSON Lines, parquet or chat conversations tokenized once into a directory of
flat token shards that training reads (the prepared-dataset format, version 1, docs/design.md#t2-data).

The input is streamed (never a whole file in memory), tokenized in worker processes in batches of documents
(results in input order) and written shard by shard into a staging directory `.DIR.partial/` beside the output;
`progress.json` there records a fingerprint of the inputs, options and tokenizer and the shards completed, so
an interrupted run given the same arguments keeps them and tokenizes only what follows. At the end index.json
is written and the staging directory becomes DIR.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from deepmoe.data.prepared import FORMAT, INDEX_NAME, VERSION, is_prepared
from deepmoe.data.readers import BadInput, ChatRenderer, SourceStats, input_files, read_source
from deepmoe.data.shards import ShardWriter, encode_in_workers, make_batches
from deepmoe.data.tokenizer import EOT_TOKEN, TOKENIZER_FILE, _check_vocab_size, train_bpe
from deepmoe.io.files import (
    atomic_directory,
    atomic_write,
    claim_directory,
    fsync_path,
    refuse_overlap,
    visible_entries,
    write_json,
)

logger = logging.getLogger(__name__)

PROGRESS_FILE, TOKEN_COUNTS_FILE = "progress.json", "token_counts.npy"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPLITS = ("train", "heldout")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_HELDOUT_FRACTION = 0.005
_NAMED_SKIPS = 10  # bad documents named in a warning per source; the rest only counted
_OWN_FILES = re.compile(
    r"(index\.json|tokenizer\.json|tokenizer_config\.json|token_counts\.npy|"
    r"(train|heldout)-\d{5}\.(bin|idx|mask))"
)


@dataclass
class PrepareReport:
    """What `prepare_dataset` wrote: per split tokens, documents and shards; per source documents and skipped;
    the documents tokenized by this run (fewer than all after a resume) and its duration."""

    out: Path
    splits: dict[str, dict[str, int]]
    sources: list[SourceStats]
    tokenized_documents: int = 0
    tokenized_tokens: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    dtype: str = "uint16"
    vocab_size: int = 0
    eot_id: int = 0

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.sources)

    @property
    def tokens_per_second(self) -> float:
        return self.tokenized_tokens / self.seconds if self.seconds > 0 else 0.0


def heldout_period(fraction: float) -> int:
    """round(1 / fraction): document i is held out iff i % period == period - 1 (0: none held out)."""
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"--heldout-fraction {fraction} must be in [0, 0.5]")
    return round(1 / fraction) if fraction > 0 else 0


def split_of(index: int, period: int) -> str:
    return "heldout" if period > 0 and index % period == period - 1 else "train"


def is_prepared_dataset(directory: Path) -> bool:
    """Whether `directory` is an earlier output of `prepare_dataset` (index.json of this format and only its
    own files), which a new run may replace."""
    return is_prepared(directory) and all(_OWN_FILES.fullmatch(n) for n in visible_entries(directory))


# ---- the staging directory -----------------------------------------------------------------------------


def _open_staging(staging: Path, fingerprint: str) -> dict:
    """The progress of an earlier run with the same fingerprint (its unrecorded files removed), else a fresh
    staging directory."""
    progress = None
    try:
        progress = json.loads((staging / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if not isinstance(progress, dict) or progress.get("fingerprint") != fingerprint:
        if staging.exists():
            logger.info("discarding %s: it was started with other inputs, options or tokenizer", staging)
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        progress = {"fingerprint": fingerprint, "splits": {s: {"shards": [], "consumed": 0} for s in SPLITS}}
        write_json(staging / PROGRESS_FILE, progress)
        return progress
    keep = {PROGRESS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE}
    for split in progress["splits"].values():
        keep |= {n for shard in split["shards"] for n in (shard["file"], shard["index"], shard["mask"]) if n}
    for entry in staging.iterdir():
        if entry.name not in keep:
            entry.unlink() if entry.is_file() else shutil.rmtree(entry)
    return progress


def _fingerprint(files: list[tuple[Path, str]], options: dict, tokenizer_id: str) -> str:
    inputs = [(str(p), fmt, p.stat().st_size, p.stat().st_mtime_ns) for p, fmt in files]
    blob = json.dumps({"inputs": inputs, "options": options, "tokenizer": tokenizer_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ---- the one entry point -------------------------------------------------------------------------------


def prepare_dataset(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    input_format: str = "auto",
    text_field: str = "text",
    chat: bool = False,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    on_error: str = "fail",
    progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    """Tokenize `inputs` (files or folders) into the prepared-dataset directory `out` (format version 1, see
    the module docstring); `tokenizer` (a tokenizer.json or a folder holding one) or `vocab_size` (a new
    byte-level BPE trained on the input). `progress(documents, tokens)` is called after each batch."""
    start = time.perf_counter()
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give either --tokenizer PATH or --vocab-size N (to train a new tokenizer on the input)")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"--on-error {on_error!r} must be fail or skip")
    if workers < 1 or shard_tokens < 1:
        raise ValueError(f"--workers {workers} and --shard-tokens {shard_tokens} must be at least 1")
    period = heldout_period(heldout_fraction)
    files = input_files(inputs, input_format)
    if chat and any(fmt != "jsonl" for _, fmt in files):
        raise ValueError(f"--chat reads JSON Lines of conversations: {next(p for p, f in files if f != 'jsonl')}")
    refuse_overlap(out, inputs, "an input")
    options = {
        "format": input_format,
        "field": text_field,
        "chat": chat,
        "shard_tokens": shard_tokens,
        "heldout_fraction": heldout_fraction,
        "on_error": on_error,
        "tokenizer": None if tokenizer is None else os.path.abspath(tokenizer),
        "vocab_size": vocab_size,
    }
    tokenizer_json, config_json = _tokenizer_files(tokenizer)
    tokenizer_id = f"train:{vocab_size}" if tokenizer_json is None else hashlib.sha256(tokenizer_json).hexdigest()
    tokenizer_id += hashlib.sha256(config_json or b"").hexdigest()
    with claim_directory(out, f"prepared dataset ({INDEX_NAME})", is_prepared_dataset) as target:
        staging = target.parent / f".{target.name}.partial"
        state = _open_staging(staging, _fingerprint(files, options, tokenizer_id))
        config = json.loads(config_json) if config_json else None
        if tokenizer_json is None:
            if not (staging / TOKENIZER_FILE).is_file():
                trained = _train_tokenizer(files, text_field, chat, on_error, vocab_size, config)
                atomic_write(staging / TOKENIZER_FILE, trained)
            tokenizer_json = (staging / TOKENIZER_FILE).read_bytes()
        else:
            atomic_write(staging / TOKENIZER_FILE, tokenizer_json)
            if config_json is not None:
                atomic_write(staging / TOKENIZER_CONFIG_FILE, config_json)
        report = _write_shards(staging, state, files, options, tokenizer_json, config, period, workers, progress)
        _finish(staging, target, report, tokenizer_json, options, heldout_fraction)
        report.seconds = time.perf_counter() - start
        return report


def _tokenizer_files(tokenizer: str | os.PathLike | None) -> tuple[bytes | None, bytes | None]:
    """(tokenizer.json bytes, tokenizer_config.json bytes or None) of a given tokenizer (None, None: train)."""
    if tokenizer is None:
        return None, None
    path = Path(tokenizer).expanduser()
    folder = path if path.is_dir() else None
    file = path / TOKENIZER_FILE if folder else path
    if not file.is_file():
        raise ValueError(f"tokenizer {file} not found: give a tokenizer.json file or a directory holding one")
    data = file.read_bytes()
    try:
        Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception
        raise ValueError(f"{file} is not a readable tokenizer: {str(e).splitlines()[0]}") from None
    config = folder / TOKENIZER_CONFIG_FILE if folder else None
    return data, config.read_bytes() if config is not None and config.is_file() else None


def _documents(files, text_field, chat, on_error, renderer, stats: list[SourceStats]) -> Iterator:
    """Every usable document of the input in order (a `BadInput` raised, or with on_error skip counted)."""
    for path, fmt in files:
        source = SourceStats(str(path), fmt)
        stats.append(source)
        for document in read_source(path, fmt, text_field, source, renderer if chat else None):
            if isinstance(document, BadInput):
                if on_error == "fail":
                    raise document
                source.skipped += 1
                if source.skipped <= _NAMED_SKIPS:
                    logger.warning("skipped %s", document)
                if source.skipped == _NAMED_SKIPS:
                    logger.warning("further bad documents of %s are skipped and counted without naming them", path)
                continue
            source.documents += 1
            yield document


def _train_tokenizer(files, text_field, chat, on_error, vocab_size, config) -> bytes:
    """A byte-level BPE (special token EOT) trained on the input, read as a stream (the first of two passes)."""
    _check_vocab_size(vocab_size)
    renderer = ChatRenderer.from_config(config, EOT_TOKEN) if chat else None
    errors: list[BaseException] = []

    def texts() -> Iterator[str]:
        try:
            for document in _documents(files, text_field, chat, on_error, renderer, []):
                yield document if isinstance(document, str) else document[0]
        except BaseException as e:  # re-raised below: the tokenizers library would hide it
            errors.append(e)

    logger.info("training a byte-level BPE tokenizer of %d tokens on the input", vocab_size)
    tokenizer = train_bpe(texts(), vocab_size)
    if errors:
        raise errors[0]
    return tokenizer.to_str().encode("utf-8")


def _write_shards(staging, state, files, options, tokenizer_json, config, period, workers, progress) -> PrepareReport:
    tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    if eot_id is None and config:
        eot_id = tokenizer.token_to_id(ChatRenderer.from_config(config, "").eos_token)
    if eot_id is None:
        raise ValueError(f"the tokenizer has no end-of-text token ({EOT_TOKEN} or the eos_token of its config)")
    dtype = "uint16" if vocab <= 65536 else "uint32"
    chat = options["chat"]
    renderer = ChatRenderer.from_config(config, tokenizer.id_to_token(eot_id)) if chat else None
    splits = state["splits"]
    writers = {s: ShardWriter(staging, s, dtype, chat, list(splits[s]["shards"])) for s in SPLITS}
    resumed = sum(len(w.shards) for w in writers.values())
    if resumed:
        logger.info("resuming %s: %d shards already complete", staging, resumed)
    stats: list[SourceStats] = []
    report = PrepareReport(staging, {}, stats, resumed_shards=resumed, dtype=dtype, vocab_size=vocab, eot_id=eot_id)

    def todo() -> Iterator[tuple[int, str, object]]:
        for index, document in enumerate(
            _documents(files, options["field"], chat, options["on_error"], renderer, stats)
        ):
            split = split_of(index, period)
            if index >= splits[split]["consumed"]:  # not in a completed shard: tokenize it
                yield index, split, document
        if not any(s.documents for s in stats):
            skipped = sum(s.skipped for s in stats)
            raise ValueError("the input has no documents" + (f" ({skipped} skipped as bad input)" if skipped else ""))

    try:
        for meta, encodings in encode_in_workers(make_batches(todo()), tokenizer_json.decode("utf-8"), eot_id, workers):
            for (index, split), (ids, mask) in zip(meta, encodings, strict=True):
                writer = writers[split]
                writer.add(ids, mask)
                report.tokenized_documents += 1
                report.tokenized_tokens += len(ids)
                if writer.open_tokens >= options["shard_tokens"]:
                    writer.close()
                    _record(staging, state, writers, split, index + 1)
            if progress is not None:
                progress(report.tokenized_documents, report.tokenized_tokens)
        for split, writer in writers.items():
            if writer.close() is not None:
                _record(staging, state, writers, split, None)
    except BaseException:
        for writer in writers.values():
            writer.abandon()
        raise
    for split, writer in writers.items():
        report.splits[split] = {
            "tokens": sum(s["tokens"] for s in writer.shards),
            "documents": sum(s["documents"] for s in writer.shards),
            "shards": writer.shards,
        }
    return report


def _record(staging: Path, state: dict, writers: dict, split: str, consumed: int | None) -> None:
    """progress.json after a shard of `split` was completed with the input's first `consumed` documents
    (None: at the end of the input)."""
    state["splits"][split]["shards"] = list(writers[split].shards)
    state["splits"][split]["consumed"] = consumed if consumed is not None else 1 << 62
    write_json(staging / PROGRESS_FILE, state)


def _finish(staging: Path, target: Path, report: PrepareReport, tokenizer_json: bytes, options, fraction) -> None:
    """token_counts.npy and index.json into the staging directory, which then replaces `target`."""
    counts = np.zeros(report.vocab_size, dtype=np.int64)
    np_dtype = np.dtype("<u2" if report.dtype == "uint16" else "<u4")
    for shard in report.splits["train"]["shards"]:  # read back in blocks of 4 Mi tokens: bounded memory
        with open(staging / shard["file"], "rb") as f:
            while (ids := np.fromfile(f, dtype=np_dtype, count=1 << 22)).size:
                counts += np.bincount(ids, minlength=report.vocab_size)
    atomic_write(staging / TOKEN_COUNTS_FILE, lambda f: np.save(f, counts))
    index = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": report.dtype,
        "chat": options["chat"],
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": hashlib.sha256(tokenizer_json).hexdigest(),
            "vocab_size": report.vocab_size,
            "eot_id": report.eot_id,
        },
        "splits": report.splits,
        "token_counts": TOKEN_COUNTS_FILE,
        "sources": [s.to_dict() for s in report.sources],
        "heldout_fraction": fraction,
        "options": options,
    }
    write_json(staging / INDEX_NAME, index)
    with atomic_directory(target) as tmp:  # hard links: the staging directory stays whole until the swap is done
        for entry in sorted(staging.iterdir()):
            if entry.name != PROGRESS_FILE:
                try:
                    os.link(entry, tmp / entry.name)
                except OSError:
                    shutil.copyfile(entry, tmp / entry.name)
                    fsync_path(tmp / entry.name)
    shutil.rmtree(staging, ignore_errors=True)
    report.out = target
