"""The FastAPI application: OpenAI's completions and chat endpoints over one ``Engine``.

Each HTTP request becomes ``n`` engine requests per prompt (one per choice). The engine's streams block, so
one thread per choice reads its stream into the request's asyncio queue; the event loop never blocks. A client
that goes away (a closed SSE stream, or a dropped connection while a non-streaming request waits) cancels
every choice, and the engine frees their pages as it does for a cancelled gRPC call.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from jdisagg.chat_template import ChatTemplate, ChatTemplateError
from jdisagg.engine import Engine
from jdisagg.errors import EngineClosedError, QueueFullError, WorkerUnavailableError
from jdisagg.outputs import FinishReason, Output, StreamChunk
from jdisagg.requests import RequestStream
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.openai.defaults import GenerationDefaults
from jdisagg.serving.openai.formats import ChatFormat, CompletionFormat, ResponseFormat
from jdisagg.serving.openai.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    parse_body,
)

_DISCONNECT_POLL_S = 0.1  # one receive() that returns at once: cheap


@dataclass
class ServingState:
    """What the routes read; the engine is attached once built, so /health can say 503 until then."""

    model_name: str
    chat_template: ChatTemplate | None
    defaults: GenerationDefaults = field(default_factory=GenerationDefaults)
    engine: Engine | None = None
    closing: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise APIError(503, "the server is starting up (loading and compiling the model)")
        if self.closing:
            raise APIError(503, "the server is shutting down")
        return self.engine


def create_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="jdisagg OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> Response:
        """200 only while requests can be served: warm, not shutting down, and (with worker processes) a
        live prefill and a live decode worker, as gRPC health reports."""
        engine = state.engine
        ready = engine is not None and not state.closing and all(engine.live_replicas().values())
        return Response(status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card: dict[str, Any] = {"id": state.model_name, "object": "model", "created": state.created,
                                "owned_by": "jdisagg"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_context
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse_body(CompletionRequest, await request.body())
        engine = _checked(state, body)
        prompts = [_prompt_ids(engine, p) for p in body.prompts]
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        return await _serve(state, engine, body, prompts, body.max_tokens, body.logprobs, request,
                            CompletionFormat(state.model_name, engine.tokenizer, body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = parse_body(ChatCompletionRequest, await request.body())
        engine = _checked(state, body)
        if state.chat_template is None:
            raise APIError(400, f"model {state.model_name!r} has no chat template (none in its "
                                "tokenizer_config.json): start the server with --chat-template FILE, or use "
                                "/v1/completions", param="messages")
        try:
            messages = [m.for_template() for m in body.messages]
            prompt = state.chat_template.encode(engine.tokenizer, messages, body.add_generation_prompt)
        except (ChatTemplateError, ValueError) as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        num_top = (body.top_logprobs or 0) if body.logprobs else None
        return await _serve(state, engine, body, [prompt], max_tokens, num_top, request,
                            ChatFormat(state.model_name, engine.tokenizer, body))

    return app


def _checked(state: ServingState, body: GenerationRequest) -> Engine:
    engine = state.ready_engine()
    if body.model != state.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                            f"{state.model_name!r}", param="model", code="model_not_found")
    return engine


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    return engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)


def _sampling_params(
    engine: Engine, body: GenerationRequest, defaults: GenerationDefaults, prompt: list[int],
    max_tokens: int | None, num_top: int | None,
) -> SamplingParams:
    """Left-out knobs take the model's defaults; no ``max_tokens`` means "up to the context's end"."""
    if max_tokens is None:
        max_tokens = max(1, engine.max_context - len(prompt))  # a too-long prompt is the engine's error
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_strings,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=num_top or 0,
    )


def _submit_all(
    engine: Engine, body: GenerationRequest, defaults: GenerationDefaults, prompts: Sequence[list[int]],
    max_tokens: int | None, num_top: int | None, request_id: str,
) -> list[RequestStream]:
    """``n`` engine requests per prompt, choice ``i`` seeded ``seed + i`` (distinct yet reproducible).

    All or nothing: if one is refused, those already queued are cancelled before the error is answered.
    """
    streams: list[RequestStream] = []
    try:
        for p, prompt in enumerate(prompts):
            params = _sampling_params(engine, body, defaults, prompt, max_tokens, num_top)
            for i in range(body.n):
                seed = None if params.seed is None else (params.seed + i) % 2**32
                seeded = params if i == 0 else replace(params, seed=seed)
                streams.append(engine.submit(prompt, seeded, request_id=f"{request_id}-{p * body.n + i}"))
    except BaseException as exc:
        for stream in streams:
            stream.cancel()
        raise _api_error(exc, body) from None
    return streams


def _api_error(exc: BaseException, body: GenerationRequest) -> BaseException:
    """The engine's refusals as HTTP errors (the same classes the gRPC service maps to status codes)."""
    if isinstance(exc, ValueError):
        word = str(exc).split(" ", 1)[0]
        param = word if word in type(body).model_fields else None
        return APIError(400, str(exc), param=param)
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc))
    if isinstance(exc, EngineClosedError | WorkerUnavailableError):
        return APIError(503, str(exc))
    return exc


def _output_error(output: Output) -> APIError:
    status = 503 if output.error_code == "UNAVAILABLE" else 500
    return APIError(status, output.error or "the engine failed this request")


async def _serve(
    state: ServingState, engine: Engine, body: GenerationRequest, prompts: list[list[int]],
    max_tokens: int | None, num_top: int | None, request: Request, fmt: ResponseFormat,
) -> Response:
    streams = _submit_all(engine, body, state.defaults, prompts, max_tokens, num_top, fmt.id)
    choices = _Choices(streams, asyncio.get_running_loop(), prompt_tokens=sum(len(p) for p in prompts))
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        # The background task also runs when the client left before the first event, when the generator's
        # own ``finally`` never runs; cancelling finished requests does nothing.
        return StreamingResponse(_sse(choices, fmt, include_usage), media_type="text/event-stream",
                                 background=BackgroundTask(choices.cancel))
    outputs = await choices.outputs(request.is_disconnected)
    for output in outputs:
        if output.finish_reason is FinishReason.ERROR:
            raise _output_error(output)
    return JSONResponse(fmt.response(outputs, choices.usage(outputs)))


async def _sse(choices: _Choices, fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, a usage chunk if asked, then ``[DONE]``.

    Leaving this generator early (the client closed the stream) cancels every choice in ``finally``.
    """
    try:
        for index in range(len(choices.streams)):
            if (first := fmt.first_chunk(index)) is not None:
                yield _event(first)
        outputs: list[Output] = []
        async for index, chunk, output in choices.events():
            if output is not None:
                outputs.append(output)
                continue
            if chunk.finish_reason is FinishReason.ERROR:
                error = _output_error(choices.streams[index].result())
                yield _event(error.body())
                return
            yield _event(fmt.chunk(index, chunk))
        if include_usage:
            yield _event(fmt.usage_chunk(choices.usage(outputs)))
        yield "data: [DONE]\n\n"
    finally:
        choices.cancel()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Choices:
    """The engine streams of one HTTP request, each read by its own thread into one asyncio queue."""

    def __init__(self, streams: list[RequestStream], loop: asyncio.AbstractEventLoop,
                 prompt_tokens: int) -> None:
        """``prompt_tokens``: every prompt counted once however many choices it has (OpenAI's usage)."""
        self.streams = streams
        self.prompt_tokens = prompt_tokens
        self._loop = loop
        self._queue: asyncio.Queue[tuple[int, StreamChunk | None, Output | None]] = asyncio.Queue()
        for index, stream in enumerate(streams):
            threading.Thread(target=self._pump, args=(index, stream), name=f"http-{stream.request_id}",
                             daemon=True).start()

    def _pump(self, index: int, stream: RequestStream) -> None:
        for chunk in stream:
            self._put((index, chunk, None))
        self._put((index, None, stream.result()))

    def _put(self, item: tuple[int, StreamChunk | None, Output | None]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server stopped): nobody is listening any more
            pass

    async def events(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[tuple[int, StreamChunk | None, Output | None]]:
        """Chunks and then each choice's ``Output``, until every choice has finished.

        ``disconnected`` is asked every ``_DISCONNECT_POLL_S`` whether or not chunks keep arriving; once it
        says yes every choice is cancelled (they then end with ABORT, and are drained here).
        """
        loop = asyncio.get_running_loop()
        remaining = len(self.streams)
        next_check = loop.time() + _DISCONNECT_POLL_S
        while remaining:
            try:
                item = await asyncio.wait_for(self._queue.get(), _DISCONNECT_POLL_S)
            except TimeoutError:
                item = None
            if disconnected is not None and loop.time() >= next_check:
                next_check = loop.time() + _DISCONNECT_POLL_S
                if await disconnected():
                    self.cancel()
                    disconnected = None
            if item is not None:
                remaining -= item[2] is not None
                yield item

    async def outputs(self, disconnected: Callable[[], Awaitable[bool]]) -> list[Output]:
        found: dict[int, Output] = {}
        async for index, _, output in self.events(disconnected):
            if output is not None:
                found[index] = output
        return [found[i] for i in range(len(self.streams))]

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel()

    def usage(self, outputs: Sequence[Output]) -> dict[str, int]:
        completion = sum(len(o.token_ids) for o in outputs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}
