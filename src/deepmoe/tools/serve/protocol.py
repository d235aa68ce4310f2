"""The OpenAI-compatible request bodies (pydantic, unknown fields refused) and the text side of a response:
incremental detokenisation, stop strings, log-probabilities in OpenAI's two shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deepmoe.model.generate import IncrementalDecoder
from deepmoe.tools.serve.engine import TokenInfo

MAX_LOGPROBS = 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DeepMoEOptions(_Body):
    """The request's `deepmoe` field: steering (a steer.json path on the server, or experts per layer) and
    whether to return each token's routing."""

    steer: str | None = None
    disabled: dict[str, list[int]] | None = None
    forced: dict[str, list[int]] | None = None
    return_routing: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    deepmoe: DeepMoEOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The request's stop strings; ValueError (naming `stop`) for more than 4 or an empty one."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ValueError(f"stop: at most 4 stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop: a stop string must not be empty")
    return stops


class TextOutput:
    """One choice's tokens and text as they arrive: text decoded in whole characters, cut before the first
    stop string (`stopped` then), streamed in `delta`s that hold back what could still start a stop string."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.sent_tokens = 0
        self.tokens: list[TokenInfo] = []
        self.offsets: list[int] = []
        self.stopped = False

    def add(self, info: TokenInfo) -> bool:
        """Append a token; True when the text now holds a stop string (the text is cut before it)."""
        if self.stopped:
            return True
        self.offsets.append(len(self.text))
        self.tokens.append(info)
        if self.decoder is not None:
            return self._grow(self.decoder.push(info.id))
        return False

    def flush(self) -> None:
        if self.decoder is not None and not self.stopped:
            self._grow(self.decoder.flush())

    def _grow(self, piece: str) -> bool:
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.text, self.stopped = self.text[:cut], True
            keep = sum(1 for o in self.offsets if o < cut) or len(self.tokens)
            self.tokens, self.offsets = self.tokens[:keep], self.offsets[:keep]
        return self.stopped

    def delta(self, final: bool = False) -> tuple[str, list[TokenInfo], list[int]]:
        """The text not streamed yet (all of it when `final` or stopped), the tokens not streamed yet and their
        text offsets."""
        upto = len(self.text) if final or self.stopped else len(self.text) - self.hold
        text = self.text[self.sent : max(upto, self.sent)]
        self.sent = max(upto, self.sent)
        start, self.sent_tokens = self.sent_tokens, len(self.tokens)
        return text, self.tokens[start:], self.offsets[start:]


def token_text(tokenizer, token: int) -> str:
    """A token as text for log-probabilities (its id as "token_id:N" without a tokenizer)."""
    return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else f"token_id:{token}"


def completion_logprobs(tokenizer, tokens: list[TokenInfo], offsets: list[int]) -> dict:
    """The completions API's `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    top = None
    if any(t.top is not None for t in tokens):
        top = [
            None if t.top is None else {token_text(tokenizer, i): lp for i, lp in t.top}  # best first
            for t in tokens
        ]
    return {
        "tokens": [token_text(tokenizer, t.id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, tokens: list[TokenInfo]) -> dict:
    """The chat API's `logprobs` object ({"content": [{token, logprob, bytes, top_logprobs}]})."""

    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in (t.top or [])]} for t in tokens
        ]
    }
