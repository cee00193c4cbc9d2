"""Errors the engine raises or reports, each with the gRPC status the server maps it to."""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """The admission queue is full: back off and retry (gRPC: RESOURCE_EXHAUSTED)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests (gRPC: UNAVAILABLE)."""


class WorkerUnavailableError(RuntimeError):
    """A worker process (prefill or decode) died or cannot be reached (gRPC: UNAVAILABLE).

    Requests it held end with ``FinishReason.ERROR`` and ``Output.error_code == "UNAVAILABLE"``, so a client
    can tell a lost worker (retry later) from a bug (INTERNAL)."""
