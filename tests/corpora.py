"""A stand-in for `deepmoe.data.TokenizedCorpus`: the fields the trainer reads, from given token ids."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StandInCorpus:
    train: torch.Tensor
    heldout: torch.Tensor
    vocab_size: int = 64
    tokenizer: object = None
    eot_id: int = 0
    domains: dict = field(default_factory=dict)
    corpus_id: str = "stand-in"
