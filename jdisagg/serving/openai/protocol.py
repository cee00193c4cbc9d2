"""The request bodies we accept, and OpenAI's error shape.

Bodies are validated strictly (no "5" for 5, no unknown fields): a field a client sets that we would ignore
is output it did not ask for, the same reason the gRPC service rejects unknown proto fields. Fields OpenAI
defines that only change billing or bookkeeping (``user``) are accepted; penalties and ``logit_bias`` are
accepted only at their neutral values, since we do not implement them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jdisagg.sampling_params import TOP_LOGPROBS


class APIError(Exception):
    """An error answered as OpenAI's JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}.get(self.status, "internal_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields both endpoints share (OpenAI's, plus vLLM's ``top_k``, ``ignore_eos``, ``stop_token_ids``,
    ``return_token_ids``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("penalties are not supported; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(GenerationRequest):
    # A string, a list of strings, token ids, or a list of token-id lists (one choice set per prompt).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: Literal[False] = False  # echoing the prompt back is not implemented

    @property
    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed on to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a template reads it; text parts are joined (templates expect a string)."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
                texts.append(part["text"])
            message["content"] = "\n".join(texts)
        return message


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens; both work
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    add_generation_prompt: bool = True


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body strictly; a bad one becomes a 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = _field_path(error["loc"])
        if error["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {error['msg']}") from None
        where = f"{field}: " if field else ""
        raise APIError(400, f"{where}{error['msg']}", param=field) from None


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc: tuple[str | int, ...]) -> str | None:
    """``messages.0.role`` from pydantic's location, without the union branch names it appends
    (``prompt.list[int].0`` is the field ``prompt``)."""
    parts = []
    for part in loc:
        if isinstance(part, str) and (not part.isidentifier() or part in _TYPE_NAMES):
            break
        parts.append(str(part))
    return ".".join(parts) or None
