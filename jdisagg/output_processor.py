"""Tokens to text for each stream: incremental detokenizing, stop strings with hold-back, final outputs.

Stop token ids and lengths are decided by the scheduler, which sees tokens; stop *strings* need text, so they
are found here. Text that could still be the start of a stop string is held back (``longest stop - 1``
characters) so a client never sees text that a stop string then takes back. When a stop string appears,
the text is cut there and ``Processed.stop`` asks the caller to cancel the request (its pages are on a
decode replica); the final output goes out when the stage holding the pages reports the finish.

Pure Python (the tokenizer is a host object); the engine's output thread calls ``process`` in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jdisagg.outputs import FinishReason, Output, StreamChunk
from jdisagg.requests import Request
from jdisagg.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _TextState:
    detokenizer: IncrementalDetokenizer
    text: str = ""
    emitted: int = 0  # characters streamed so far
    token_ids: list[int] = field(default_factory=list)
    stopped: bool = False  # a stop string ended the text; waiting for the finish


@dataclass(frozen=True)
class Processed:
    chunk: StreamChunk | None = None  # to push to the stream
    output: Output | None = None  # the final output: the request is over
    stop: bool = False  # a stop string was found: cancel the request with STOP


def find_stop(stops: tuple[str, ...], text: str, emitted: int) -> int | None:
    """Where the earliest stop string starts in ``text``, searching only where a new one can be."""
    longest = max((len(s) for s in stops), default=0)
    start = max(0, emitted - longest)
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._states: dict[int, _TextState] = {}  # by id(request): a finished id may come back

    def process(
        self, request: Request, token_ids: list[int], finish: FinishReason | None, error: str | None
    ) -> Processed:
        state = self._states.get(id(request))
        if state is None:
            state = self._states[id(request)] = _TextState(IncrementalDetokenizer(self._tokenizer))
        if state.stopped:  # the text is over; only the finish is still to come
            return self._finish(request, state, [], "", FinishReason.STOP, None) if finish else Processed()
        state.token_ids += token_ids
        state.text += state.detokenizer.add(token_ids)
        if finish is not None:
            state.text += state.detokenizer.flush()
        stop = False
        if (stop_at := find_stop(request.params.stop, state.text, state.emitted)) is not None:
            state.text = state.text[:stop_at]
            if finish is None:
                state.stopped = stop = True
            else:
                finish = FinishReason.STOP
        holdback = 0 if finish is not None or stop else max(map(len, request.params.stop), default=1) - 1
        end = max(state.emitted, len(state.text) - holdback)
        delta, state.emitted = state.text[state.emitted : end], end
        if finish is not None:
            return self._finish(request, state, token_ids, delta, finish, error)
        chunk = _chunk(request, state, token_ids, delta) if token_ids or delta else None
        return Processed(chunk, stop=stop)

    def _finish(
        self,
        request: Request,
        state: _TextState,
        token_ids: list[int],
        delta: str,
        finish: FinishReason,
        error: str | None,
    ) -> Processed:
        del self._states[id(request)]
        n = len(state.token_ids)
        output = Output(
            request.id,
            request.prompt_ids,
            state.token_ids,
            state.text,
            finish,
            request.metrics,
            error,
            request.logprobs[:n],
            request.error_code if finish is FinishReason.ERROR else None,
            request.top_logprobs[:n],
        )
        return Processed(_chunk(request, state, token_ids, delta, finish, error), output)


def _chunk(
    request: Request,
    state: _TextState,
    token_ids: list[int],
    delta: str,
    finish: FinishReason | None = None,
    error: str | None = None,
) -> StreamChunk:
    """A chunk of the latest ``token_ids`` (the tail of ``state.token_ids``), with their logprobs."""
    start, end = len(state.token_ids) - len(token_ids), len(state.token_ids)
    return StreamChunk(
        request.id,
        token_ids,
        delta,
        finish,
        error,
        request.logprobs[start:end],
        request.top_logprobs[start:end],
    )
