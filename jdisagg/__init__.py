"""jdisagg: disaggregated prefill/decode LLM serving on JAX.

The public Python API: ``Engine`` (load, compile, serve), ``SamplingParams``, and the output types. Names
are imported lazily so that ``jdisagg --help`` does not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "jdisagg.engine",
    "EngineClosedError": "jdisagg.errors",
    "QueueFullError": "jdisagg.errors",
    "FinishReason": "jdisagg.outputs",
    "Output": "jdisagg.outputs",
    "StreamChunk": "jdisagg.outputs",
    "RequestStream": "jdisagg.requests",
    "SamplingParams": "jdisagg.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jdisagg' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
