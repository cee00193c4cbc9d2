"""Request bodies off the wire: parsed by us, so a malformed one is the client's error, not a server crash.

gRPC's generated registration parses the body before any handler runs; a body that protobuf cannot parse
(truncated, a string field that is not UTF-8) then ends as INTERNAL "Exception deserializing request!"
with a traceback in the log. Parsing here turns it into a ``MalformedRequest`` the service answers with
INVALID_ARGUMENT and one line. A known field sent with another wire type parses fine — protobuf keeps it
as an unknown field under the known number — so it is named here as what it is, before the unknown-field
check would blame a newer client.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from jdisagg.v1 import jdisagg_pb2 as pb

_WIRE_TYPES = {0: "varint", 1: "64-bit", 2: "length-delimited", 3: "group start", 4: "group end", 5: "32-bit"}
_VARINT_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
}
_FIXED64_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
_FIXED32_TYPES = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}


@dataclass(frozen=True)
class MalformedRequest:
    """A body that is not a valid ``GenerateRequest``; ``reason`` is protobuf's one-line diagnosis."""

    reason: str


def parse_generate_request(body: bytes) -> pb.GenerateRequest | MalformedRequest:
    """The request deserializer the server registers: never raises."""
    try:
        return pb.GenerateRequest.FromString(body)
    except DecodeError as exc:
        return MalformedRequest(str(exc).rpartition(": ")[2] or "cannot parse the body")


def _wire_types_of(field: FieldDescriptor) -> set[int]:
    """The wire types a field may arrive with (repeated scalars: packed or not)."""
    if field.type in _VARINT_TYPES:
        expected = {0}
    elif field.type in _FIXED64_TYPES:
        expected = {1}
    elif field.type in _FIXED32_TYPES:
        expected = {5}
    else:
        return {2}
    return expected | {2} if field.is_repeated else expected


def reject_wire_type_mismatches(message: Message, where: str = "") -> None:
    """Raise ``ValueError`` naming a known field that arrived with the wrong wire type, here or nested."""
    where = where or message.DESCRIPTOR.name
    by_number = message.DESCRIPTOR.fields_by_number
    for unknown in UnknownFieldSet(message):
        field = by_number.get(unknown.field_number)
        if field is not None and unknown.wire_type not in _wire_types_of(field):
            got = _WIRE_TYPES.get(unknown.wire_type, str(unknown.wire_type))
            want = " or ".join(_WIRE_TYPES[t] for t in sorted(_wire_types_of(field)))
            raise ValueError(f"{where}.{field.name} (field {field.number}) arrived with wire type {got}, "
                             f"expected {want}: the client's schema declares this field with another type")
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        for item in value if descriptor.is_repeated else [value]:
            reject_wire_type_mismatches(item, f"{where}.{descriptor.name}")
