"""Decoding (docs/design.md#m6-generation): greedy and sampled generation with the KV cache, for left-padded
batches too, greedy
speculative decoding that drafts with the multi-token-prediction module and verifies with the main model, and
incremental detokenisation of the streamed ids (`IncrementalDecoder`, `TextStreamer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deepmoe.model.attention import KVCache


def sample_next(
    logits: Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits [B, V] → token ids [B]: argmax, or a sample after temperature, top-k and top-p (nucleus) filters."""
    if not do_sample:
        return logits.argmax(-1)
    check_sampling_args(True, temperature, top_k, top_p)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling_args(
    do_sample: bool, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> None:
    """ValueError (naming the argument) for a setting that is out of range or that decoding would ignore.

    temperature is a finite number >= 0, and > 0 when sampling; top_k an integer >= 1; top_p a number in (0, 1].
    do_sample=False decodes greedily: a temperature other than 1 (the default) or 0, a top_k or a top_p would
    have no effect there, so they are refused.
    """
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if do_sample:
        if temperature == 0:
            raise ValueError("temperature must be > 0 when sampling (do_sample=True); for greedy use do_sample=False")
        return
    unused = [f"{name}={value!r}" for name, value in (("top_k", top_k), ("top_p", top_p)) if value is not None]
    if temperature not in (0, 1):
        unused.insert(0, f"temperature={temperature!r}")
    if unused:
        raise ValueError(
            f"{', '.join(unused)} only appl{'ies' if len(unused) == 1 else 'y'} when sampling: set do_sample=True "
            f"(do_sample=False decodes greedily)"
        )


def eos_ids(eos_token_id, model: nn.Module) -> list[int]:
    """The stop ids (generation's and the server's): `eos_token_id` (an int or a list of ints; [] = never stop),
    else the config's."""
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
        if eos_token_id is None:
            return []
    ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be None, an integer >= 0 or a list of them, got {eos_token_id!r}")
    return ids


def _pad_id(pad_token_id: int | None, model: nn.Module, eos: list[int]) -> int:
    """What finished rows are filled with: `pad_token_id`, else config.pad_token_id, else the (first) EOS id."""
    vocab = model.config.vocab_size
    if pad_token_id is not None:
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or not 0 <= pad_token_id < vocab:
            raise ValueError(f"pad_token_id must be None or an integer in [0, {vocab}), got {pad_token_id!r}")
        return pad_token_id
    if model.config.pad_token_id is not None:
        return model.config.pad_token_id
    return eos[0] if eos else 0


def _check_attention_mask(attention_mask, input_ids: Tensor) -> Tensor | None:
    """A [B, S] tensor of 0/1 (left padding: each row's zeros come first) → int64 on input_ids' device."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise ValueError(f"attention_mask must be a tensor [batch, seq] of 0/1, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype.is_complex or not ((attention_mask == 0) | (attention_mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if (mask[:, 1:] < mask[:, :-1]).any() or not mask[:, -1].all():
        raise ValueError(
            "attention_mask must be left padding: in each row the zeros come first and the last token is real "
            "(a row with no token is refused too)"
        )
    return mask


def left_padded(rows: list[list[int]], pad_id: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """Token id lists of any lengths → (input_ids [B, S], attention_mask [B, S]) padded on the left with `pad_id`
    (mask 0), the batch layout `generate` and `generate_speculative` take."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Run the model as at inference (eval: no capacity dropping, so one row's tokens, padding included,
    cannot change another's routing), then restore every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_generation_args(model: nn.Module, input_ids: Tensor, max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    model._check_input(input_ids, 0)  # a tensor [batch, seq] of ids in the vocabulary, within the context
    total = input_ids.shape[-1] + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt + max_new_tokens = {total} tokens exceeds max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    *,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
) -> Tensor:
    """input_ids [B, S] → [B, S + n]: the prompt followed by up to `max_new_tokens` new tokens.

    do_sample=False decodes greedily; do_sample=True samples after `temperature` (> 0), `top_k` and `top_p`
    (see `check_sampling_args`: settings that would be ignored are refused). `attention_mask` [B, S] of 0/1
    marks left padding: a padded row then decodes exactly as its prompt alone (positions count from its
    first real token, padded keys are masked out). `eos_token_id` (an int or a list; default
    config.eos_token_id; [] never stops): a row that produced one is then filled with `pad_token_id`
    (default config.pad_token_id, else the EOS id) until every row has. `streamer` is called with each new
    column of tokens [B]. Without the cache every step re-runs the whole sequence (the reference the cached
    path is tested against). The model runs in eval mode (its modes are restored afterwards).
    """
    _check_generation_args(model, input_ids, max_new_tokens)
    check_sampling_args(do_sample, temperature, top_k, top_p)
    mask = _check_attention_mask(attention_mask, input_ids)
    eos = eos_ids(eos_token_id, model)
    pad = _pad_id(pad_token_id, model, eos)
    eos_tensor = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    cache = KVCache(max_length=input_ids.shape[1] + max_new_tokens) if use_cache else None
    tokens = input_ids
    step_input = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    with _inference(model):
        for _ in range(max_new_tokens):
            extra = {} if mask is None else {"attention_mask": mask}
            out = model(step_input if use_cache else tokens, past_key_values=cache, output_routing_stats=False, **extra)
            logits = out.logits[:, -1]
            next_token = sample_next(logits, do_sample, temperature, top_k, top_p, generator).to(tokens.dtype)
            if eos:
                next_token = next_token.masked_fill(finished, pad)
                finished |= torch.isin(next_token, eos_tensor)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if streamer is not None:
                streamer(next_token)
            if eos and finished.all():
                break
    return tokens


@dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def generate_speculative(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    streamer: Callable[[Tensor], None] | None = None,
    *,
    attention_mask: Tensor | None = None,
    pad_token_id: int | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Greedy decoding that drafts one token per row with the first MTP module and verifies it with the main
    model: the tokens equal plain greedy decoding (`generate`, do_sample=False) row by row, and each accepted
    draft saves a main-model pass.

    input_ids [B, S] → ([B, S + n], stats), with `attention_mask` (left padding), `eos_token_id` and
    `pad_token_id` as in `generate`. Every step verifies [t, draft] for all rows at once; rows accept or reject
    their drafts independently: a rejected draft's cache slot stays, masked out of attention and not counted
    in the positions (when every row rejects, the slot is dropped instead). `streamer` (one sequence only) is
    called with each new token [1]. Greedy only: there is no sampling here.
    """
    if not model.model.mtp:
        raise ValueError("speculative decoding needs a model with num_nextn_predict_layers >= 1")
    if model.config.model_type == "deepseek_v4":
        raise ValueError("speculative decoding does not take DeepSeek-V4: its compressors' cache cannot drop a draft")
    _check_generation_args(model, input_ids, max_new_tokens)
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError(f"a streamer takes one sequence: input_ids has {input_ids.shape[0]} rows")
    mask = _check_attention_mask(attention_mask, input_ids)
    eos = eos_ids(eos_token_id, model)
    pad = _pad_id(pad_token_id, model, eos)
    with _inference(model):
        return _speculative(model, input_ids, mask, max_new_tokens, eos, pad, streamer)


class _Emitted:
    """Each row's new tokens: up to `limit`, nothing after its EOS; `done` once a row has all it will get."""

    def __init__(self, rows: int, limit: int, eos: list[int], streamer: Callable[[Tensor], None] | None) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.limit, self.eos, self.streamer = limit, set(eos), streamer
        self.done = [limit == 0] * rows

    def add(self, row: int, token: int) -> None:
        if self.done[row]:
            return
        self.tokens[row].append(token)
        if self.streamer is not None:
            self.streamer(torch.tensor([token]))
        self.done[row] = token in self.eos or len(self.tokens[row]) >= self.limit

    def padded(self, pad: int, like: Tensor) -> Tensor:
        """[B, n], n the longest row (as `generate` stops once every row is finished), shorter rows padded."""
        n = max(len(t) for t in self.tokens)
        return torch.tensor([t + [pad] * (n - len(t)) for t in self.tokens], dtype=like.dtype, device=like.device)


def _speculative(
    model: nn.Module,
    input_ids: Tensor,
    mask: Tensor | None,
    max_new_tokens: int,
    eos: list[int],
    pad: int,
    streamer: Callable[[Tensor], None] | None,
) -> tuple[Tensor, SpeculativeStats]:
    mtp, embed = model.model.mtp[0], model.model.embed_tokens
    n_main = model.config.num_hidden_layers
    rows, prompt = input_ids.shape
    cache, stats = KVCache(max_length=prompt + 2 * max_new_tokens), SpeculativeStats()
    emitted = _Emitted(rows, max_new_tokens, eos, streamer)
    if max_new_tokens == 0:
        return input_ids, stats
    valid = mask if mask is not None else torch.ones_like(input_ids)  # [B, T] over the cache slots: 0 = masked
    every_row = torch.arange(rows, device=input_ids.device)

    def draft(hidden: Tensor, next_ids: Tensor, pick: Tensor) -> Tensor:
        """MTP over the new slots: h^0_i with Emb(t_{i+1}) → the draft for t_{i+2}, read at slot `pick` [B]."""
        start = cache.get_seq_length(n_main)
        key_mask = None if bool(valid.all()) else valid.bool()
        if key_mask is None:
            positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        else:
            positions = (valid.cumsum(-1) - 1).clamp(min=0)[:, start:]
        _, normed, _ = mtp(hidden, embed(next_ids), positions, cache, False, key_mask)
        return model.head(normed[every_row, pick]).argmax(-1)  # [B]

    out = model(input_ids, past_key_values=cache, attention_mask=valid, output_routing_stats=False)
    token = out.logits[:, -1].argmax(-1)  # [B], t_n: the first new token, not yet in the cache
    for row, value in enumerate(token.tolist()):
        emitted.add(row, value)
    last = torch.full((rows,), prompt - 1, device=input_ids.device)
    guess = draft(out.hidden_states, torch.cat([input_ids[:, 1:], token[:, None]], dim=1), last)
    while not all(emitted.done):
        valid = torch.cat([valid, valid.new_ones(rows, 2)], dim=1)
        out = model(torch.stack([token, guess], 1), past_key_values=cache, attention_mask=valid,
                    output_routing_stats=False)  # fmt: skip
        predicted = out.logits.argmax(-1)  # [B, 2]: the token after t_n, and after the draft
        accepted = predicted[:, 0] == guess
        active = [not d for d in emitted.done]
        stats.drafted += sum(active)
        stats.accepted += sum(a and ok for a, ok in zip(active, accepted.tolist(), strict=True))
        for row, (ok, first, second) in enumerate(zip(accepted.tolist(), *predicted.t().tolist(), strict=True)):
            emitted.add(row, first)  # = the draft where accepted
            if ok:
                emitted.add(row, second)
        token = torch.where(accepted, predicted[:, 1], predicted[:, 0])
        if not accepted.any():  # no row keeps its draft's slot: drop it
            cache.crop(cache.get_seq_length() - 1)
            valid = valid[:, :-1]
            guess = draft(out.hidden_states[:, :1], predicted[:, :1], torch.zeros_like(last))
        else:
            valid[:, -1] = accepted.to(valid.dtype)  # a rejected draft's slot is masked out from now on
            next_ids = torch.where(accepted[:, None], torch.stack([guess, predicted[:, 1]], 1), predicted[:, :1])
            guess = draft(out.hidden_states, next_ids, accepted.long())
    return torch.cat([input_ids, emitted.padded(pad, input_ids)], dim=1), stats


class IncrementalDecoder:
    """Token ids in, text out in pieces that hold only whole characters, for streaming.

    A byte-level BPE splits a multi-byte character (東, é, —, “) over several tokens, so decoding one token at a
    time prints U+FFFD. `push` decodes a window of the ids (from the last piece written on) and returns the new
    text once it no longer ends in U+FFFD (an unfinished character); `flush` returns whatever is left, e.g. a
    truly invalid byte sequence at the end. The pieces joined equal `tokenizer.decode(all ids)`.

    `tokenizer` is anything with `decode(list[int], **decode_kwargs) -> str` (a `tokenizers.Tokenizer`, a
    transformers tokenizer).
    """

    def __init__(self, tokenizer, **decode_kwargs) -> None:
        self.tokenizer = tokenizer
        self.decode_kwargs = decode_kwargs
        self.ids: list[int] = []
        self._start = 0  # the window: ids[_start:_done] decode to the text already returned last time
        self._done = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def _take(self, complete_only: bool) -> str:
        written = self._decode(self.ids[self._start : self._done])
        text = self._decode(self.ids[self._start :])
        if complete_only and (len(text) <= len(written) or text.endswith("\ufffd")):
            return ""
        self._start, self._done = self._done, len(self.ids)
        return text[len(written) :]

    def push(self, ids: int | Iterable[int] | Tensor) -> str:
        """Add one id or several; the text they complete ("" while a character is unfinished)."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        self.ids.extend([int(ids)] if isinstance(ids, int) else (int(i) for i in ids))
        return self._take(complete_only=True)

    def flush(self) -> str:
        """The text not returned yet, unfinished characters included (as U+FFFD)."""
        return self._take(complete_only=False)


class TextStreamer:
    """A `streamer` for `generate` / `generate_speculative` on one sequence: hands each piece of whole
    characters to `on_text` (e.g. `lambda text: print(text, end="")`); call `end()` after generation for the rest."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], **decode_kwargs) -> None:
        self.decoder = IncrementalDecoder(tokenizer, **decode_kwargs)
        self.on_text = on_text

    def __call__(self, token: Tensor) -> None:
        if token.numel() != 1:
            raise ValueError(f"TextStreamer streams one sequence: got a column of {token.numel()} tokens")
        self._write(self.decoder.push(int(token.reshape(-1)[0])))

    def end(self) -> None:
        self._write(self.decoder.flush())

    def _write(self, text: str) -> None:
        if text:
            self.on_text(text)
