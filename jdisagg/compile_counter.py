"""Counts XLA compilations in this process: after warm-up, serving must compile nothing."""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0


def _on_event(event: str, duration_secs: float, **_: object) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_count() -> int:
    """Backend compilations since this module was imported."""
    return _count
