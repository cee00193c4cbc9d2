"""Wire messages <-> engine types. Pure functions, so the service only decides *when* to call them.

Every ``ValueError`` raised here is a client mistake and becomes ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from jdisagg.outputs import FinishReason, Output, StreamChunk, TopLogprobs
from jdisagg.sampling_params import SamplingParams
from jdisagg.v1 import jdisagg_pb2 as pb

FINISH_REASONS: dict[FinishReason, int] = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}

# Proto field name -> SamplingParams field name, for the scalar fields whose absence means "default".
_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "seed", "ignore_eos", "logprobs")


def reject_unknown_fields(message: Message, where: str = "") -> None:
    """Raise if ``message`` or any message inside it carries fields this server does not know.

    A client built against a newer API would otherwise have its new knobs silently ignored, and would get
    output it did not ask for without any hint why.
    """
    where = where or message.DESCRIPTOR.name
    unknown = UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({field.field_number for field in unknown})
        raise ValueError(f"{where} has unknown field number(s) {numbers}: is the client newer than the "
                         "server?")
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        for item in value if descriptor.is_repeated else [value]:
            reject_unknown_fields(item, f"{where}.{descriptor.name}")


def prompt_of(request: pb.GenerateRequest) -> str | list[int]:
    """The prompt as text or token ids; the engine rejects an empty one."""
    which = request.WhichOneof("input")
    if which is None:
        raise ValueError("request has no input: set text or token_ids")
    return request.text if which == "text" else list(request.token_ids.ids)


def sampling_params_of(sampling: pb.SamplingParams) -> SamplingParams:
    """Unset fields keep the ``SamplingParams`` defaults; validation is the engine's (one set of rules)."""
    values: dict[str, object] = {
        name: getattr(sampling, name) for name in _OPTIONAL_SAMPLING if sampling.HasField(name)
    }
    return SamplingParams(stop=tuple(sampling.stop), stop_token_ids=tuple(sampling.stop_token_ids), **values)


def usage_of(output: Output) -> pb.Usage:
    ttft = output.metrics.ttft
    return pb.Usage(
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(output.token_ids),
        ttft_seconds=0.0 if ttft is None else ttft,
    )


def response_of(chunk: StreamChunk, output: Output | None) -> pb.GenerateResponse:
    """One stream message; ``output`` is given with the last chunk, whose message carries the usage."""
    response = pb.GenerateResponse(request_id=chunk.request_id, token_ids=chunk.token_ids, text=chunk.text)
    if chunk.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[chunk.finish_reason]
    if output is not None:
        response.usage.CopyFrom(usage_of(output))
    _add_logprobs(response, chunk.logprobs, chunk.top_logprobs)
    return response


def unary_response_of(output: Output) -> pb.GenerateUnaryResponse:
    response = pb.GenerateUnaryResponse(
        request_id=output.request_id,
        token_ids=output.token_ids,
        text=output.text,
        finish_reason=FINISH_REASONS[output.finish_reason],
        usage=usage_of(output),
    )
    _add_logprobs(response, output.logprobs, output.top_logprobs)
    return response


def _add_logprobs(
    response: pb.GenerateResponse | pb.GenerateUnaryResponse, logprobs: list[float], top: list[TopLogprobs]
) -> None:
    """Only for requests that asked (``top`` is filled then): the others' messages stay as small as before."""
    if not top:
        return
    response.logprobs.extend(logprobs)
    for alternatives in top:
        response.top_logprobs.add(token_ids=[i for i, _ in alternatives],
                                  logprobs=[lp for _, lp in alternatives])
