"""KV pages sized from a memory budget, serving dtypes, and refusals that name their numbers."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jdisagg.engine import Engine
from jdisagg.memory import (
    GIB,
    KVShape,
    budget_from_memory,
    decode_workspace,
    pages_for_budget,
    resolve_kv_cache_dtype,
)
from jdisagg.meshes import PHASE_RULES, TP_AXIS, param_sharding_fn
from jdisagg.models.demo import DEMO_CONFIG
from jdisagg.models.loading import load_model, serving_dtype
from jdisagg.sampling_params import SamplingParams
from jdisagg.sizes import plan_sizes

DEMO_KV = KVShape(DEMO_CONFIG.num_layers, DEMO_CONFIG.num_kv_heads, DEMO_CONFIG.head_dim, tp=2,
                  dtype="float32")


def test_page_bytes_follow_the_kv_split_and_dtype():
    # 4 layers x k and v x 2 of 4 kv heads per device x 16 tokens x 32 dims x 4 bytes
    assert DEMO_KV.page_bytes(16) == 4 * 2 * 2 * 16 * 32 * 4
    assert KVShape(4, 4, 32, tp=2, dtype="bfloat16").page_bytes(16) == DEMO_KV.page_bytes(16) // 2
    # 8 devices, 4 kv heads: each is repeated to 8 and every device stores one
    assert KVShape(4, 4, 32, tp=8, dtype="float32").page_bytes(16) == DEMO_KV.page_bytes(16) // 2


def test_pages_for_budget_and_its_refusal():
    page = DEMO_KV.page_bytes(16)
    plan = pages_for_budget(100 * page + page // 2, DEMO_KV, page_size=16, max_context=512, source="test")
    assert plan.num_pages == 100
    assert plan.tokens == 99 * 16
    assert plan.full_context_sequences == 3  # 99 pages // 32 pages per 512 tokens
    with pytest.raises(ValueError, match=r"holds 32 pages of 32768 bytes; one sequence of the full context "
                                         r"512 needs 33"):
        pages_for_budget(32 * page, DEMO_KV, page_size=16, max_context=512, source="test")


def test_memory_fraction_needs_memory_stats():
    with pytest.raises(ValueError, match="report no memory stats"):
        budget_from_memory(jax.devices()[:1], 0.9, lambda: 0)
    with pytest.raises(ValueError, match=r"memory_fraction must be in \(0, 1\]"):
        budget_from_memory(jax.devices()[:1], 1.5, lambda: 0)


def test_dtypes_resolve():
    assert serving_dtype("auto", "float32", "cpu") == "float32"
    assert serving_dtype("auto", "float32", "gpu") == "bfloat16"
    assert serving_dtype("float16", "float32", "tpu") == "float16"
    assert resolve_kv_cache_dtype("auto", "float32") == "float32"
    assert resolve_kv_cache_dtype("bfloat16", "float32") == "bfloat16"
    with pytest.raises(ValueError, match="neither the model's dtype"):
        resolve_kv_cache_dtype("float16", "float32")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(None, dtype="int8")
    source, _ = load_model(None, dtype="bfloat16", platform="cpu")
    assert source.config.dtype == "bfloat16"


def test_engine_sizes_kv_from_a_budget_in_bfloat16():
    """bf16 params, bf16 KV pages sized from a per-device budget: the pool has exactly the pages the
    budget pays for, and the engine serves from it."""
    page = KVShape(4, 4, 32, tp=2, dtype="bfloat16").page_bytes(16)
    budget_pages = 40
    with Engine(None, prefill_mesh="2x1", decode_mesh="2x1", max_context=64, max_batch=2, progress=False,
                dtype="bfloat16", kv_cache_dtype="bfloat16", kv_cache_gb=budget_pages * page / GIB) as engine:
        assert engine.config.dtype == "bfloat16"
        assert engine.stats()["pages_total"] == [budget_pages - 1]
        pools = engine._decode[0].pools
        assert pools[0][0].dtype == np.dtype("bfloat16")
        out = engine.generate(["ROMEO:"], SamplingParams(max_tokens=8))[0]
        assert len(out.token_ids) == 8


def test_engine_refuses_a_budget_without_room_for_one_full_context():
    refusal = (r"KV budget of .* GiB per decode device \(kv_cache_gb=0.0001\) holds \d+ pages of 65536 "
               r"bytes; one sequence of the full context 1024 needs 65")
    with pytest.raises(ValueError, match=refusal):
        Engine(None, decode_mesh="1x1", max_context=1024, progress=False, kv_cache_gb=0.0001)
    with pytest.raises(ValueError, match="report no memory stats"):
        Engine(None, decode_mesh="1x1", max_context=64, progress=False, memory_fraction=0.5)


def test_cli_refuses_a_kv_budget_too_small_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "jdisagg.cli", "launch", "--port", "0", "--metrics-port", "0", "--no-progress",
         "--http-port", "0", "--prefill-mesh", "1x1", "--decode-mesh", "1x1", "--kv-cache-gb", "0.0001",
         "--compile-cache", "off"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("jdisagg: error:")]
    assert len(errors) == 1
    assert "holds 1 pages" in errors[0] and "needs 65" in errors[0], result.stderr


def test_decode_workspace_is_measured_and_grows_with_batch_and_context():
    """The reserve subtracted from device memory comes from the compiled decode program itself."""
    source, _ = load_model(None)
    mesh = Mesh(np.array(jax.devices()[:2]), (TP_AXIS,))
    heads = {"num_heads": DEMO_CONFIG.num_heads, "num_kv_heads": DEMO_CONFIG.num_kv_heads}
    graphdef, state = nnx.split(source.load(param_sharding_fn(mesh, PHASE_RULES["decode"], heads)))

    def workspace(max_batch: int, max_context: int) -> int:
        sizes = plan_sizes(DEMO_CONFIG, page_size=16, max_batch=max_batch, max_context=max_context,
                           num_pages=None)
        return decode_workspace(graphdef, state, mesh, sizes, DEMO_KV, None)

    small, large = workspace(2, 128), workspace(4, 512)
    assert 0 < small and 4 * small <= large
