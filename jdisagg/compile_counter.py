"""Counts XLA compilations in this process: after warm-up, serving must compile nothing."""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
# JAX times a program loaded from the persistent compilation cache as a compile too; its hit event says so.
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_count = 0
_cache_hits = 0


def _on_event(event: str, duration_secs: float, **_: object) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def _on_cache_hit(event: str, **_: object) -> None:
    global _cache_hits
    if event == _CACHE_HIT:
        with _lock:
            _cache_hits += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)
jax.monitoring.register_event_listener(_on_cache_hit)


def compile_count() -> int:
    """Backend compilations since this module was imported (programs loaded from the cache left out)."""
    return _count - _cache_hits


def cache_hit_count() -> int:
    """Programs loaded from the persistent compilation cache instead of compiled."""
    return _cache_hits
