"""Test corpora: a stand-in for `deepmoe.data.TokenizedCorpus` (the fields the trainer reads, from given
token ids), and a small byte-level BPE trained on given text."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


@dataclass
class StandInCorpus:
    train: torch.Tensor
    heldout: torch.Tensor
    vocab_size: int = 64
    tokenizer: object = None
    eot_id: int = 0
    domains: dict = field(default_factory=dict)
    corpus_id: str = "stand-in"


def byte_level_bpe(text: str, vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE like the bundled one (its EOT special token), trained on `text`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def write_prepared(directory, tokenizer: Tokenizer, train: list, heldout: list, masks: dict | None = None,
                   chat: bool = False, shard_documents: int = 2):  # fmt: skip
    """A prepared directory in the format `deepmoe data prepare` writes (format version 1), written here from
    lists of documents (each a list of token ids; `masks`: split -> one 0/1 list per document for chat data),
    `shard_documents` documents per shard. An independent writer: the reader's tests do not depend on prepare."""
    import json
    from pathlib import Path

    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    dtype = "uint16" if vocab <= 65536 else "uint32"
    splits, counts = {}, np.zeros(vocab, dtype=np.int64)
    for split, documents in (("train", train), ("heldout", heldout)):
        shards = []
        for k in range(0, len(documents), shard_documents):
            docs = documents[k : k + shard_documents]
            name = f"{split}-{k // shard_documents:05d}"
            ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
            ids.astype(np.dtype(dtype).newbyteorder("<")).tofile(directory / f"{name}.bin")
            starts = np.cumsum([0] + [len(d) for d in docs[:-1]]).astype("<i8")
            starts.tofile(directory / f"{name}.idx")
            entry = {
                "file": f"{name}.bin",
                "index": f"{name}.idx",
                "mask": None,
                "tokens": len(ids),
                "documents": len(docs),
            }
            if masks is not None:
                mask = np.concatenate([np.asarray(m, dtype=np.uint8) for m in masks[split][k : k + shard_documents]])
                mask.tofile(directory / f"{name}.mask")
                entry["mask"] = f"{name}.mask"
            if split == "train":
                counts += np.bincount(ids, minlength=vocab)
            shards.append(entry)
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": len(documents), "shards": shards}
    np.save(directory / "token_counts.npy", counts)
    index = {"format": "deepmoe-tokens", "version": 1, "dtype": dtype, "chat": chat,
             "tokenizer": {"file": "tokenizer.json", "sha256": "test", "vocab_size": vocab, "eot_id": 0},
             "splits": splits, "token_counts": "token_counts.npy", "sources": [], "heldout_fraction": 0.1}  # fmt: skip
    (directory / "index.json").write_text(json.dumps(index))
    return directory
