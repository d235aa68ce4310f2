"""The HTTP side of serving (docs/design.md#serving): an OpenAI-compatible FastAPI app over an `Engine`.

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events
in OpenAI's chunk format when "stream": true), GET /deepmoe/info (what the routing viewer needs) and GET / (the
viewer). Errors come in OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(the message names the field), 404 for another model name, 503 when the engine's queue is full.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from deepmoe.tools.serve.engine import Engine, Finished, GenerationRequest, PromptDone, QueueFull, Steering, TokenInfo
from deepmoe.tools.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DeepMoEOptions,
    TextOutput,
    chat_logprobs,
    completion_logprobs,
    stop_strings,
)

STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": None}
        return JSONResponse({"error": error}, status_code=self.status)


def bad_request(error: ValueError) -> APIError:
    """A 400 from a ValueError whose message starts with "field: ..." (the field becomes `param`)."""
    message = str(error)
    field, sep, _ = message.partition(": ")
    return APIError(400, message, field if sep and " " not in field else None)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
PROMPT_FORMS = "must be a string, a list of strings, a list of token ids or a list of lists of token ids"


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for p in loc if p not in _TYPE_TAGS and "[" not in p]  # pydantic's union members: not fields
    field = ".".join(loc) or None
    if loc[:1] == ["prompt"]:
        return APIError(400, f"prompt: {PROMPT_FORMS}", "prompt")
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    message = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return APIError(400, f"{field}: {message}" if field else message, field)


def steering_from_options(options: DeepMoEOptions, engine: Engine) -> Steering | None:
    """The request's `deepmoe` steering: a steer.json file (its action's experts) or explicit experts."""
    from deepmoe.tools.steering_file import load_steering

    if options.steer is not None and (options.disabled or options.forced):
        raise ValueError("deepmoe.steer: give a steering file or disabled/forced experts, not both")
    if options.steer is not None:
        try:
            action, layers = load_steering(options.steer)
        except OSError as error:
            raise ValueError(f"deepmoe.steer: cannot read {options.steer}: {error.strerror}") from None
        except ValueError as error:
            raise ValueError(f"deepmoe.steer: {error}") from None
        kind = "disabled" if action == "disable" else "forced"
        return Steering(**{kind: {k: v for k, v in layers.items() if v}})
    if not options.disabled and not options.forced:
        return None
    parsed = {}
    for kind in ("disabled", "forced"):
        layers = {}
        for key, experts in (getattr(options, kind) or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"deepmoe.{kind}: layer {key!r} is not a layer index")
            layers[int(key)] = experts
        parsed[kind] = layers
    return Steering(**parsed)


class _Run:
    """The engine requests of one HTTP request (one per prompt), their events gathered on the event loop."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest]) -> None:
        self.engine, self.requests = engine, requests
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for index, request in enumerate(requests):
            request.emit = lambda event, i=index: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        for request in requests:
            try:
                engine.check(request)
            except ValueError as error:
                raise bad_request(error) from None
        try:
            for request in requests:
                engine.submit(request)
        except QueueFull as error:
            self.cancel()
            raise APIError(503, str(error), kind="server_overloaded") from None
        self.open = len(requests)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self, http: Request | None = None) -> AsyncIterator[tuple[int, TokenInfo | PromptDone | Finished]]:
        """The events in arrival order until every request has finished; with `http`, a client that hangs up
        cancels the requests (checked every half second)."""
        loop = asyncio.get_running_loop()
        check = loop.time() + 0.5
        while self.open:
            if http is not None and loop.time() >= check:
                check = loop.time() + 0.5
                if await http.is_disconnected():
                    self.cancel()
            try:
                index, event = await asyncio.wait_for(self.queue.get(), None if http is None else 0.5)
            except TimeoutError:
                continue
            if isinstance(event, Finished):
                self.open -= 1
            yield index, event


class _Choice:
    """What one prompt's response gathers: the prompt, the text output, the finish reason."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.out = TextOutput(tokenizer, stops)
        self.prompt: list[TokenInfo] = []
        self.finish: str | None = None
        self.error: str | None = None

    def take(self, event, request: GenerationRequest) -> None:
        if isinstance(event, PromptDone):
            self.prompt = event.tokens
        elif isinstance(event, TokenInfo):
            if self.out.add(event):
                request.cancel()  # a stop string: the engine frees the row
        else:
            self.out.flush()
            if event.reason == "error":
                self.error = event.message
            self.finish = "stop" if self.out.stopped else ("length" if event.reason == "cancelled" else event.reason)

    def routing(self, engine: Engine, tokenizer, tokens: list[TokenInfo] | None = None) -> dict:
        tokens = self.out.tokens if tokens is None else tokens
        texts = [tokenizer.decode([t.id]) if tokenizer is not None else str(t.id) for t in tokens]
        return {
            "layers": engine.moe_layers,
            "token_ids": [t.id for t in tokens],
            "tokens": texts,
            "routing": [t.routing for t in tokens],
        }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(
    engine: Engine,
    tokenizer=None,
    chat=None,
    model_name: str = "deepmoe",
) -> FastAPI:
    """The app over a started or not yet started `engine` (started with the app, stopped at its shutdown).
    `tokenizer` (a `tokenizers.Tokenizer`) for text prompts and text output; without one, prompts are token
    ids. `chat`: a `deepmoe.data.readers.ChatRenderer` for /v1/chat/completions (None: no chat)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="deepmoe", lifespan=lifespan, docs_url=None, redoc_url=None)
    engine.start()
    chat_stop = None
    if chat is not None and tokenizer is not None:
        eot = tokenizer.token_to_id(chat.eos_token) if chat.eos_token else None
        chat_stop = frozenset(engine.eos | ({eot} if eot is not None else set()))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return _validation_error(error).response()

    @app.exception_handler(404)
    async def _not_found(request: Request, error):
        return APIError(404, f"no route {request.method} {request.url.path}", kind="not_found_error").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, error):
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"model: {name!r} is not served here (this server serves {model_name!r})", "model",
                           "not_found_error")  # fmt: skip

    def encode(text: str, field: str) -> list[int]:
        if tokenizer is None:
            raise APIError(400, f"{field}: this server has no tokenizer: give the prompt as token ids", field)
        return tokenizer.encode(text).ids

    def options(body) -> tuple[Steering | None, bool]:
        if body.deepmoe is None:
            return None, False
        try:
            return steering_from_options(body.deepmoe, engine), body.deepmoe.return_routing
        except ValueError as error:
            raise bad_request(error) from None

    def sampling(body, prompt: list[int], max_tokens: int, **extra) -> GenerationRequest:
        steering, routing = options(body)
        return GenerationRequest(
            prompt=prompt,
            emit=lambda event: None,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            return_routing=routing,
            steering=steering,
            **extra,
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.active, "waiting": engine.waiting, "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "deepmoe"}
        return {"object": "list", "data": [{**card, "max_model_len": engine.max_context}]}

    @app.get("/deepmoe/info")
    async def info():
        cfg = engine.model.config
        return {
            "model": model_name,
            "moe_layers": engine.moe_layers,
            "n_routed_experts": cfg.moe_config(engine.moe_layers[0]).n_routed_experts if engine.moe_layers else 0,
            "num_experts_per_tok": cfg.moe_config(engine.moe_layers[0]).num_experts_per_tok if engine.moe_layers else 0,
            "max_context": engine.max_context,
            "chat": chat is not None and tokenizer is not None,
            "tokenizer": tokenizer is not None,
        }

    @app.get("/")
    async def viewer():
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "the routing viewer is not installed", kind="not_found_error")
        return FileResponse(page, media_type="text/html")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        try:
            stops = stop_strings(body.stop)
        except ValueError as error:
            raise bad_request(error) from None
        raw = body.prompt
        if isinstance(raw, str):
            prompts = [encode(raw, "prompt")]
        elif raw and all(isinstance(p, str) for p in raw):
            prompts = [encode(p, "prompt") for p in raw]
        elif raw and all(isinstance(p, list) for p in raw):
            prompts = list(raw)
        elif raw:
            prompts = [list(raw)]
        else:
            raise APIError(400, "prompt: is empty", "prompt")
        if any(not p for p in prompts):
            raise APIError(400, "prompt: is empty (no tokens)", "prompt")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing: use it with echo (the prompt's logprobs)",
                           "max_tokens")  # fmt: skip
        prompt_logprobs = body.echo and body.logprobs is not None
        requests = [
            sampling(body, p, body.max_tokens, logprobs=body.logprobs, prompt_logprobs=prompt_logprobs) for p in prompts
        ]
        run = _Run(engine, requests)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [_Choice(tokenizer, stops) for _ in requests]

        def prompt_text(choice: _Choice) -> str:
            ids = [t.id for t in choice.prompt]
            return tokenizer.decode(ids) if tokenizer is not None else ""

        def logprobs_of(choice: _Choice, tokens: list[TokenInfo], echo: bool) -> dict | None:
            if body.logprobs is None:
                return None
            offsets = choice.out.offsets[: len(tokens)] if not echo else None
            if echo:
                base = len(prompt_text(choice))
                texts, offsets, at = choice.prompt, [], 0
                for t in texts:
                    offsets.append(at)
                    at += len(tokenizer.decode([t.id])) if tokenizer is not None else 0
                offsets += [base + o for o in choice.out.offsets]
                tokens = [*choice.prompt, *tokens]
            return completion_logprobs(tokenizer, tokens, offsets)

        def usage() -> dict:
            prompt = sum(len(r.prompt) for r in requests)
            completion = sum(len(c.out.tokens) for c in choices)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                try:
                    async for index, event in run.events():
                        choice = choices[index]
                        choice.take(event, requests[index])
                        text, tokens, offsets = "", [], []
                        if isinstance(event, PromptDone) and body.echo:
                            text, tokens = prompt_text(choice), choice.prompt
                            offsets = logprobs_of(choice, [], True)["text_offset"] if body.logprobs is not None else []
                        elif not isinstance(event, PromptDone):
                            text, tokens, offsets = choice.out.delta(final=choice.finish is not None)
                        if choice.error is not None:
                            yield _sse({"error": {"message": choice.error, "type": "server_error"}})
                            continue
                        with_logprobs = body.logprobs is not None and tokens
                        if not text and not with_logprobs and choice.finish is None:
                            continue
                        piece = {"text": text, "index": index, "logprobs": None, "finish_reason": choice.finish}
                        if with_logprobs:
                            piece["logprobs"] = completion_logprobs(tokenizer, tokens, offsets)
                        if choice.finish is not None and requests[index].return_routing:
                            piece["deepmoe"] = choice.routing(engine, tokenizer)
                        chunk = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
                        yield _sse({**chunk, "choices": [piece]})
                    if body.stream_options is not None and body.stream_options.include_usage:
                        chunk = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
                        yield _sse({**chunk, "choices": [], "usage": usage()})
                    yield _sse("[DONE]")
                finally:
                    run.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        try:
            async for index, event in run.events(request):
                choices[index].take(event, requests[index])
        finally:
            run.cancel()
        errors = [c.error for c in choices if c.error]
        if errors:
            raise APIError(500, f"generation failed: {errors[0]}", kind="server_error")
        out = []
        for index, choice in enumerate(choices):
            text = (prompt_text(choice) if body.echo else "") + choice.out.text
            entry = {
                "text": text,
                "index": index,
                "logprobs": logprobs_of(choice, choice.out.tokens, body.echo),
                "finish_reason": choice.finish,
            }
            if requests[index].return_routing:
                entry["deepmoe"] = choice.routing(engine, tokenizer)
            out.append(entry)
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": out,
            "usage": usage(),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        if chat is None or tokenizer is None:
            raise APIError(400, "messages: this server has no tokenizer (or chat template): use /v1/completions",
                           "messages")  # fmt: skip
        try:
            stops = stop_strings(body.stop)
        except ValueError as error:
            raise bad_request(error) from None
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            text = chat.render(messages, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - jinja2's TemplateError, the template's raise_exception
            raise APIError(400, f"messages: the chat template cannot render them: {error}", "messages") from None
        prompt = tokenizer.encode(text).ids
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "max_tokens: give max_tokens or max_completion_tokens, not both", "max_tokens")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(0, engine.max_context - len(prompt))
        if max_tokens == 0:
            raise APIError(400, "max_tokens: must be >= 1 (and the prompt must leave room in the context)",
                           "max_tokens")  # fmt: skip
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        gen = sampling(body, prompt, max_tokens, logprobs=(top or 0) if body.logprobs else None, stop_ids=chat_stop)
        run = _Run(engine, [gen])
        choice = _Choice(tokenizer, stops)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name}

        def usage() -> dict:
            n = len(choice.out.tokens)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if body.stream:

            async def stream() -> AsyncIterator[str]:
                try:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield _sse({**base, "choices": [{**first, "finish_reason": None}]})
                    async for _, event in run.events():
                        choice.take(event, gen)
                        if isinstance(event, PromptDone):
                            continue
                        if choice.error is not None:
                            yield _sse({"error": {"message": choice.error, "type": "server_error"}})
                            continue
                        text, tokens, _ = choice.out.delta(final=choice.finish is not None)
                        if not text and not (body.logprobs and tokens) and choice.finish is None:
                            continue
                        piece = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None}
                        if body.logprobs and tokens:
                            piece["logprobs"] = chat_logprobs(tokenizer, tokens)
                        if choice.finish is not None and gen.return_routing:
                            piece["deepmoe"] = choice.routing(engine, tokenizer)
                        yield _sse({**base, "choices": [{**piece, "finish_reason": choice.finish}]})
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield _sse({**base, "choices": [], "usage": usage()})
                    yield _sse("[DONE]")
                finally:
                    run.cancel()

            return StreamingResponse(stream(), media_type="text/event-stream")

        try:
            async for _, event in run.events(request):
                choice.take(event, gen)
        finally:
            run.cancel()
        if choice.error:
            raise APIError(500, f"generation failed: {choice.error}", kind="server_error")
        entry = {
            "index": 0,
            "message": {"role": "assistant", "content": choice.out.text},
            "logprobs": chat_logprobs(tokenizer, choice.out.tokens) if body.logprobs else None,
            "finish_reason": choice.finish,
        }
        if gen.return_routing:
            entry["deepmoe"] = choice.routing(engine, tokenizer)
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [entry],
            "usage": usage(),
        }

    return app
