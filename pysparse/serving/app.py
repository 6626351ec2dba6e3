"""The OpenAI-compatible HTTP server (FastAPI on uvicorn; SSE for streaming) over the engine.

    POST /v1/completions        prompt -> text (stream: server-sent events)
    POST /v1/chat/completions   messages -> reply, through the tokenizer's chat template
    GET  /v1/models             the one model served
    GET  /health                ok / draining, with queue depth and running sequences
    GET  /metrics               Prometheus text (pysparse.serving.metrics)

Requests are checked before they reach the engine; anything wrong is a 400 with an OpenAI-style
error body naming the field (an unknown or unsupported field, a bad type or range, malformed
JSON, a prompt plus max_tokens over the cache); an unknown model is 404, a wrong or missing key
401 (when the server has one), a full queue 429 with Retry-After, a failure inside a request's
generation 500 (a stream ends with an error event instead: its status was sent with the first
byte). A client that disconnects cancels its sequence. Text is detokenized incrementally (never
half a UTF-8 character); ``stop`` strings end a request where they first appear (the text up to
it is returned; a stream holds back what could still become one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask

from pysparse.runtime.generate import GenerationError
from pysparse.serving.engine import Engine, EngineStopped, QueueFull, Sampling, Sequence
from pysparse.serving.metrics import Metrics

_UNSUPPORTED = {
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "presence_penalty",
    "frequency_penalty",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "parallel_tool_calls",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "server_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = True


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for k, v in (bias or {}).items():
            if not (k.isascii() and k.lstrip("-").isdigit()):
                raise ValueError(f"keys are token ids; got {k!r}")
            if not -100 <= v <= 100:
                raise ValueError(f"biases are in [-100, 100]; got {v} for token {k}")
        return bias

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("n must be 1: this server returns one choice a request")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stop


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("give one prompt a request (a string, or a list of token ids)")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class _Detokenizer:
    """Token ids -> text deltas: each token's text is the decode of a short window ending with it
    minus the window's decode before it (so a word-initial space survives), held back while it
    ends in half a character."""

    def __init__(self, tokenizer: Any):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._advance()

    def flush(self) -> str:
        text = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        done = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return text[len(done) :].replace("\ufffd", "") if len(text) > len(done) else ""

    def _advance(self) -> str:
        before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""


class Server:
    """The FastAPI app (``.app``) over one engine and its tokenizer."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        model_name: str,
        api_key: str | None = None,
        metrics: Metrics | None = None,
        start_engine: bool = True,
    ):
        self.engine, self.tok, self.model_name, self.api_key = (
            engine,
            tokenizer,
            model_name,
            api_key,
        )
        self.metrics = metrics or Metrics()
        if engine.observer is not self.metrics and type(engine.observer).__name__ == "Observer":
            engine.observer = self.metrics
        self.metrics.engine_state = lambda: (engine.queue_depth, len(engine.active))
        self.draining = False
        self.start_engine = start_engine  # False: the caller runs engine.run() itself
        self.app = self._build()

    # ---- the app --------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            if self.start_engine:
                self.engine.start()
            try:
                yield
            finally:  # uvicorn ends the lifespan after in-flight requests (SIGTERM: drain)
                self.draining = True
                await asyncio.to_thread(self.engine.stop, True)

        app = FastAPI(title="pysparse", lifespan=lifespan, docs_url=None, redoc_url=None)

        @app.exception_handler(ApiError)
        async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
            self.metrics.requests.labels(request.url.path, str(exc.status)).inc()
            return _error_response(exc)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            err = _validation_error(exc)
            self.metrics.requests.labels(request.url.path, "400").inc()
            return _error_response(err)

        @app.get("/health")
        async def health() -> JSONResponse:
            body = {
                "status": "draining" if self.draining else "ok",
                "model": self.model_name,
                "running": len(self.engine.active),
                "queued": self.engine.queue_depth,
            }
            return JSONResponse(body, status_code=503 if self.draining else 200)

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

        auth = [Depends(self._authorize)]  # (before the body is validated: 401 wins over 400)

        @app.get("/v1/models", dependencies=auth)
        async def models(request: Request) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        @app.get("/v1/models/{name:path}", dependencies=auth)
        async def model(name: str, request: Request) -> JSONResponse:
            self._check_model(name)
            return JSONResponse(self._model_card())

        @app.post("/v1/completions", dependencies=auth)
        async def completions(body: CompletionRequest, request: Request) -> Response:
            self._check_model(body.model)
            if isinstance(body.prompt, str):
                ids = self.tok(body.prompt, add_special_tokens=False)["input_ids"]
            elif isinstance(body.prompt[0], str):
                ids = self.tok(body.prompt[0], add_special_tokens=False)["input_ids"]
            else:
                ids = list(body.prompt)
            return await self._respond(request, body, ids, chat=False)

        @app.post("/v1/chat/completions", dependencies=auth)
        async def chat(body: ChatRequest, request: Request) -> Response:
            self._check_model(body.model)
            if not getattr(self.tok, "chat_template", None):
                raise ApiError(
                    400,
                    "this model's tokenizer has no chat template; use /v1/completions",
                    "messages",
                )
            try:
                text = self.tok.apply_chat_template(
                    [{"role": m.role, "content": m.text()} for m in body.messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except Exception as exc:
                raise ApiError(
                    400, f"the model's chat template refused the messages: {exc}", "messages"
                ) from exc
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            return await self._respond(request, body, ids, chat=True)

        return app

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> Any:
        """``post(queue, item)`` for the engine's thread: items wait in one list and a single
        callback on the event loop hands them all to their queues, so a decode step of B
        sequences wakes the loop once, not B times (each wake-up is a write to the loop's
        self-pipe and a pass of its scheduler, and on 2 cores those compete with the step).

        It also installs the engine's ``after_step``: after a round that posted something, the
        engine waits (up to 0.1 s) until the loop has handed the items out and the requests'
        tasks have run on them (detokenized, written their SSE events). Left to run beside the
        next step, that work takes a core from the kernels' OpenMP team, and a team thread that
        loses its core stalls every thread at the region's barrier: SmolLM2's 8-row native step
        took 24.3 ms alone and 34.8 ms beside one busy Python thread (2 cores, AMD EPYC)."""
        if getattr(self, "_box", None) is not None and self._box[0] is loop:
            return self._box[1]
        pending: list[tuple[asyncio.Queue, Any]] = []
        lock = threading.Lock()
        caught_up = threading.Event()
        caught_up.set()

        def drain() -> None:
            with lock:
                items = pending[:]
                pending.clear()
            for queue, item in items:
                queue.put_nowait(item)
            # (runs after the tasks those items woke have taken their turn: they were scheduled
            # first; the second hop lets a task that awaited once more finish its write too)
            loop.call_soon(loop.call_soon, caught_up.set)

        def post(queue: asyncio.Queue, item: Any) -> None:
            with lock:
                pending.append((queue, item))
                first = len(pending) == 1
                if first:
                    caught_up.clear()
            if first:
                loop.call_soon_threadsafe(drain)

        def after_step() -> None:
            if not loop.is_closed():
                caught_up.wait(0.1)

        self._box = (loop, post)
        self.engine.after_step = after_step
        return post

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pysparse"}

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise ApiError(
                401,
                "missing or wrong API key: send the key the server was started with "
                "(--api-key) as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(
                404,
                f"the model '{name}' does not exist; this server serves "
                f"'{self.model_name}' (GET /v1/models)",
                "model",
                "model_not_found",
            )

    # ---- one request ----------------------------------------------------------------------

    async def _respond(
        self, request: Request, body: _Common, ids: list[int], chat: bool
    ) -> Response:
        endpoint = request.url.path
        limit = self.engine.max_cache_len
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
        if max_tokens is None:
            max_tokens = max(1, limit - len(ids)) if chat else 16
        try:
            self.engine.check(len(ids), max_tokens)
        except GenerationError as exc:
            raise ApiError(400, str(exc), "max_tokens" if ids else "prompt") from exc
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        post = self._mailbox(asyncio.get_running_loop())
        seq = Sequence(
            list(ids),
            Sampling(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                logit_bias={int(k): v for k, v in body.logit_bias.items()}
                if body.logit_bias
                else None,
            ),
            on_token=lambda s, t: post(events, ("token", t)),
            on_finish=lambda s: post(events, ("done", s)),
        )
        try:
            self.engine.submit(seq)
        except QueueFull as exc:
            raise ApiError(
                429, f"the server is busy: {exc}; retry shortly", headers={"Retry-After": "1"}
            ) from exc
        except EngineStopped as exc:
            raise ApiError(503, str(exc)) from exc
        except GenerationError as exc:
            raise ApiError(400, str(exc), "prompt") from exc
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        used = [0]  # tokens the response is made of (a stop string can end it before the engine)
        pieces = self._pieces(seq, events, stops, used)
        if body.stream:
            self.metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(
                self._sse(request, seq, pieces, rid, created, chat, len(ids), used),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                # runs however the response ends, also when the client left before the stream
                # began (the generator's own finally never runs then)
                background=BackgroundTask(self.engine.cancel, seq),
            )
        text: list[str] = []
        finish: list[str | None] = [None]

        async def collect() -> None:
            async for delta, reason in pieces:
                text.append(delta)
                finish[0] = reason or finish[0]

        task = asyncio.ensure_future(collect())
        gone = False
        try:  # a client that goes away cancels its sequence (checked twice a second)
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    gone = True
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    break
            if not gone:
                task.result()
        finally:
            self.engine.cancel(seq)  # (no-op when it finished)
        if gone:  # nobody to answer; counted as nginx does a client that closed first
            self.metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        if seq.finish_reason == "error":
            self.metrics.requests.labels(endpoint, "500").inc()
            raise ApiError(500, f"generation failed: {seq.error}")
        self.metrics.requests.labels(endpoint, "200").inc()
        out = "".join(text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish[0], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out}
        else:
            choice["text"] = out
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
                "usage": _usage(len(ids), used[0]),
            }
        )

    async def _pieces(
        self, seq: Sequence, events: asyncio.Queue, stops: list[str], used: list[int]
    ) -> AsyncIterator[tuple[str, str | None]]:
        """(text delta, finish reason on the last) as the engine produces tokens; stop strings
        end it (the engine's sequence is cancelled: it may have decoded a token or two more,
        which ``used[0]``, the tokens taken into the text, does not count)."""
        detok = _Detokenizer(self.tok)
        held = ""  # text that might still turn into a stop string
        keep = max((len(s) for s in stops), default=1) - 1
        while True:
            kind, value = await events.get()
            if kind == "token":
                used[0] += 1
                held += detok.add(value)
            else:
                held += detok.flush()
            cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.engine.cancel(seq)
                yield held[:cut], "stop"
                return
            if kind == "done":
                reason = {"stop": "stop", "length": "length"}.get(
                    seq.finish_reason or "", seq.finish_reason
                )
                yield held, reason
                return
            if len(held) > keep:
                out, held = (
                    (held[: len(held) - keep], held[len(held) - keep :]) if keep else (held, "")
                )
                yield out, None

    async def _sse(
        self,
        request: Request,
        seq: Sequence,
        pieces: AsyncIterator,
        rid: str,
        created: int,
        chat: bool,
        prompt_tokens: int,
        used: list[int],
    ) -> AsyncIterator[bytes]:
        def event(delta: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                d: dict[str, Any] = {"content": delta} if delta is not None else {}
                if first:
                    d = {"role": "assistant", "content": delta or ""}
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": d,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {
                    "index": 0,
                    "text": delta or "",
                    "finish_reason": finish,
                    "logprobs": None,
                }
            chunk: dict[str, Any] = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [choice],
            }
            if finish is not None:
                chunk["usage"] = _usage(prompt_tokens, used[0])
            return f"data: {json.dumps(chunk)}\n\n".encode()

        try:
            if chat:
                yield event("", None, first=True)
            # (a client that goes away: Starlette cancels this generator, the finally below
            # cancels the sequence)
            async for delta, finish in pieces:
                if seq.finish_reason == "error":
                    err = ApiError(500, f"generation failed: {seq.error}")
                    yield f"data: {json.dumps(err.body())}\n\n".encode()
                    return
                if delta or finish:
                    yield event(delta if delta else None, finish)
            yield b"data: [DONE]\n\n"
        finally:  # a client that went away, or the end: the slot is freed either way
            self.engine.cancel(seq)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem of a request body as a 400 naming its field."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request body")
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    field = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, f"malformed JSON body: {e.get('msg', '')}; send a JSON object")
    if kind == "extra_forbidden":
        name = loc[-1] if loc else "?"
        if name in _UNSUPPORTED:
            return ApiError(400, f"'{field}' is not supported by this server; leave it out", field)
        return ApiError(400, f"unknown field '{field}'; leave it out", field)
    if kind == "missing":
        return ApiError(400, f"'{field}' is required", field)
    if kind == "model_attributes_type" or kind == "dict_type":
        return ApiError(400, "the request body must be a JSON object", field)
    msg = e.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(400, f"'{field}': {msg}", field)
