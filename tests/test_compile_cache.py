"""The persistent compilation cache: a second start with the same model and meshes compiles nothing, and the
compile counter says so (JAX reports a program loaded from the cache as a compilation too)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from jdisagg.compile_cache import enable_compile_cache

# A fresh interpreter per start, as a second `jdisagg launch` would be: one CPU device, colocated 1x1, and
# the smallest sizes that serve "ROMEO:" plus 16 tokens (two prefill buckets, one batch bucket).
START = """
import sys
from jdisagg.compile_cache import enable_compile_cache
enable_compile_cache(sys.argv[1])
from jdisagg.compile_counter import cache_hit_count, compile_count
from jdisagg.engine import Engine
with Engine(None, colocate=True, max_context=32, max_batch=1, progress=False) as engine:
    ids = engine.generate(["ROMEO:"])[0].token_ids
    print(compile_count(), cache_hit_count(), engine._num_programs, *ids)
"""


def _start(cache_dir) -> tuple[int, int, int, list[int]]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", START, str(cache_dir)], capture_output=True, text=True,
                            env=env, timeout=600, check=True)
    compiles, hits, programs, *ids = map(int, result.stdout.split())
    return compiles, hits, programs, ids


def test_second_start_loads_every_program_from_the_cache(tmp_path):
    first_compiles, first_hits, programs, first_ids = _start(tmp_path)
    assert first_hits == 0 and first_compiles >= programs
    assert any(tmp_path.iterdir())
    compiles, hits, _, ids = _start(tmp_path)
    assert compiles == 0 and hits == first_compiles
    assert ids == first_ids


def test_off_and_bad_directories(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="cannot use .* as the compile cache"):
        enable_compile_cache(str(blocker / "cache"))
    suites_cache = jax.config.jax_enable_compilation_cache  # on: tests/conftest.py
    try:
        assert enable_compile_cache("off") is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", suites_cache)
