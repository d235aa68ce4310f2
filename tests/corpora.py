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
