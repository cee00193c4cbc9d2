"""How many KV pages a decode replica gets: from the memory its devices have left, or from a stated budget.

On GPU/TPU, ``device.memory_stats()`` says how much memory a device has and how much is already taken (the
params of every replica placed on it); the pages get ``fraction`` of the memory minus that, minus a
workspace reserve measured from the compiled decode program (its temporaries: activations, the gathered
KV of the attention fallback). CPU devices report no stats, so there the budget is stated in bytes.
Either way the page count is per decode device, so every device of a replica gets the same number of pages.
A budget that cannot hold one full-context sequence lowers a context that defaulted to the model's to the
largest that fits (logged, down to ``sizes.MIN_FITTED_CONTEXT``), and is refused with the numbers otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jdisagg.kv_cache import kv_sharding
from jdisagg.meshes import stored_kv_heads
from jdisagg.programs import compile_decode, compile_local_prefill
from jdisagg.sizes import DEFAULT_SLOT_TOKENS, MIN_FITTED_CONTEXT, ServingSizes, fitted_context

log = logging.getLogger("jdisagg.memory")

GIB = 1 << 30
DEFAULT_MEMORY_FRACTION = 0.9  # of each decode device's memory, on GPU/TPU


@dataclass(frozen=True)
class KVShape:
    """What one KV page costs on one device of a decode replica."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp: int
    dtype: str

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page (k and v, every layer) on one device: kv heads split over tp when they divide
        (after repeating them up to tp when there are fewer), else every device stores them all."""
        stored = stored_kv_heads(self.num_kv_heads, self.tp)
        local = stored // self.tp if stored % self.tp == 0 else stored
        return 2 * self.num_layers * local * page_size * self.head_dim * jnp.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class KVPlan:
    """The page count and the numbers it came from, for the start-up log and for refusals."""

    num_pages: int  # scratch page included
    budget_bytes: int  # per decode device
    page_bytes: int  # per decode device
    page_size: int
    max_context: int
    source: str  # where the budget came from, in words

    @property
    def tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    @property
    def full_context_sequences(self) -> int:
        return (self.num_pages - 1) // (self.max_context // self.page_size)

    def describe(self) -> str:
        return (f"KV cache: {self.num_pages - 1} pages of {self.page_size} tokens per decode replica "
                f"({self.tokens} tokens, {self.full_context_sequences} concurrent sequences at the full "
                f"context of {self.max_context}; {self.budget_bytes / GIB:.3g} GiB per decode device from "
                f"{self.source}, {self.page_bytes} bytes per page)")


def pages_for_budget(
    budget_bytes: int, kv: KVShape, *, page_size: int, max_context: int, source: str,
    context_from_model: bool = False,
) -> KVPlan:
    """The pages a per-device budget holds (plus the scratch page, which the budget also pays for).

    When one full-context sequence does not fit: a context that came from the model is lowered to the
    largest whole-page context that does (logged with the reason; ``sizes.fitted_context`` says how far);
    otherwise, or below that floor, ValueError naming the numbers.
    """
    page_bytes = kv.page_bytes(page_size)
    num_pages = max(budget_bytes, 0) // page_bytes
    need = max_context // page_size + 1
    if num_pages < need:
        fitted = fitted_context(max_context, num_pages - 1, page_size) if context_from_model else None
        refusal = (f"KV budget of {budget_bytes / GIB:.3g} GiB per decode device ({source}) holds "
                   f"{num_pages} pages of {page_bytes} bytes; one sequence of the full context {max_context} "
                   f"needs {need} (page_size {page_size}, scratch page included)")
        if fitted is None:
            floor = (f"; the largest context it holds, {max(num_pages - 1, 0) * page_size} tokens, is below "
                     f"the {min(MIN_FITTED_CONTEXT, max_context)} a default context may be lowered to"
                     if context_from_model else "")
            raise ValueError(f"{refusal}{floor}: give more memory, or lower max_context")
        log.warning("max_context lowered from the model's %d to %d: %s", max_context, fitted, refusal)
        max_context = fitted
    return KVPlan(num_pages, budget_bytes, page_bytes, page_size, max_context, source)


def budget_from_memory(
    devices: Sequence[jax.Device], fraction: float, workspace: Callable[[], int]
) -> tuple[int, int]:
    """``fraction`` of the smallest device's memory, minus what is in use there, minus the workspace
    (measured only once the devices are known to report their memory); returns (budget, workspace).

    Raises ValueError on a platform whose devices report no memory stats (CPU).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {fraction}")
    stats = [device.memory_stats() for device in devices]
    if not all(s and "bytes_limit" in s for s in stats):
        raise ValueError(f"{devices[0].platform} devices report no memory stats: state the KV budget "
                         "instead (kv_cache_gb / --kv-cache-gb) or the page count (--num-pages)")
    reserve = workspace()
    return min(int(fraction * s["bytes_limit"]) - s["bytes_in_use"] for s in stats) - reserve, reserve


def workspace_bytes(compiled: jax.stages.Compiled) -> int:
    """Temporary memory one run of a compiled program needs beyond its arguments and outputs."""
    analysis = compiled.memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)


KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def resolve_kv_cache_dtype(requested: str, model_dtype: str) -> str:
    """``auto`` is the model's dtype; otherwise the model's dtype or bfloat16 (half the bytes of float32)."""
    if requested not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {requested!r}")
    chosen = model_dtype if requested == "auto" else requested
    if chosen not in (model_dtype, "bfloat16"):
        raise ValueError(
            f"kv_cache_dtype {requested} is neither the model's dtype ({model_dtype}) nor bfloat16"
        )
    return chosen


def plan_kv_pages(
    sizes: ServingSizes,
    kv: KVShape,
    *,
    devices: Sequence[jax.Device],
    num_pages: int | None,
    kv_cache_gb: float | None,
    memory_fraction: float | None,
    workspace: Callable[[], int],
) -> ServingSizes:
    """``sizes`` with the page count a decode replica gets, logged with what it holds.

    In order: ``num_pages`` as given; ``kv_cache_gb`` per decode device; ``memory_fraction`` of each
    decode device's memory (default 0.9 on GPU/TPU, where ``workspace()`` is measured); on CPU with none
    of them, ``sizes`` as planned (``plan_sizes``' default pages). The returned ``max_context`` is lower
    than planned when a defaulted context did not fit the budget.
    """
    platform = devices[0].platform
    if num_pages is not None:
        plan = KVPlan(sizes.num_pages, sizes.num_pages * kv.page_bytes(sizes.page_size),
                      kv.page_bytes(sizes.page_size), sizes.page_size, sizes.max_context, "num_pages")
    elif kv_cache_gb is not None:
        if kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be positive, got {kv_cache_gb}")
        plan = pages_for_budget(int(kv_cache_gb * GIB), kv, page_size=sizes.page_size,
                                max_context=sizes.max_context, source=f"kv_cache_gb={kv_cache_gb:g}",
                                context_from_model=sizes.context_from_model)
    elif memory_fraction is not None or platform != "cpu":
        fraction = DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction
        budget, reserve = budget_from_memory(devices, fraction, workspace)
        plan = pages_for_budget(
            budget, kv, page_size=sizes.page_size, max_context=sizes.max_context,
            source=f"memory_fraction={fraction:g} less params and a {reserve / GIB:.3g} GiB workspace",
            context_from_model=sizes.context_from_model,
        )
    else:
        slots = ("every batch slot holds a full context" if not sizes.context_from_model else
                 f"every batch slot holds up to {DEFAULT_SLOT_TOKENS} tokens, one sequence the full context")
        plan = KVPlan(sizes.num_pages, sizes.num_pages * kv.page_bytes(sizes.page_size),
                      kv.page_bytes(sizes.page_size), sizes.page_size, sizes.max_context,
                      f"the default on {platform}: {slots}")
    log.info("%s", plan.describe())
    return dataclasses.replace(sizes, num_pages=plan.num_pages, max_context=plan.max_context)


def decode_workspace(
    graphdef: nnx.GraphDef, state: Any, mesh: Mesh, sizes: ServingSizes, kv: KVShape, backend: str | None,
    local_prefill: tuple[int, int] | None = None,
) -> int:
    """Temporaries of the decode program at the largest batch, measured by compiling it over an abstract
    two-page pool (its temporaries grow with batch and context, not with the pool, which it updates in
    place). With ``local_prefill`` (chunks per call, tokens per chunk: ``local_prefill.local_shape``) the
    larger of that and the local prefill program's: the two run one after the other on the same devices,
    never at once."""
    stored = stored_kv_heads(kv.num_kv_heads, kv.tp)
    sharding = kv_sharding(mesh, stored, head_axis=0)
    page = jax.ShapeDtypeStruct((stored, 2, sizes.page_size, kv.head_dim), kv.dtype, sharding=sharding)
    pools = [(page, page) for _ in range(kv.num_layers)]
    compiled = compile_decode(graphdef, state, pools, mesh, sizes.max_batch, sizes.max_pages, sizes.page_size,
                              stored, kv.head_dim**-0.5, backend)
    if local_prefill is None:
        return workspace_bytes(compiled)
    chunks, tokens = local_prefill
    blocks = tokens // sizes.page_size  # the table width the local program reads, in whole key blocks
    local = compile_local_prefill(graphdef, state, pools, mesh, chunks, tokens,
                                  -(-sizes.max_pages // blocks) * blocks, sizes.page_size, stored, blocks)
    return max(workspace_bytes(compiled), workspace_bytes(local))
