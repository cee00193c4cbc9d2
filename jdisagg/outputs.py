"""What comes back: stream chunks while a request runs, and the final output."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

TopLogprobs = list[tuple[int, float]]


class FinishReason(StrEnum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the client or the engine shutting down
    ERROR = "error"  # the engine failed this request; the message says why


@dataclass(frozen=True)
class StreamChunk:
    """New tokens of one request. The last chunk of a stream has ``finish_reason`` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)  # of each token in ``token_ids``
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per token, when the request asked


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (``time.monotonic``) of one request's life."""

    arrival: float
    scheduled: float | None = None  # prefill started
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass
class Output:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    metrics: RequestMetrics
    error: str | None = None
    logprobs: list[float] = field(default_factory=list)  # model log-probability of each output token
    error_code: str | None = None  # with ERROR: "UNAVAILABLE" (a worker was lost, retry) or "INTERNAL"
    # per output token, the ``SamplingParams.logprobs`` most likely (token id, logprob), most likely first
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
