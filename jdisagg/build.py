"""Building an engine's replicas: load the model onto each mesh, size the KV cache, place the page pools.

Everything that happens once, before serving: the layout of the meshes, reading the params straight into
each replica's sharding, the serving sizes and the number of KV pages the decode devices hold. ``Engine``
calls ``build_replicas`` and then only schedules.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from tqdm import tqdm

from jdisagg.local_prefill import local_shape
from jdisagg.memory import KVShape, decode_workspace, plan_kv_pages, resolve_kv_cache_dtype
from jdisagg.meshes import PHASE_RULES, Layout, build_layout, check_fits, param_sharding_fn
from jdisagg.models.config import ModelConfig
from jdisagg.models.loading import ModelSource, load_model
from jdisagg.replicas import DecodeReplica, PrefillReplica, build_decode_replica, build_prefill_replica
from jdisagg.serving.devices import devices_needed, provide_cpu_devices
from jdisagg.sizes import ServingSizes, plan_sizes
from jdisagg.tokenizer import Tokenizer

log = logging.getLogger("jdisagg.engine")


@dataclass
class Built:
    layout: Layout
    config: ModelConfig
    tokenizer: Tokenizer
    sizes: ServingSizes
    prefill: list[PrefillReplica]
    decode: list[DecodeReplica]
    local_prefill: bool  # the decode replicas compiled prefill-from-pages programs


def _load_onto(
    source: ModelSource, mesh: Any, phase: str, loaded: dict[Any, tuple[nnx.GraphDef, Any]]
) -> tuple[nnx.GraphDef, Any]:
    """One replica's params, read straight into the phase's sharding on its mesh (each device reads only
    its own slice), split into the graph and the state its programs take. Replicas with the same devices
    and rules (colocated prefill and decode) share one copy through ``loaded``."""
    key = (tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()), PHASE_RULES[phase])
    if key not in loaded:
        heads = {"num_heads": source.config.num_heads, "num_kv_heads": source.config.num_kv_heads}
        loaded[key] = nnx.split(source.load(param_sharding_fn(mesh, PHASE_RULES[phase], heads), fuse=True))
    return loaded[key]


def build_replicas(
    model: Any,
    *,
    tokenizer: Tokenizer | None,
    prefill_mesh: str,
    decode_mesh: str,
    colocate: bool,
    page_size: int,
    num_pages: int | None,
    max_batch: int,
    max_context: int | None,
    attention_backend: str | None,
    progress: bool,
    devices: Sequence[jax.Device] | None,
    dtype: str,
    kv_cache_dtype: str,
    kv_cache_gb: float | None,
    memory_fraction: float | None,
    prefix_cache: bool = False,
    local_prefill: bool | None = False,
    prefill_cache_gb: float | None = None,
) -> Built:
    """The replicas of an in-process engine (``Engine``'s arguments say what each one means). The
    programs only the prefix cache needs are compiled only with it: the prefill replicas' suffix
    hand-off with ``prefix_cache``, the decode replicas' prefill from pages with ``local_prefill`` (None:
    ``colocated_chunks_by_default`` on the decode devices' platform when colocated, else none)."""
    if devices is None:
        provide_cpu_devices(devices_needed(prefill_mesh, decode_mesh, colocate))
    layout = build_layout(prefill_mesh, decode_mesh, colocate=colocate, devices=devices)
    decode_devices = [d for mesh in layout.decode.replicas for d in mesh.devices.flat]
    source, tokenizer = load_model(model, tokenizer, dtype=dtype, platform=decode_devices[0].platform)
    if local_prefill is None:
        local_prefill = colocate and colocated_chunks_by_default(decode_devices[0].platform)
    config = source.config
    for phase in (layout.prefill, layout.decode):
        check_fits(phase.spec, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, phase=phase.name)
    sizes = plan_sizes(
        config, page_size=page_size, max_batch=max_batch, max_context=max_context, num_pages=num_pages
    )
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, str(config.dtype))
    log.info("%s", layout.describe())
    log.info("loading %s in %s (KV cache in %s)", source.description, config.dtype, kv_dtype)
    placed = tqdm(
        desc="loading params",
        total=len(layout.prefill.replicas) + len(layout.decode.replicas),
        disable=not progress,
        unit="replica",
    )
    prefill, decode_params, loaded = [], [], {}
    # The prefill replicas' own cache (jdisagg.prefill_cache) goes with the prefix cache; colocated it is off
    # unless asked for, as the decode pages on the same devices hold the prefix already. None: its default.
    if not prefix_cache or (colocate and prefill_cache_gb is None):
        prefill_cache_gb = 0.0
    cache_bytes = None if prefill_cache_gb is None else int(prefill_cache_gb * 2**30)
    for i, mesh in enumerate(layout.prefill.replicas):
        prefill.append(build_prefill_replica(i, mesh, *_load_onto(source, mesh, "prefill", loaded), sizes,
                                             suffix_handoff=prefix_cache, prefill_cache_bytes=cache_bytes))
        placed.update()
    for mesh in layout.decode.replicas:
        decode_params.append(_load_onto(source, mesh, "decode", loaded))
        placed.update()
    del loaded
    placed.close()
    kv = KVShape(config.num_layers, config.num_kv_heads, config.head_dim, layout.decode.spec.tp, kv_dtype)
    sizes = plan_kv_pages(
        sizes, kv, devices=decode_devices, num_pages=num_pages, kv_cache_gb=kv_cache_gb,
        memory_fraction=memory_fraction,
        workspace=lambda: decode_workspace(*decode_params[0], layout.decode.replicas[0], sizes, kv,
                                           attention_backend, local_shape(sizes) if local_prefill else None),
    )
    decode = [
        build_decode_replica(i, mesh, graphdef, state, sizes, attention_backend, kv_dtype,
                             local_chunk=None if local_prefill else 0)
        for i, (mesh, (graphdef, state)) in enumerate(zip(layout.decode.replicas, decode_params, strict=True))
    ]
    return Built(layout, config, tokenizer, sizes, prefill, decode, local_prefill)


def colocated_chunks_by_default(platform: str) -> bool:
    """Whether a colocated engine prefills prompts in chunks between decode steps unless told otherwise.

    On an accelerator a prefill program and a decode step queue on the same device, so a long prompt
    stalls every stream unless it is cut into chunks (Sarathi-Serve's aggregated baseline). On the CPU the
    two run at once, each on its own cores, and the measured best is the unchunked prompt on the prefill
    thread: mean TPOT 13.5 ms against 32.8-59.6 ms for step budgets 64-512 on the heavy interference
    workload (docs/benchmarks.md, "Interference")."""
    return platform != "cpu"


def compile_programs(executors: Sequence[Any], progress: bool) -> int:
    """Run every executor's compile tasks once, with a progress bar; the number of programs."""
    tasks = [task for executor in executors for task in executor.compile_tasks()]
    bar = tqdm(tasks, desc="compiling", disable=not progress, unit="program")
    for name, run in bar:
        bar.set_postfix_str(name)
        run()
    return len(tasks)
