"""Stop strings, deterministically: on the shipped demo model, whose greedy text is fixed and plain ASCII.

Each test first reads the greedy continuation of one prompt from the engine, then stops on a piece of it.
The tokenizer is byte-level, so every stop string of several characters spans several tokens, and the
detokenizer sees it arrive one token at a time. Hold-back is checked on every chunk a stream delivers: at
every moment the text shown so far must be a prefix of the final text, so a stream never shows text that
a stop string later cuts. The same holds over gRPC (streaming and unary); ``jdisagg generate --stop`` is
tested in tests/test_cli.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from jdisagg.engine import Engine
from jdisagg.outputs import FinishReason
from jdisagg.sampling_params import SamplingParams
from jdisagg.serving.client import make_request
from jdisagg.serving.server import GenerationServer
from jdisagg.v1 import jdisagg_pb2 as pb
from jdisagg.v1 import jdisagg_pb2_grpc as pb_grpc

PROMPT = "ROMEO:"
MAX_TOKENS = 48
RPC_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(None, prefill_mesh="2x1", decode_mesh="1x2", max_context=128, max_batch=4,
                progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def greedy(engine) -> tuple[list[int], str]:
    """The demo model's greedy continuation of ``PROMPT``: token ids and text."""
    out = engine.generate([PROMPT], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    assert len(out.token_ids) == MAX_TOKENS and out.text.isascii()
    assert len(out.text) == MAX_TOKENS  # one byte per token: stop strings below span several tokens
    return out.token_ids, out.text


def _first_occurrence_after(text: str, start: int, length: int) -> tuple[str, int]:
    """A ``length``-character piece of ``text`` that first occurs at some index >= ``start``."""
    for at in range(start, len(text) - length):
        piece = text[at : at + length]
        if text.index(piece) == at:
            return piece, at
    raise AssertionError(f"no new {length}-character piece after {start} in {text!r}")


def _params(*stop: str) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)


def _assert_never_shows_cut_text(deltas: list[str], final: str) -> None:
    shown = ""
    for delta in deltas:
        shown += delta
        assert final.startswith(shown), f"the stream showed {shown!r}, the final text is {final!r}"
    assert shown == final


def test_stop_string_across_tokens_cuts_text_and_generation(engine, greedy):
    ids, text = greedy
    stop, at = _first_occurrence_after(text, 12, 4)
    out = engine.generate([PROMPT], _params(stop))[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.text == text[:at]
    assert out.token_ids == ids[: at + len(stop)]  # up to the token that completed the stop string


def test_earliest_of_several_stop_strings_wins(engine, greedy):
    _, text = greedy
    early, at = _first_occurrence_after(text, 10, 3)
    late, _ = _first_occurrence_after(text, at + 8, 5)
    out = engine.generate([PROMPT], _params(late, early))[0]
    assert out.finish_reason == FinishReason.STOP and out.text == text[:at]


def test_stream_holds_back_text_a_stop_string_cuts(engine, greedy):
    _, text = greedy
    stop, at = _first_occurrence_after(text, 20, 6)
    chunks = list(engine.submit(PROMPT, _params(stop)))
    assert chunks[-1].finish_reason == FinishReason.STOP
    assert len([c for c in chunks if c.token_ids]) >= at  # the stream really went token by token
    _assert_never_shows_cut_text([c.text for c in chunks], text[:at])


def test_held_back_text_is_released_when_the_stop_string_never_completes(engine, greedy):
    _, text = greedy
    prefix, _ = _first_occurrence_after(text, 20, 5)
    near_miss = prefix + "\x00"  # its first five characters do appear; the whole never does
    chunks = list(engine.submit(PROMPT, _params(near_miss)))
    assert chunks[-1].finish_reason == FinishReason.LENGTH
    _assert_never_shows_cut_text([c.text for c in chunks], text)


@pytest.fixture(scope="module")
def stub(engine) -> Iterator[pb_grpc.GenerationStub]:
    """The real gRPC service over the module's engine, on a free loopback port."""
    server = GenerationServer("127.0.0.1", 0, max_workers=16)
    server.serve(engine, "127.0.0.1", 0)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GenerationStub(channel)
    server.shutdown(None, grace=5.0)


def test_grpc_stream_stops_and_holds_back(stub, greedy):
    ids, text = greedy
    stop, at = _first_occurrence_after(text, 16, 5)
    request = make_request(PROMPT, stop=[stop], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    replies = list(stub.Generate(request, timeout=RPC_TIMEOUT_S))
    assert replies[-1].finish_reason == pb.FINISH_REASON_STOP
    _assert_never_shows_cut_text([r.text for r in replies], text[:at])
    assert [t for r in replies for t in r.token_ids] == ids[: at + len(stop)]
    unary = stub.GenerateUnary(request, timeout=RPC_TIMEOUT_S)
    assert unary.finish_reason == pb.FINISH_REASON_STOP and unary.text == text[:at]
