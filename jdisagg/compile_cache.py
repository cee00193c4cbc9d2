"""JAX's persistent compilation cache, on by default for ``jdisagg launch`` and ``jdisagg worker``.

Start-up compiles every prefill, insert and decode program of every replica; with a real model that is
minutes. The cache keeps each compiled executable on disk under a key of the program, its shardings, the
devices and the JAX/XLA versions, so a second launch with the same model, meshes and sizes loads them
instead of compiling (``jdisagg.compile_counter`` counts only real compilations). The library (``Engine``)
leaves the process's JAX settings alone: call ``enable_compile_cache`` to opt in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger("jdisagg.compile_cache")

OFF = "off"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jdisagg/xla``, i.e. ``~/.cache/jdisagg/xla`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jdisagg" / "xla"


def enable_compile_cache(setting: str | None = None) -> Path | None:
    """Turn the cache on in ``setting`` (a directory; None: ``default_cache_dir()``) or off (``"off"``).

    Every program is cached, however fast it compiled: JAX's default skips programs that compile in
    under a second, which on a small model is all of them. Returns the directory, or None when off.
    Raises ValueError when the directory cannot be created.
    """
    if setting == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(setting).expanduser() if setting else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot use {str(path)!r} as the compile cache: {exc.strerror}") from exc
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("compile cache: %s", path)
    return path
