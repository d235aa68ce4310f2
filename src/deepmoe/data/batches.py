"""Batches: packing a token stream into fixed-length windows in a seeded, resumable order, held-out
batches, and the unigram entropy baseline."""

from __future__ import annotations

import hashlib

import torch


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


def _epoch_seed(seed: int, epoch: int, source: int = 0) -> int:
    key = f"deepmoe.PackedBatches:{seed}:{epoch}" + (f":{source}" if source else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(count: int, seed: int, epoch: int, source: int = 0) -> torch.Tensor:
    """The order in which epoch `epoch` visits `count` windows (of mixture source `source`), seeded by `seed`."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch, source)))


class PackedBatches:
    """Endless batches of fixed-length windows ``[batch_size, seq_len]`` from a token stream; deterministic
    from ``seed``; resumable.

    The stream is cut into ``len(tokens) // seq_len`` non-overlapping windows (the tail shorter than a window
    is not used). Each epoch visits every window once, in a permutation seeded by ``(seed, epoch)``; a batch
    that reaches the end of an epoch is completed from the start of the next one.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, rows: slice = slice(None)):
        tokens = _check_stream(tokens, batch_size, seq_len)
        self.rows = rows
        """The rows of each batch returned (a torchrun rank's share); the position advances by whole batches."""
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
            self._order = epoch_permutation(self.num_windows, self.seed, self.epoch)
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
        return self._windows[torch.cat(picks)[self.rows]]

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
