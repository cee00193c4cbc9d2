"""Response bodies and stream chunks of the two endpoints, built from the engine's chunks and outputs."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from jdisagg.outputs import FinishReason, Output, StreamChunk
from jdisagg.serving.openai.logprobs import LogprobFormatter
from jdisagg.serving.openai.protocol import ChatCompletionRequest, CompletionRequest
from jdisagg.tokenizer import Tokenizer


class ResponseFormat(Protocol):
    id: str

    def first_chunk(self, index: int) -> dict[str, Any] | None: ...

    def chunk(self, index: int, chunk: StreamChunk) -> dict[str, Any]: ...

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]: ...

    def response(self, outputs: Sequence[Output], usage: dict[str, int]) -> dict[str, Any]: ...


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value  # "stop", "length" ("abort" only while shutting down)


class _Base:
    prefix = ""
    object = ""
    chunk_object = ""

    def __init__(self, model: str, tokenizer: Tokenizer, return_token_ids: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.return_token_ids = return_token_ids
        self.logprobs = LogprobFormatter(tokenizer)

    def _envelope(self, obj: str, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict:
        body: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def first_chunk(self, index: int) -> dict[str, Any] | None:
        return None

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage)

    def _token_ids(self, choice: dict[str, Any], token_ids: list[int], prompt_ids: list[int] | None = None):
        if self.return_token_ids:
            choice["token_ids"] = token_ids
            if prompt_ids is not None:
                choice["prompt_token_ids"] = prompt_ids
        return choice


class CompletionFormat(_Base):
    prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, model: str, tokenizer: Tokenizer, body: CompletionRequest) -> None:
        super().__init__(model, tokenizer, body.return_token_ids)
        self.num_top = body.logprobs
        self._text_offset: dict[int, int] = defaultdict(int)

    def chunk(self, index: int, chunk: StreamChunk) -> dict[str, Any]:
        logprobs = None
        if self.num_top is not None:
            logprobs = self.logprobs.completion(chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                                                self.num_top, self._text_offset[index])
            self._text_offset[index] += sum(len(t) for t in logprobs["tokens"])
        choice = {"index": index, "text": chunk.text, "logprobs": logprobs,
                  "finish_reason": _finish(chunk.finish_reason)}
        return self._envelope(self.chunk_object, [self._token_ids(choice, chunk.token_ids)], None)

    def response(self, outputs: Sequence[Output], usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index, output in enumerate(outputs):
            logprobs = None
            if self.num_top is not None:
                logprobs = self.logprobs.completion(output.token_ids, output.logprobs, output.top_logprobs,
                                                    self.num_top, 0)
            choice = {"index": index, "text": output.text, "logprobs": logprobs,
                      "finish_reason": _finish(output.finish_reason)}
            choices.append(self._token_ids(choice, output.token_ids, output.prompt_token_ids))
        return self._envelope(self.object, choices, usage)


class ChatFormat(_Base):
    prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, tokenizer: Tokenizer, body: ChatCompletionRequest) -> None:
        super().__init__(model, tokenizer, body.return_token_ids)
        self.num_top = (body.top_logprobs or 0) if body.logprobs else None

    def first_chunk(self, index: int) -> dict[str, Any] | None:
        """OpenAI opens each choice's stream with the role and empty content."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._envelope(self.chunk_object, [choice], None)

    def chunk(self, index: int, chunk: StreamChunk) -> dict[str, Any]:
        logprobs = None
        if self.num_top is not None:
            logprobs = self.logprobs.chat(chunk.token_ids, chunk.logprobs, chunk.top_logprobs, self.num_top)
        delta = {"content": chunk.text} if chunk.text else {}
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": _finish(chunk.finish_reason)}
        return self._envelope(self.chunk_object, [self._token_ids(choice, chunk.token_ids)], None)

    def response(self, outputs: Sequence[Output], usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for index, output in enumerate(outputs):
            logprobs = None
            if self.num_top is not None:
                logprobs = self.logprobs.chat(output.token_ids, output.logprobs, output.top_logprobs,
                                              self.num_top)
            choice = {"index": index, "message": {"role": "assistant", "content": output.text},
                      "logprobs": logprobs, "finish_reason": _finish(output.finish_reason)}
            choices.append(self._token_ids(choice, output.token_ids, output.prompt_token_ids))
        return self._envelope(self.object, choices, usage)
