"""Decoding (SPEC M6): greedy and sampled generation with the KV cache, and greedy speculative
decoding that drafts with the multi-token-prediction module and verifies with the main model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deepmoe.model.attention import KVCache
from deepmoe.model.decoder import DeepSeekForCausalLM


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
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _check_generation_args(model: DeepSeekForCausalLM, input_ids: Tensor, max_new_tokens: int) -> None:
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
    model: DeepSeekForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """input_ids [B, S] → [B, S + n]: the prompt followed by up to `max_new_tokens` new tokens.

    Rows that produced `eos_token_id` are padded with it until every row has. `streamer` is
    called with each new column of tokens [B]. Without the cache every step re-runs the
    whole sequence (the reference the cached path is tested against).
    """
    _check_generation_args(model, input_ids, max_new_tokens)
    cache = KVCache() if use_cache else None
    tokens = input_ids
    step_input = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else tokens, past_key_values=cache).logits[:, -1]
        next_token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
        if streamer is not None:
            streamer(next_token)
        if eos_token_id is not None and finished.all():
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
    model: DeepSeekForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    streamer: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Greedy decoding that drafts one token with the first MTP module and verifies it with the main
    model: the tokens equal plain greedy decoding; accepted drafts save main-model passes.

    input_ids [1, S] → ([1, S + n], stats).
    """
    if not model.model.mtp:
        raise ValueError("speculative decoding needs a model with num_nextn_predict_layers >= 1")
    _check_generation_args(model, input_ids, max_new_tokens)
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence [1, seq], got {tuple(input_ids.shape)}")
    mtp = model.model.mtp[0]
    cache, stats = KVCache(), SpeculativeStats()
    n_main = model.config.num_hidden_layers

    def run_main(ids: Tensor):
        out = model(ids, past_key_values=cache)
        return out.logits.argmax(-1), out.hidden_states  # [1, s], [1, s, H]

    def draft(hidden: Tensor, next_ids: Tensor) -> Tensor:
        """MTP over new positions: h^0_i with Emb(t_{i+1}) → the draft for the token after t_{i+1}."""
        start = cache.get_seq_length(n_main)
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        _, normed, _ = mtp(hidden, model.model.embed_tokens(next_ids), positions, cache)
        return model.head(normed[:, -1:]).argmax(-1)  # [1, 1]

    emitted: list[Tensor] = []

    def emit(token: Tensor) -> bool:
        emitted.append(token)
        if streamer is not None:
            streamer(token.view(1))
        return (eos_token_id is not None and int(token) == eos_token_id) or len(emitted) >= max_new_tokens

    if max_new_tokens == 0:
        return input_ids, stats
    predictions, hidden = run_main(input_ids)
    token = predictions[:, -1:]  # t_n
    if emit(token):
        return torch.cat([input_ids, *emitted], dim=1), stats
    guess = draft(hidden, torch.cat([input_ids[:, 1:], token], dim=1))
    while True:
        length = cache.get_seq_length()
        predictions, hidden = run_main(torch.cat([token, guess], dim=1))  # verify t_n and the draft
        stats.drafted += 1
        if torch.equal(predictions[:, :1], guess):
            stats.accepted += 1
            if emit(guess) or emit(predictions[:, 1:]):
                break
            new_hidden, next_ids = hidden, torch.cat([guess, predictions[:, 1:]], dim=1)
            token = predictions[:, 1:]
        else:
            cache.crop(length + 1)  # the draft's position held a wrong token: forget it
            if emit(predictions[:, :1]):
                break
            new_hidden, next_ids = hidden[:, :1], predictions[:, :1]
            token = predictions[:, :1]
        guess = draft(new_hidden, next_ids)
    return torch.cat([input_ids, *emitted], dim=1), stats
