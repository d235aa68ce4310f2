"""The serving engine (docs/design.md#serving): one thread decodes every active request together over one KV
cache, with continuous batching.

A waiting request joins as soon as a row is free: it is prefilled alone, then its cache rows are placed into
the shared cache left-padded to the current length (the padding marked 0 in the attention mask, so it is
neither attended to nor counted in the positions: the row decodes exactly as it would alone). A finished
request's row leaves the cache at once; leading columns that are padding in every row are dropped then, so
the cache is never longer than its longest row. Each row samples with its own settings and generator, and
may carry its own expert mask (`Steering`), so a request's tokens do not depend on what it was batched with.

The engine works on token ids; text, stop strings and the HTTP protocol are the app's (`app.py`).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from deepmoe.model.attention import KVCache
from deepmoe.model.generate import eos_ids, sample_next
from deepmoe.moe.router import RowExpertMask

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's waiting queue holds `max_queue` requests already."""


@dataclass
class TokenInfo:
    """One token of a response (or of the prompt, with echo)."""

    id: int
    logprob: float | None = None
    """log p(token | what precedes it); None for the first prompt token."""
    top: list[tuple[int, float]] | None = None
    """The `logprobs` likeliest tokens at this position with their log-probabilities, best first."""
    routing: list[list[int]] | None = None
    """Per MoE layer (`Engine.moe_layers` order) the experts the token was routed to, top first."""


@dataclass
class PromptDone:
    """The prompt's tokens (log-probabilities and routing when asked): the first event of every request."""

    tokens: list[TokenInfo]


@dataclass
class Finished:
    """The last event of a request. reason: "stop" (an end-of-sequence token), "length" (max_tokens),
    "cancelled" or "error" (`message` says what)."""

    reason: str
    message: str = ""


Event = TokenInfo | PromptDone | Finished


@dataclass
class Steering:
    """A request's own expert masks: per MoE layer index, the experts never chosen and those always chosen."""

    disabled: dict[int, list[int]] = field(default_factory=dict)
    forced: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    """What the engine generates for one prompt; `emit` receives its events (from the engine thread)."""

    prompt: list[int]
    emit: Callable[[Event], None]
    max_tokens: int = 16
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    """How many alternatives per token (0: the chosen token's log-probability only; None: none)."""
    prompt_logprobs: bool = False
    """Log-probabilities of the prompt tokens too (echo)."""
    return_routing: bool = False
    steering: Steering | None = None
    stop_ids: frozenset[int] | None = None
    """Token ids that end generation (default: the engine's end-of-sequence ids)."""
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating (the client went away, or a stop string was found); the engine frees the row."""
        self.cancelled.set()


@dataclass
class _Row:
    request: GenerationRequest
    next_token: int  # sampled, not yet in the cache
    generated: int
    generator: torch.Generator
    row_mask: dict[int, Tensor] | None
    pending: TokenInfo | None = None  # sampled, emitted once its routing is known (return_routing)
    finish: Finished | None = None  # emitted after `pending`


@dataclass
class EngineStats:
    steps: int = 0
    """Batched decoding steps run."""
    tokens: int = 0
    """Tokens generated."""
    peak_batch: int = 0
    """The most rows decoded together."""
    batch_sizes: list[int] = field(default_factory=list)
    """The batch size of each of the last decoding steps (at most 10,000)."""


class Engine:
    """Continuous batching over `model` (a `DeepSeekForCausalLM`): up to `max_batch` requests decode together,
    up to `max_queue` wait; a prompt plus its max_tokens fit in `max_context` tokens (default and upper bound:
    the model's max_position_embeddings). `eos_token_id` as in `generate` (None: the config's)."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int = 8,
        max_context: int | None = None,
        max_queue: int = 64,
        eos_token_id: int | list[int] | None = None,
    ) -> None:
        limit = model.config.max_position_embeddings
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_context is not None and (not isinstance(max_context, int) or not 1 <= max_context <= limit):
            raise ValueError(
                f"max_context must be an integer in [1, {limit}] (max_position_embeddings), got {max_context!r}"
            )
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = max_context or limit
        self.vocab_size = model.config.vocab_size
        self.eos = frozenset(eos_ids(eos_token_id, model))
        self.device = next(model.parameters()).device
        n_main = model.config.num_hidden_layers
        self.moe_layers = sorted(i for i in model.moe_layers() if i < n_main)
        """The MoE layers whose routing `TokenInfo.routing` lists, in this order."""
        self.stats = EngineStats()
        self._waiting: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._mask: Tensor | None = None  # [B, T] long, 0 at padding
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._capture = False
        self._captured: dict[int, Tensor] = {}
        self._hooks: list = []

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            gates = self.model.moe_layers()  # the routing of return_routing requests, read off the routers
            self._hooks = [gates[i].gate.register_forward_hook(self._hook(i)) for i in self.moe_layers]
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="deepmoe-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the engine thread; requests still waiting or running end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---- requests ----------------------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """ValueError naming the field for a request the engine cannot run."""
        prompt = request.prompt
        if not prompt:
            raise ValueError("prompt: is empty (give at least one token)")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) > self.max_context:
            raise ValueError(
                f"prompt: {len(prompt)} tokens is longer than the context of {self.max_context} tokens (--max-context)"
            )
        if len(prompt) + request.max_tokens > self.max_context:
            raise ValueError(
                f"max_tokens: the prompt's {len(prompt)} tokens + max_tokens={request.max_tokens} exceed the context "
                f"of {self.max_context} tokens (--max-context)"
            )
        seed = request.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
            raise ValueError(f"seed: must be an integer in [-2**63, 2**64), got {seed!r}")
        if request.steering is not None:
            self._row_mask(request.steering)

    def submit(self, request: GenerationRequest) -> None:
        """Queue `request` (checked first: ValueError); QueueFull when `max_queue` requests wait already."""
        self.check(request)
        with self._cond:
            if self._stopping or self._thread is None:
                raise RuntimeError("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"the server is busy: {len(self._waiting)} requests are waiting already (--max-queue "
                    f"{self.max_queue}); retry later"
                )
            self._waiting.append(request)
            self._cond.notify_all()

    def generate(self, request_fields: dict | None = None, **kwargs) -> tuple[list[TokenInfo], list[TokenInfo], str]:
        """Run one request to its end from a thread other than the engine's: (prompt tokens, new tokens, finish
        reason). The keyword arguments are `GenerationRequest`'s (without emit)."""
        done = threading.Event()
        events: list[Event] = []

        def emit(event: Event) -> None:
            events.append(event)
            if isinstance(event, Finished):
                done.set()

        self.submit(GenerationRequest(emit=emit, **{**(request_fields or {}), **kwargs}))
        done.wait()
        prompt = next((e.tokens for e in events if isinstance(e, PromptDone)), [])
        finish = events[-1]
        if finish.reason == "error":
            raise RuntimeError(finish.message)
        return prompt, [e for e in events if isinstance(e, TokenInfo)], finish.reason

    # ---- steering ----------------------------------------------------------------------------------------
    def _row_mask(self, steering: Steering) -> dict[int, Tensor]:
        """{layer: [2, N_r] bool (disabled; forced)}: the request's masks, checked by each layer's router (with
        its global mask); ValueError naming the layer otherwise."""
        gates = self.model.moe_layers()
        layers = sorted(set(steering.disabled) | set(steering.forced))
        unknown = [i for i in layers if i not in self.moe_layers]
        if unknown:
            raise ValueError(f"deepmoe: steering names layers {unknown}, but the MoE layers are {self.moe_layers}")
        masks = {}
        for i in layers:
            try:
                mask = gates[i].gate.row_mask([(steering.disabled.get(i), steering.forced.get(i))])
            except ValueError as error:
                raise ValueError(
                    f"deepmoe: layer {i}: {str(error).removeprefix('row 0: ').removeprefix('row 0 ')}"
                ) from None
            masks[i] = torch.cat([mask.disabled, mask.forced])
        return masks

    # ---- the engine thread -------------------------------------------------------------------------------
    def _hook(self, layer: int):
        def hook(module, args, output) -> None:
            if self._capture:
                self._captured[layer] = output.topk_idx

        return hook

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as error:  # noqa: BLE001 - one bad step must not stop the server
                    logger.exception("serving engine step failed")
                    for row in self._rows:
                        row.request.emit(Finished("error", f"{type(error).__name__}: {error}"))
                    self._rows, self._cache, self._mask = [], None, None
        for row in self._rows:
            row.request.emit(Finished("cancelled", "the server is shutting down"))
        with self._cond:
            for request in self._waiting:
                request.emit(Finished("cancelled", "the server is shutting down"))
            self._waiting.clear()
        self._rows, self._cache, self._mask = [], None, None

    def _next_waiting(self) -> GenerationRequest | None:
        with self._cond:
            while self._waiting:
                request = self._waiting.popleft()
                if not request.cancelled.is_set():
                    return request
                request.emit(Finished("cancelled"))
        return None

    def _admit(self) -> None:
        """Prefill waiting requests into free rows."""
        while len(self._rows) < self.max_batch:
            request = self._next_waiting()
            if request is None:
                return
            try:
                self._prefill(request)
            except Exception as error:  # noqa: BLE001 - that request fails, the others go on
                logger.exception("prefill failed")
                request.emit(Finished("error", f"{type(error).__name__}: {error}"))

    def _forward(self, input_ids: Tensor, cache: KVCache, mask: Tensor | None, masks, capture: bool):
        self._capture, self._captured = capture, {}
        try:
            extra = {} if masks is None else {"expert_masks": masks}
            out = self.model(input_ids, past_key_values=cache, attention_mask=mask, output_routing_stats=False, **extra)
        finally:
            self._capture = False
        return out.logits

    def _routing(self, rows: int, per_row: int) -> list[list[list[list[int]]]]:
        """[row][token][layer] → expert ids, from the captured top-k ([rows·per_row, K] per layer)."""
        layers = [self._captured[i].view(rows, per_row, -1).tolist() for i in self.moe_layers]
        return [[[layer[r][t] for layer in layers] for t in range(per_row)] for r in range(rows)]

    def _prefill(self, request: GenerationRequest) -> None:
        row_mask = self._row_mask(request.steering) if request.steering is not None else None
        ids = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        cache = KVCache(max_length=len(request.prompt) + request.max_tokens)
        logits = self._forward(ids, cache, None, self._stack_masks([row_mask], 1), request.return_routing)[0]
        routing = self._routing(1, len(request.prompt))[0] if request.return_routing else None
        prompt = [TokenInfo(t, routing=routing[i] if routing else None) for i, t in enumerate(request.prompt)]
        if request.prompt_logprobs:
            logp = torch.log_softmax(logits[:-1].float(), -1)
            chosen = logp.gather(1, ids[0, 1:, None])[:, 0].tolist()
            top = self._top(logp, request.logprobs)
            for i, info in enumerate(prompt[1:]):
                info.logprob = chosen[i]
                info.top = top[i] if top is not None else None
        request.emit(PromptDone(prompt))
        if request.max_tokens == 0:
            request.emit(Finished("length"))
            return
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        row = _Row(request, 0, 0, torch.Generator(device=self.device).manual_seed(seed), row_mask)
        if self._advance(row, logits[-1:], None):
            self._join(row, cache)

    @staticmethod
    def _top(logp: Tensor, n: int | None) -> list[list[tuple[int, float]]] | None:
        if not n:
            return None
        values, ids = logp.topk(min(n, logp.shape[-1]), dim=-1)
        return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]

    def _advance(self, row: _Row, logits: Tensor, input_routing: list[list[int]] | None) -> bool:
        """Emit what the row's last input completes and sample its next token from logits [1, V]; False when
        the row leaves the batch.

        A token's routing is known once it has been fed to the model: with return_routing, each new token is
        held back one step (`pending`) and emitted with the routing of that step, and a finished row stays for
        one more step to route its last token."""
        request = row.request
        if row.pending is not None:
            row.pending.routing = input_routing
            request.emit(row.pending)
            row.pending = None
        if row.finish is not None:
            request.emit(row.finish)
            return False
        if request.cancelled.is_set():
            request.emit(Finished("cancelled"))
            return False
        sampling = request.temperature > 0
        top_p = request.top_p if sampling and request.top_p < 1 else None
        temperature = request.temperature if sampling else 1.0
        token = int(sample_next(logits, sampling, temperature, None, top_p, row.generator)[0])
        info = TokenInfo(token)
        if request.logprobs is not None:
            logp = torch.log_softmax(logits.float(), -1)
            info.logprob = float(logp[0, token])
            top = self._top(logp, request.logprobs)
            info.top = top[0] if top is not None else None
        row.next_token, row.generated = token, row.generated + 1
        self.stats.tokens += 1
        stops = request.stop_ids if request.stop_ids is not None else self.eos
        finish = Finished("stop") if token in stops else None
        if finish is None and row.generated >= request.max_tokens:
            finish = Finished("length")
        if request.return_routing:
            row.pending, row.finish = info, finish
            return True
        request.emit(info)
        if finish is not None:
            request.emit(finish)
            return False
        return True

    def _join(self, row: _Row, cache: KVCache) -> None:
        """Place a prefilled row's cache into the shared one, left-padded to a common length."""
        new_layers = cache.layers
        new_mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long, device=self.device)
        if self._cache is None:
            layers, mask = new_layers, new_mask
        else:
            old_layers, old_len, new_len = self._cache.layers, self._mask.shape[1], new_mask.shape[1]
            length = max(old_len, new_len)
            layers = {
                i: tuple(
                    torch.cat([_left_pad(a, length), _left_pad(b, length)], 0)
                    for a, b in zip(old_layers[i], new_layers[i], strict=True)
                )
                for i in old_layers
            }
            mask = torch.cat([_left_pad(self._mask, length), _left_pad(new_mask, length)], 0)
        self._rows.append(row)
        self._set_cache(layers, mask)

    def _set_cache(self, layers: dict[int, tuple[Tensor, ...]], mask: Tensor) -> None:
        """A fresh cache holding `layers` without the leading columns that are padding in every row."""
        lead = int((mask.cumsum(1) == 0).sum(1).min())
        headroom = max((r.request.max_tokens - r.generated for r in self._rows), default=0)
        cache = KVCache(max_length=mask.shape[1] - lead + headroom)
        for i, tensors in layers.items():
            cache.update(i, *(t[:, lead:] for t in tensors))
        self._cache, self._mask = cache, mask[:, lead:].contiguous()

    def _stack_masks(self, row_masks: list[dict[int, Tensor] | None], rows: int) -> dict[int, RowExpertMask] | None:
        """The rows' masks as the model's `expert_masks` (rows without steering: no expert masked)."""
        layers = sorted({i for m in row_masks if m for i in m})
        if not layers:
            return None
        gates = self.model.moe_layers()
        out = {}
        for i in layers:
            n = gates[i].config.n_routed_experts
            none = torch.zeros(2, n, dtype=torch.bool, device=self.device)
            both = torch.stack([m[i] if m and i in m else none for m in row_masks], 1)  # [2, B, N]
            out[i] = RowExpertMask(both[0], both[1])
        return out

    def _step(self) -> None:
        """One decoding step for every row; finished rows leave the cache."""
        rows = self._rows
        n = len(rows)
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, n)
        if len(self.stats.batch_sizes) < 10_000:
            self.stats.batch_sizes.append(n)
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(n, 1)], dim=1)
        capture = any(r.request.return_routing for r in rows)
        masks = self._stack_masks([r.row_mask for r in rows], n)
        logits = self._forward(ids, self._cache, self._mask, masks, capture)[:, -1]
        routing = self._routing(n, 1) if capture else None
        keep = [
            i for i, r in enumerate(rows) if self._advance(r, logits[i : i + 1], routing[i][0] if routing else None)
        ]
        if len(keep) < n:
            self._rows = [rows[i] for i in keep]
            if not keep:
                self._cache, self._mask = None, None
                return
            index = torch.tensor(keep, device=self.device)
            layers = {i: tuple(t.index_select(0, index) for t in ts) for i, ts in self._cache.layers.items()}
            self._set_cache(layers, self._mask.index_select(0, index))


def _left_pad(t: Tensor, length: int) -> Tensor:
    """t [B, S, ...] → [B, length, ...] with zeros before it."""
    if t.shape[1] == length:
        return t
    return torch.cat([t.new_zeros(t.shape[0], length - t.shape[1], *t.shape[2:]), t], 1)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Whether the engine has nothing waiting or running within `timeout` seconds (tests, shutdown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.active and not engine.waiting:
            return True
        time.sleep(0.01)
    return False
