"""Public entry point: one signature, backend chosen by name or by the platform the call is lowered for."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax import lax

from ._shapes import check_inputs
from .gpu import paged_attention_gpu, unsupported_reason
from .reference import paged_attention_reference
from .tpu import paged_attention_tpu

_Impl = Callable[..., jax.Array]


def _implementations(scale: float, window: int | None, pages_per_block: int | None) -> dict[str, _Impl]:
    kw = {"scale": scale, "window": window}
    tuned = {**kw, "pages_per_block": pages_per_block}
    return {
        "reference": functools.partial(paged_attention_reference, **kw),
        "interpret": functools.partial(paged_attention_gpu, **tuned, interpret=True),
        "gpu": functools.partial(paged_attention_gpu, **tuned),
        "tpu-interpret": functools.partial(paged_attention_tpu, **tuned, interpret=True),
        "tpu": functools.partial(paged_attention_tpu, **tuned),
    }


def available_backends() -> tuple[str, ...]:
    """Backends runnable on this host: the CPU-capable ones plus the compiled kernel of any accelerator."""
    backends = ["reference", "interpret", "tpu-interpret"]
    for platform in ("gpu", "tpu"):
        try:
            if jax.devices(platform):
                backends.append(platform)
        except RuntimeError:
            pass
    return tuple(backends)


@functools.partial(jax.jit, static_argnames=("scale", "window", "backend", "pages_per_block"))
def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    window: int | None = None,
    backend: str | None = None,
    pages_per_block: int | None = None,
) -> jax.Array:
    """Decode attention over a paged KV cache; see docs/kernels.md for layouts and constraints.

    ``window`` (sliding-window models such as Mistral) limits each query to its sequence's last ``window``
    tokens; None attends to the whole sequence.

    With `backend=None` the choice is deferred to lowering via `lax.platform_dependent`: inside `jit` or
    `shard_map` the arrays are tracers with no device, but the platform the program is compiled for is
    known, and only the branch for that platform is lowered (CUDA/ROCm -> Triton kernel, TPU -> Mosaic
    kernel, anything else -> the jnp reference). It is jitted so that eager callers (tests, tools) get one
    compiled program instead of op-by-op dispatch; under an outer `jit` this is free.
    """
    dims = check_inputs(q, k_pages, v_pages, page_table, lengths, window)
    impls = _implementations(scale, window, pages_per_block)
    args = (q, k_pages, v_pages, page_table, lengths)
    if backend is None:
        # Shapes the Triton kernel cannot tile (non-power-of-two head_dim/page_size) fall back to the
        # reference on GPU rather than failing: every branch is traced, even on CPU.
        gpu = impls["reference"] if unsupported_reason(dims, pages_per_block) else impls["gpu"]
        return lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=impls["tpu"], default=impls["reference"])
    if backend not in impls:
        raise ValueError(f"unknown backend {backend!r}; expected None or one of {sorted(impls)}")
    return impls[backend](*args)
