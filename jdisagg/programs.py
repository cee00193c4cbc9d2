"""The compiled programs: prefill, KV insert and decode, as pure functions AOT-compiled per bucket.

Each function here is pure (params and page pools in, tokens and new pools out) and is compiled once per
shape bucket and replica at start-up with ``jit(...).lower(...).compile()``. Serving then only calls
compiled executables, so a request of a new length never triggers a compile on the hot path.

- prefill[T]   (prefill replica, TP): causal forward over a prompt padded to T; returns the logits of the
               first token and the prompt's KV as ``[layers, T, kv_heads, head_dim]``. T up to the chunk
               length C only: a longer prompt runs prefill_chunk.
- prefill_chunk[C] (prefill replica, TP): C tokens of a longer prompt at an offset, attending blockwise
               (``jdisagg.models.chunk_attention``) to the KV of the chunks before, which it keeps in a dense
               per-prompt buffer of the whole context (donated in, updated, returned); returns the chunk's
               KV ``[layers, C, kv_heads, head_dim]`` as one piece of the hand-off, and the logits at the
               prompt's last token (used from the chunk that holds it). One program for every chunk.
- prefill[B, T] (prefill replica, TP): prefill[T] for B prompts at once, each padded to T (compiled only
               where B*T is within the prefill token budget); each row's KV is an output of its own, so a
               prompt's hand-off is exactly prefill[T]'s; ``sample_rows[B]`` cuts its first tokens into rows.
- insert[T]    (decode replica): scatters one prompt's KV (or one chunk piece of it) into its pages of the
               donated pools.
- decode[B, P] (decode replica, TP): one token for each of B sequences whose page tables fit P pages (so a
               step reads the live context, not ``max_context``); writes the new KV into its page and
               runs paged attention through ``jdisagg.kernels`` in ``shard_map`` (kernels see local heads).
- prefill_local[N, C] (decode replica, TP): up to N prompt chunks of at most C tokens, each at its own
               offset, attending to its sequence's earlier KV in the pools (``paged_chunk_attention``:
               blocks gathered from the page table as they are visited) after writing the chunk's own KV
               into its pages; returns the logits after each chunk's last token and the updated pools.
- kv_window[T, S] (prefill replica): S tokens of a prompt's KV from a token offset, out of one piece of T
               tokens or two consecutive chunk pieces, zero-padded past them: the suffix-only hand-off of a
               prompt whose prefix the decode replica already holds (``jdisagg.kv_suffix``).
- kv_seed      (prefill replica, with its prefix cache): one cached chunk piece written back into a long
               prompt's buffer at its offset, so prefill_chunk starts at the first uncached chunk
               (``jdisagg.prefill_cache``).
- sample[B]    (both): tokens from logits (``jdisagg.sampling``), a program of its own so the sampler is
               compiled once per batch bucket rather than into every prefill and decode program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdisagg.executors import Sampled
from jdisagg.kernels import paged_attention
from jdisagg.kv_cache import KVPools
from jdisagg.kv_manager import SCRATCH_PAGE
from jdisagg.meshes import TP_AXIS
from jdisagg.models.chunk_attention import chunk_attention, paged_chunk_attention
from jdisagg.sampling import SampleBranches, sample_tokens
from jdisagg.sampling_params import TOP_LOGPROBS

P = PartitionSpec


def _repeat_kv(x: jax.Array, stored_heads: int, axis: int) -> jax.Array:
    """Repeat kv heads so each of ``stored_heads`` shards holds the head its query heads use."""
    reps = stored_heads // x.shape[axis]
    return x if reps == 1 else jnp.repeat(x, reps, axis=axis)


def prefill_fn(
    graphdef: nnx.GraphDef, state: Any, tokens: jax.Array, length: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens ``[1, T]`` (prompt padded at the end), length ``[]`` -> logits of the next token ``[1, V]``
    (float32), k, v ``[L, T, KVH, D]``."""
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    hidden, kvs = model.prefill(tokens, positions)
    last = jax.lax.dynamic_slice_in_dim(hidden[0], length - 1, 1)
    logits = model.logits(last).astype(jnp.float32)
    k = jnp.stack([k[0] for k, _ in kvs])
    v = jnp.stack([v[0] for _, v in kvs])
    return logits, k, v


KVBuffer = list[tuple[jax.Array, jax.Array]]  # per layer (k, v) ``[capacity, kv_heads, head_dim]``


def _buffer_attend(start: jax.Array, chunk: int) -> Callable:
    """The model's ``attend`` callback for a prompt chunk: write its k/v into the buffer at ``start``, then
    attend blockwise over the buffer up to the chunk's end (blocks of the chunk length, so the blocks read
    are exactly the ones this prompt's chunks wrote)."""

    def attend(q, k, v, cache, window=None):
        k_buf, v_buf = cache
        k_buf = jax.lax.dynamic_update_slice_in_dim(k_buf, k[0].astype(k_buf.dtype), start, axis=0)
        v_buf = jax.lax.dynamic_update_slice_in_dim(v_buf, v[0].astype(v_buf.dtype), start, axis=0)
        out = chunk_attention(q[0], k_buf, v_buf, start, block=chunk, window=window)
        return out[None], (k_buf, v_buf)

    return attend


def chunk_prefill_fn(
    graphdef: nnx.GraphDef, state: Any, buffer: KVBuffer, tokens: jax.Array, start: jax.Array,
    length: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, KVBuffer]:
    """tokens ``[1, C]``: prompt tokens ``start .. start + C - 1`` (the last chunk padded at the end) of a
    prompt of ``length`` tokens, ``buffer`` holding the KV of positions before ``start`` -> logits of the
    token after the prompt ``[1, V]`` (float32; meaningful from the chunk holding position ``length - 1``),
    this chunk's k, v ``[L, C, KVH, D]``, and the buffer with them written."""
    model = nnx.merge(graphdef, state)
    chunk = tokens.shape[1]
    positions = (start + jnp.arange(chunk, dtype=jnp.int32))[None]
    hidden, buffer = model.prefill_chunk(tokens, positions, buffer, _buffer_attend(start, chunk))
    last = jax.lax.dynamic_slice_in_dim(hidden[0], jnp.clip(length - 1 - start, 0, chunk - 1), 1)
    logits = model.logits(last).astype(jnp.float32)
    k = jnp.stack([jax.lax.dynamic_slice_in_dim(kb, start, chunk) for kb, _ in buffer])
    v = jnp.stack([jax.lax.dynamic_slice_in_dim(vb, start, chunk) for _, vb in buffer])
    return logits, k, v, buffer


def insert_fn(
    page_size: int, stored_heads: int, pools: KVPools, k: jax.Array, v: jax.Array, page_ids: jax.Array
) -> KVPools:
    """Scatter ``[L, T, KVH, D]`` into pages ``page_ids`` ``[T // page_size]`` (padding: scratch page)."""

    def scatter(pool: jax.Array, x: jax.Array) -> jax.Array:
        x = _repeat_kv(x, stored_heads, axis=1)
        pages = x.reshape(-1, page_size, stored_heads, x.shape[-1]).transpose(2, 0, 1, 3)
        return pool.at[:, page_ids].set(pages.astype(pool.dtype))

    return [(scatter(kp, k[i]), scatter(vp, v[i])) for i, (kp, vp) in enumerate(pools)]


def _paged_attend(
    mesh: Mesh,
    page_size: int,
    stored_heads: int,
    scale: float,
    backend: str | None,
    page_table: jax.Array,
    positions: jax.Array,
) -> Callable:
    """The model's ``attend`` callback for decode: write this step's k/v into its page, then attend."""
    tp = mesh.shape[TP_AXIS]
    heads = P(None, TP_AXIS, None)
    pool = P(TP_AXIS) if stored_heads % tp == 0 else P()

    def local(window, q, k, v, kp, vp, page_table, positions):
        rows = jnp.arange(q.shape[0])
        page = page_table[rows, positions // page_size]
        slot = positions % page_size
        kp = kp.at[:, page, slot].set(k.transpose(1, 0, 2).astype(kp.dtype))
        vp = vp.at[:, page, slot].set(v.transpose(1, 0, 2).astype(vp.dtype))
        out = paged_attention(
            q, kp, vp, page_table, positions + 1, scale=scale, window=window, backend=backend
        )
        return out, kp, vp

    @functools.cache
    def sharded(window: int | None) -> Callable:
        return jax.shard_map(
            functools.partial(local, window),
            mesh=mesh,
            in_specs=(heads, heads, heads, pool, pool, P(), P()),
            out_specs=(heads, pool, pool),
            check_vma=False,
        )

    def attend(q, k, v, cache, window=None):
        kp, vp = cache
        k = _repeat_kv(k, stored_heads, axis=1)
        v = _repeat_kv(v, stored_heads, axis=1)
        out, kp, vp = sharded(window)(q, k, v, kp, vp, page_table, positions)
        return out, (kp, vp)

    return attend


def decode_fn(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    page_size: int,
    stored_heads: int,
    scale: float,
    backend: str | None,
    state: Any,
    pools: KVPools,
    tokens: jax.Array,
    positions: jax.Array,
    page_table: jax.Array,
) -> tuple[jax.Array, KVPools]:
    """tokens ``[B]`` at ``positions`` ``[B]`` -> logits of each row's next token ``[B, V]`` (float32), the
    updated pools."""
    model = nnx.merge(graphdef, state)
    attend = _paged_attend(mesh, page_size, stored_heads, scale, backend, page_table, positions)
    logits, pools = model.decode(tokens, positions, pools, attend)
    return logits.astype(jnp.float32), pools


def packed_decode_fn(
    decode: Callable[..., tuple[jax.Array, KVPools]], state: Any, pools: KVPools, tokens: jax.Array,
    step_inputs: jax.Array,
) -> tuple[jax.Array, KVPools, jax.Array, jax.Array]:
    """``decode`` (``decode_fn`` with its static arguments bound) with its per-step host inputs in one
    array, ``step_inputs`` ``[B, 1 + W]`` int32: column 0 each row's position, the rest its page table. A
    step then costs at most one host-to-device copy, not one per input: on a GPU each ``jax.device_put``
    of a host array is a staged copy the decode thread waits for.

    Also returns ``positions + 1``, the positions the sampler seeds its rows with, and the next step's
    inputs (every position one further, the same page tables): while no row crosses into a new page, the
    next step reads those and nothing is uploaded at all."""
    logits, pools = decode(state, pools, tokens, step_inputs[:, 0], step_inputs[:, 1:])
    successor = step_inputs.at[:, 0].add(1)
    return logits, pools, successor[:, 0], successor


def _local_attend(
    mesh: Mesh, page_size: int, stored_heads: int, pages_per_block: int, page_table: jax.Array,
    starts: jax.Array, lengths: jax.Array,
) -> Callable:
    """The model's ``attend`` callback for chunks prefilled on the decode replica: write each chunk's k/v
    into its pages (padding tokens into the scratch page), then attend each row over its own pages."""
    tp = mesh.shape[TP_AXIS]
    heads = P(None, None, TP_AXIS, None)
    pool = P(TP_AXIS) if stored_heads % tp == 0 else P()

    def local(window, q, k, v, kp, vp, page_table, starts, lengths):
        offsets = jnp.arange(q.shape[1])
        positions = starts[:, None] + offsets
        real = offsets[None] < lengths[:, None]
        index = jnp.minimum(positions // page_size, page_table.shape[1] - 1)
        page = jnp.where(real, jnp.take_along_axis(page_table, index, axis=1), SCRATCH_PAGE)
        slot = positions % page_size
        kp = kp.at[:, page, slot].set(k.transpose(2, 0, 1, 3).astype(kp.dtype))
        vp = vp.at[:, page, slot].set(v.transpose(2, 0, 1, 3).astype(vp.dtype))

        def row(q_row, table_row, start, length):
            return paged_chunk_attention(q_row, kp, vp, table_row, start, start + length,
                                         pages_per_block=pages_per_block, window=window)

        return jax.vmap(row)(q, page_table, starts, lengths), kp, vp

    @functools.cache
    def sharded(window: int | None) -> Callable:
        return jax.shard_map(
            functools.partial(local, window),
            mesh=mesh,
            in_specs=(heads, heads, heads, pool, pool, P(), P(), P()),
            out_specs=(heads, pool, pool),
            check_vma=False,
        )

    def attend(q, k, v, cache, window=None):
        kp, vp = cache
        k = _repeat_kv(k, stored_heads, axis=2)
        v = _repeat_kv(v, stored_heads, axis=2)
        out, kp, vp = sharded(window)(q, k, v, kp, vp, page_table, starts, lengths)
        return out, (kp, vp)

    return attend


def local_prefill_fn(
    graphdef: nnx.GraphDef,
    mesh: Mesh,
    page_size: int,
    stored_heads: int,
    pages_per_block: int,
    state: Any,
    pools: KVPools,
    tokens: jax.Array,
    starts: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
) -> tuple[jax.Array, KVPools]:
    """tokens ``[N, C]`` (row n: positions ``starts[n] ..``, its first ``lengths[n]`` real; a padding row
    has length 0 and an all-scratch page table) -> logits after each row's last real token ``[N, V]``
    (float32) and the pools with every chunk's KV written."""
    model = nnx.merge(graphdef, state)
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    attend = _local_attend(mesh, page_size, stored_heads, pages_per_block, page_table, starts, lengths)
    hidden, pools = model.prefill_chunk(tokens, positions, pools, attend)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return model.logits(last).astype(jnp.float32), pools


def packed_local_prefill_fn(
    prefill: Callable[..., tuple[jax.Array, KVPools]], chunk: int, state: Any, pools: KVPools,
    call_inputs: jax.Array,
) -> tuple[jax.Array, KVPools, jax.Array]:
    """``prefill`` (``local_prefill_fn`` with its static arguments bound) with its host inputs in one
    array, ``call_inputs`` ``[N, chunk + 2 + W]`` int32: each row's tokens, start, length and page table,
    so a call costs one host-to-device copy, not four (see ``packed_decode_fn``). Also returns ``starts +
    lengths``, the position each row's sampled token takes, so the sampler needs no upload either."""
    starts, lengths = call_inputs[:, chunk], call_inputs[:, chunk + 1]
    tokens, page_table = call_inputs[:, :chunk], call_inputs[:, chunk + 2 :]
    logits, pools = prefill(state, pools, tokens, starts, lengths, page_table)
    return logits, pools, starts + lengths


# jaxlib 0.10's CPU backend hands dots to YNNPACK by default. For matmuls of a few rows, a decode step's one
# token per sequence, XLA's own (Eigen) dots are faster: the 124M model's decode step measured 1.23x, 1.3x
# and 1.38x faster at batch 4, 16 and 32 on this project's 2-core CPU, the same at batch 1, and slower from
# 64 rows on (0.93x at 64; a 1,024-row prefill 0.73x). So CPU programs of at most this many rows opt out.
FEW_ROWS = 32
_EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compile_program(lowered: jax.stages.Lowered, *, platform: str, rows: int) -> jax.stages.Compiled:
    """``lowered.compile()``, with XLA's Eigen dots on ``platform`` "cpu" when the program's matmuls have
    at most ``FEW_ROWS`` rows (a jaxlib without the option compiles with its defaults)."""
    if rows > FEW_ROWS or platform != "cpu":
        return lowered.compile()
    try:
        return lowered.compile(compiler_options=_EIGEN_DOTS)
    except jax.errors.JaxRuntimeError as error:
        if "No such compile option" not in str(error):
            raise
        return lowered.compile()


def _compile(lowered: jax.stages.Lowered, mesh: Mesh, rows: int) -> jax.stages.Compiled:
    return compile_program(lowered, platform=mesh.devices.flat[0].platform, rows=rows)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _spec(shape: tuple[int, ...], dtype: Any, mesh: Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def compile_sample(
    batch: int, vocab: int, mesh: Mesh, branches: SampleBranches | None = None
) -> jax.stages.Compiled:
    """The sampler as a program of its own, compiled per batch bucket only: prefill and decode hand it their
    logits on device, so it is not compiled again into every (batch, page-table width) decode program.
    ``branches``: built for batches that need exactly those parts, with no ``lax.cond`` (``SampleBranches``);
    None: one program for every batch. Takes ``packed_sample_fn``'s arguments."""
    specs = (
        _spec((batch, vocab), jnp.float32, mesh),  # logits
        _spec((2, batch), jnp.float32, mesh),  # temperature, top_p
        _spec((4, batch), jnp.int32, mesh),  # top_k, seeds (their bits), forced, num_top
        _spec((batch,), jnp.int32, mesh),  # positions
    )
    return jax.jit(_sample_fn(branches), out_shardings=NamedSharding(mesh, P())).lower(*specs).compile()


def packed_sample_fn(
    branches: SampleBranches | None, logits: jax.Array, floats: jax.Array, ints: jax.Array,
    positions: jax.Array,
) -> Sampled:
    """``sample_tokens`` with its per-row settings in two arrays, ``floats`` ``[2, B]`` (temperature,
    top_p) and ``ints`` ``[4, B]`` (top_k, the seeds' uint32 bits as int32, forced, num_top): a new batch
    composition uploads two host arrays, not six (each a staged copy the decode thread waits for on a
    GPU). ``positions`` arrive separately, from the decode program or the host."""
    seeds = jax.lax.bitcast_convert_type(ints[1], jnp.uint32)
    return sample_tokens(logits, floats[0], ints[0], floats[1], seeds, positions, ints[2], ints[3],
                         branches=branches)


@functools.cache
def _sample_fn(branches: SampleBranches | None) -> Callable[..., Sampled]:
    """One function object per ``branches``: JAX keys its in-memory trace and compile caches on the
    function, so replicas on the same devices (a colocated engine's prefill and decode) share one
    compiled sample program per batch instead of compiling it again."""
    return functools.partial(packed_sample_fn, branches)


def compile_prefill(
    graphdef: nnx.GraphDef, state: Any, mesh: Mesh, length: int, kv_out: NamedSharding
) -> jax.stages.Compiled:
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(
        functools.partial(prefill_fn, graphdef), out_shardings=(replicated, kv_out, kv_out)
    )
    lowered = fn.lower(_abstract(state), _spec((1, length), jnp.int32, mesh), _spec((), jnp.int32, mesh))
    return _compile(lowered, mesh, rows=length)


def prefill_batch_fn(
    graphdef: nnx.GraphDef, state: Any, tokens: jax.Array, lengths: jax.Array
) -> tuple[jax.Array, tuple[tuple[jax.Array, jax.Array], ...]]:
    """tokens ``[B, T]`` (each prompt padded at the end), lengths ``[B]`` -> logits of each row's next token
    ``[B, V]`` (float32) and per row its own (k, v) ``[L, T, KVH, D]``, as ``prefill_fn`` gives for that
    prompt alone: separate outputs, so each prompt's KV is handed off (and freed) on its own."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, kvs = model.prefill(tokens, positions)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    logits = model.logits(last).astype(jnp.float32)
    k = jnp.stack([k for k, _ in kvs], axis=1)  # [B, L, T, KVH, D]
    v = jnp.stack([v for _, v in kvs], axis=1)
    return logits, tuple((k[row], v[row]) for row in range(tokens.shape[0]))


def compile_prefill_batch(
    graphdef: nnx.GraphDef, state: Any, mesh: Mesh, batch: int, length: int, kv_out: NamedSharding
) -> jax.stages.Compiled:
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(
        functools.partial(prefill_batch_fn, graphdef),
        out_shardings=(replicated, tuple((kv_out, kv_out) for _ in range(batch))),
    )
    lowered = fn.lower(
        _abstract(state), _spec((batch, length), jnp.int32, mesh), _spec((batch,), jnp.int32, mesh)
    )
    return _compile(lowered, mesh, rows=batch * length)


def compile_sample_rows(batch: int, mesh: Mesh) -> jax.stages.Compiled:
    """Sampled ``[batch, ...]`` -> ``batch`` one-row Sampled on device: a batched prefill hands each prompt
    its first token as ``prefill[T]`` does, without blocking on the host or compiling a slice per row."""
    specs = Sampled(
        _spec((batch,), jnp.int32, mesh),
        _spec((batch,), jnp.float32, mesh),
        _spec((batch, TOP_LOGPROBS), jnp.int32, mesh),
        _spec((batch, TOP_LOGPROBS), jnp.float32, mesh),
    )

    def rows(sampled: Sampled) -> tuple[Sampled, ...]:
        return tuple(Sampled(*(x[row : row + 1] for x in sampled)) for row in range(batch))

    return jax.jit(rows, out_shardings=NamedSharding(mesh, P())).lower(specs).compile()


def compile_chunk_prefill(
    graphdef: nnx.GraphDef, state: Any, mesh: Mesh, chunk: int, buffer: KVBuffer, kv_out: NamedSharding
) -> jax.stages.Compiled:
    """``chunk_prefill_fn`` for chunks of ``chunk`` tokens over an abstract ``buffer`` (donated)."""
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(
        functools.partial(chunk_prefill_fn, graphdef),
        out_shardings=(replicated, kv_out, kv_out, [(k.sharding, v.sharding) for k, v in buffer]),
        donate_argnums=(1,),
    )
    return fn.lower(
        _abstract(state),
        _abstract(buffer),
        _spec((1, chunk), jnp.int32, mesh),
        _spec((), jnp.int32, mesh),
        _spec((), jnp.int32, mesh),
    ).compile()


def kv_window_fn(
    size: int, offset: jax.Array, k_parts: tuple[jax.Array, ...], v_parts: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array]:
    """Tokens ``offset .. offset + size - 1`` of the parts ``[L, T, KVH, D]`` laid end to end (zeros past
    their end) -> k, v ``[L, size, KVH, D]``."""

    def window(parts: tuple[jax.Array, ...]) -> jax.Array:
        first = parts[0]
        padding = jnp.zeros((first.shape[0], size, *first.shape[2:]), first.dtype)
        return jax.lax.dynamic_slice_in_dim(jnp.concatenate([*parts, padding], axis=1), offset, size, axis=1)

    return window(k_parts), window(v_parts)


def kv_seed_fn(buffer: KVBuffer, k: jax.Array, v: jax.Array, start: jax.Array) -> KVBuffer:
    """The chunk piece k, v ``[L, C, KVH, D]`` written into ``buffer`` at position ``start``: a cached chunk
    put back where ``prefill_chunk`` wrote it (``jdisagg.prefill_cache``)."""
    return [(jax.lax.dynamic_update_slice_in_dim(kb, k[i].astype(kb.dtype), start, axis=0),
             jax.lax.dynamic_update_slice_in_dim(vb, v[i].astype(vb.dtype), start, axis=0))
            for i, (kb, vb) in enumerate(buffer)]


def compile_kv_seed(buffer: KVBuffer, piece: jax.ShapeDtypeStruct, mesh: Mesh) -> jax.stages.Compiled:
    """``kv_seed_fn`` over an abstract ``buffer`` (donated) and chunk pieces shaped ``piece``."""
    fn = jax.jit(kv_seed_fn, out_shardings=[(k.sharding, v.sharding) for k, v in buffer], donate_argnums=(0,))
    return fn.lower(_abstract(buffer), piece, piece, _spec((), jnp.int32, mesh)).compile()


def compile_kv_window(
    part: jax.ShapeDtypeStruct, num_parts: int, size: int, mesh: Mesh
) -> jax.stages.Compiled:
    """``kv_window_fn`` of ``size`` tokens over ``num_parts`` parts shaped ``part``, kept in its sharding."""
    parts = tuple(part for _ in range(num_parts))
    fn = jax.jit(functools.partial(kv_window_fn, size), out_shardings=(part.sharding, part.sharding))
    return fn.lower(_spec((), jnp.int32, mesh), parts, parts).compile()


def compile_kv_buffer(buffer: KVBuffer) -> jax.stages.Compiled:
    """A program that makes a zeroed ``buffer`` (abstract: shapes, dtype, sharding) on its devices, so a
    long prompt's buffer is allocated on device rather than uploaded from the host."""
    fn = jax.jit(
        lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), buffer),
        out_shardings=[(k.sharding, v.sharding) for k, v in buffer],
    )
    return fn.lower().compile()


def compile_insert(
    pools: KVPools, kv_in: jax.ShapeDtypeStruct, page_size: int, stored_heads: int, mesh: Mesh
) -> jax.stages.Compiled:
    fn = jax.jit(
        functools.partial(insert_fn, page_size, stored_heads),
        out_shardings=[(kp.sharding, vp.sharding) for kp, vp in pools],
        donate_argnums=(0,),
    )
    num_pages = kv_in.shape[1] // page_size
    return fn.lower(_abstract(pools), kv_in, kv_in, _spec((num_pages,), jnp.int32, mesh)).compile()


def compile_decode(
    graphdef: nnx.GraphDef,
    state: Any,
    pools: KVPools,
    mesh: Mesh,
    batch: int,
    table_width: int,
    page_size: int,
    stored_heads: int,
    scale: float,
    backend: str | None,
) -> jax.stages.Compiled:
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(
        functools.partial(
            packed_decode_fn,
            functools.partial(decode_fn, graphdef, mesh, page_size, stored_heads, scale, backend),
        ),
        out_shardings=(replicated, [(kp.sharding, vp.sharding) for kp, vp in pools], replicated, replicated),
        donate_argnums=(1,),
    )
    lowered = fn.lower(
        _abstract(state),
        _abstract(pools),
        _spec((batch,), jnp.int32, mesh),  # tokens
        _spec((batch, 1 + table_width), jnp.int32, mesh),  # positions | page table
    )
    return _compile(lowered, mesh, rows=batch)


def compile_local_prefill(
    graphdef: nnx.GraphDef,
    state: Any,
    pools: KVPools,
    mesh: Mesh,
    batch: int,
    chunk: int,
    table_width: int,
    page_size: int,
    stored_heads: int,
    pages_per_block: int,
) -> jax.stages.Compiled:
    """``packed_local_prefill_fn`` for ``batch`` chunks of ``chunk`` tokens, keys read ``pages_per_block``
    pages at a time; the pools are donated, as decode's."""
    replicated = NamedSharding(mesh, P())
    fn = jax.jit(
        functools.partial(
            packed_local_prefill_fn,
            functools.partial(local_prefill_fn, graphdef, mesh, page_size, stored_heads, pages_per_block),
            chunk,
        ),
        out_shardings=(replicated, [(kp.sharding, vp.sharding) for kp, vp in pools], replicated),
        donate_argnums=(1,),
    )
    return fn.lower(
        _abstract(state),
        _abstract(pools),
        _spec((batch, chunk + 2 + table_width), jnp.int32, mesh),  # tokens | start | length | page table
    ).compile()
