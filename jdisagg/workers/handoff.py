"""The KV hand-off between processes: prefill offers its KV shards, decode pulls and reassembles them.

JAX's transfer server (``jax.experimental.transfer``) moves device buffers between processes without a
home-made transport: the sender registers arrays under a uuid (``await_pull``), the receiver pulls them
into buffers it describes (``pull``). The receiver must describe exactly what was offered: a mismatched
shape of the same byte size would be read as wrong data without an error. So every offer carries its
layout (``KVLayout``: logical shape, dtype, shard count) and a position-weighted checksum per shard; the
receiver checks the layout against its own model before pulling and the checksums after, and refuses on
any difference.

Shards travel as single-device arrays, one per kv-head range, which makes the sender's and the receiver's
tensor-parallel degrees independent: TP4 prefill -> TP2 decode pulls two shards onto each decode device and
concatenates them there; any other combination is reassembled on one device and resharded locally.

A chunked prompt's KV (``jdisagg.chunked_prefill.ChunkedKV``) is one piece per chunk, all of one shape: it
travels as one offer of every piece's shards (``KVLayout.num_pieces``), pulled at once, and is staged as
the same sequence of pieces the in-process hand-off gives the decode replica's ``insert``.

With the prefix cache, a prompt whose first ``cached_tokens`` the decode worker already holds is offered
cut to the rest (``jdisagg.kv_suffix``): one piece of a bucket for a short prompt, chunk-sized pieces and a
shorter last one (``KVLayout.last_piece_tokens``) for a long one. The front names the prompt in each
``PullRequest``, and the receiver accepts exactly the pieces that prompt's hand-off has (``planned_pieces``):
a suffix offered for a prompt whose prefix this worker does not hold would be read as the whole prompt's KV.
"""

from __future__ import annotations

import datetime
import functools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import transfer
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from jdisagg.buckets import bucket_for
from jdisagg.chunked_prefill import ChunkedKV, KVPiece, kv_pieces
from jdisagg.kv_suffix import plan_cuts
from jdisagg.meshes import TP_AXIS
from jdisagg.v1 import worker_pb2 as wpb

HEAD_AXIS = 2  # KV is [layers, tokens, kv_heads, head_dim]
CHECKSUM_RTOL = 1e-4


class LayoutMismatchError(ValueError):
    """An offered KV does not match what the receiver expects, or arrived different from what was sent."""


class PeerLostError(RuntimeError):
    """The pull failed on the transport: the sender's process or its offer is gone."""


@dataclass(frozen=True)
class ExpectedKV:
    """What a decode worker can take: its model's KV shape (token count varies by prompt bucket)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    lengths: tuple[int, ...]  # prompt buckets it compiled an insert program for
    max_tokens: int  # the most tokens of KV one prompt can hand over (its pieces together)
    page_size: int = 1  # a cached prefix is whole pages


def planned_pieces(length: int, cached: int, buckets: tuple[int, ...]) -> list[int]:
    """Tokens of each piece of the hand-off of a ``length``-token prompt cut after its first ``cached``
    (0: the whole prompt's): what the prefill side offers for it, as ``jdisagg.kv_suffix`` plans the cuts."""
    chunk = buckets[-1]
    if cached:
        cuts = plan_cuts(length, cached, buckets)
        return [chunk if cut.signature is None else cut.signature[2] for cut in cuts]
    if length <= chunk:
        return [bucket_for(length, buckets)]
    return [chunk] * -(-length // chunk)


def piece_tokens(layout: wpb.KVLayout) -> list[int]:
    """Tokens of each piece an offer describes."""
    tokens = [layout.shape[1] if len(layout.shape) == 4 else -1] * max(layout.num_pieces, 0)
    if tokens and layout.last_piece_tokens:
        tokens[-1] = layout.last_piece_tokens
    return tokens


@functools.partial(jax.jit)
def checksum(x: jax.Array) -> jax.Array:
    """Sum of the elements weighted by a hash of their flat position: a reshape, transpose or shard swap
    of the same bytes changes it."""
    flat = x.reshape(-1).astype(jnp.float32)
    index = jnp.arange(flat.shape[0], dtype=jnp.uint32)
    weight = ((index * jnp.uint32(2654435761)) >> 16).astype(jnp.float32) / 65536.0 + 0.5
    return jnp.sum(flat * weight)


def head_shards(x: jax.Array) -> list[jax.Array]:
    """The distinct shards of ``x`` in kv-head order, as single-device arrays (replicas dropped)."""
    by_start: dict[int, jax.Array] = {}
    for shard in x.addressable_shards:
        by_start.setdefault(shard.index[HEAD_AXIS].start or 0, shard.data)
    return [by_start[start] for start in sorted(by_start)]


class KVSender:
    """Prefill side: offers KV on this process's transfer server until pulled or ``timeout_s`` passes."""

    def __init__(self, host: str, timeout_s: float) -> None:
        client = jax.devices()[0].client
        self._server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
        self.address: str = self._server.address()
        self._timeout = datetime.timedelta(seconds=timeout_s)

    def offer(self, kv: KVPiece | ChunkedKV) -> wpb.KVOffer:
        """Offer a prompt's KV: a (k, v) pair, or a chunked prompt's pieces (shards piece by piece, each
        piece's k shards then its v shards); only the last piece may be shorter (a suffix hand-off)."""
        pieces = kv_pieces(kv)
        k0, last = pieces[0][0], pieces[-1][0]
        shards = []
        for i, (k, v) in enumerate(pieces):
            like = last.shape if i == len(pieces) - 1 else k0.shape
            k_shards, v_shards = head_shards(k), head_shards(v)
            if len(k_shards) != len(v_shards) or {k.shape, v.shape} != {like} or k.dtype != v.dtype \
                    or like[:1] + like[2:] != k0.shape[:1] + k0.shape[2:]:
                raise LayoutMismatchError(f"k {k.shape} {k.dtype} and v {v.shape} {v.dtype} differ (or from "
                                          f"the first piece's {k0.shape})")
            shards += k_shards + v_shards
        layout = wpb.KVLayout(
            shape=list(k0.shape),
            dtype=str(k0.dtype),
            num_shards=len(shards) // (2 * len(pieces)),
            checksums=[float(c) for c in jax.device_get([checksum(s) for s in shards])],
            num_pieces=len(pieces),
            last_piece_tokens=last.shape[1] if last.shape != k0.shape else 0,
        )
        uuid = secrets.randbits(63)
        self._server.await_pull(uuid, shards, timeout=datetime.datetime.now() + self._timeout)
        return wpb.KVOffer(transfer_address=self.address, uuid=uuid, layout=layout)


class KVReceiver:
    """Decode side: pulls offered KV onto one replica's mesh, in that replica's hand-off sharding."""

    def __init__(self, host: str, mesh: Mesh, sharding: NamedSharding, expected: ExpectedKV) -> None:
        client = jax.devices()[0].client
        self._server = transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])
        self._connections: dict[str, transfer.TransferConnection] = {}
        self._devices: list[jax.Device] = list(mesh.devices.ravel())
        self._tp = mesh.shape[TP_AXIS]
        self._sharding = sharding
        self._expected = expected

    def check(self, layout: wpb.KVLayout, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """Refuse an offer this replica would misread (before pulling anything); with ``prompt_tokens``,
        also one whose pieces are not those of that prompt's hand-off after ``cached_tokens``."""
        e = self._expected
        shape = tuple(layout.shape)
        want = (e.num_layers, shape[1] if len(shape) == 4 else -1, e.num_kv_heads, e.head_dim)
        pieces = layout.num_pieces
        problems = []
        if shape != want:
            problems.append(f"shape {shape} != expected {want}")
        elif shape[1] not in e.lengths:
            problems.append(f"{shape[1]} tokens is not a prompt bucket here {e.lengths}")
        elif pieces > 1 and (shape[1] != max(e.lengths) or pieces * shape[1] > e.max_tokens):
            problems.append(f"{pieces} pieces of {shape[1]} tokens are not a chunked prompt here (chunks of "
                            f"{max(e.lengths)}, at most {e.max_tokens} tokens)")
        if pieces < 1:
            problems.append(f"{pieces} pieces")
        last = layout.last_piece_tokens
        if last and (pieces < 2 or last not in e.lengths or last >= want[1]):
            problems.append(f"a last piece of {last} tokens is not a shorter prompt bucket after "
                            f"{pieces - 1} of {want[1]} tokens here")
        if prompt_tokens and not problems:
            problems += self._prompt_problems(layout, prompt_tokens, cached_tokens)
        if layout.dtype != e.dtype:
            problems.append(f"dtype {layout.dtype} != expected {e.dtype}")
        n = layout.num_shards
        if n < 1 or e.num_kv_heads % n:
            problems.append(f"{n} shards do not split {e.num_kv_heads} kv heads evenly")
        if len(layout.checksums) != 2 * max(n, 0) * max(pieces, 0):
            problems.append(f"{len(layout.checksums)} checksums for {pieces} pieces of {n} shards of k and v")
        if problems:
            raise LayoutMismatchError("KV hand-off refused: " + "; ".join(problems))

    def _prompt_problems(self, layout: wpb.KVLayout, length: int, cached: int) -> list[str]:
        """Why an offer is not the hand-off of a ``length``-token prompt after its first ``cached`` tokens
        (nothing when it is)."""
        e = self._expected
        if not 0 < length <= e.max_tokens or cached < 0 or cached % e.page_size or cached >= max(length, 1):
            return [f"a prompt of {length} tokens with {cached} cached is not one this worker can take "
                    f"(at most {e.max_tokens} tokens; cached a multiple of {e.page_size} below the length)"]
        want, got = planned_pieces(length, cached, e.lengths), piece_tokens(layout)
        if got != want:
            return [f"pieces of {got} tokens are not the hand-off of a {length}-token prompt after {cached} "
                    f"cached tokens (pieces of {want} tokens)"]
        return []

    def pull(self, offer: wpb.KVOffer, prompt_tokens: int = 0, cached_tokens: int = 0) -> tuple[KVPiece, ...]:
        """Pull, verify and reassemble an offer as its (k, v) pieces in this replica's hand-off sharding
        (checked against the prompt it is for when ``prompt_tokens`` is given)."""
        layout = offer.layout
        self.check(layout, prompt_tokens, cached_tokens)
        n = layout.num_shards
        shape = tuple(layout.shape)
        grouped = n % self._tp == 0 and self._sharding.shard_shape(shape)[HEAD_AXIS] * self._tp == shape[2]
        owners = [self._devices[i // (n // self._tp)] if grouped else self._devices[0] for i in range(n)]
        shapes = [shape[:1] + (tokens,) + shape[2:] for tokens in piece_tokens(layout)]
        specs = [
            jax.ShapeDtypeStruct(s[:HEAD_AXIS] + (s[HEAD_AXIS] // n,) + s[HEAD_AXIS + 1 :], layout.dtype,
                                 sharding=SingleDeviceSharding(d))
            for s in shapes
            for d in owners + owners
        ]
        try:
            shards = self._connection(offer.transfer_address).pull(offer.uuid, specs)
        except Exception as exc:  # noqa: BLE001 - the transport raises one runtime error type for all
            self.forget(offer.transfer_address)
            raise PeerLostError(f"pull from {offer.transfer_address} failed: {exc}") from exc
        got = jax.device_get([checksum(s) for s in shards])
        if not np.allclose(got, list(layout.checksums), rtol=CHECKSUM_RTOL, atol=1e-3):
            raise LayoutMismatchError(
                "KV hand-off arrived different from what was sent (checksums differ): sender and receiver "
                "disagree on the layout"
            )
        pieces = [shards[i : i + 2 * n] for i in range(0, len(shards), 2 * n)]
        return tuple(
            (self._assemble(p[:n], owners, s), self._assemble(p[n:], owners, s))
            for p, s in zip(pieces, shapes, strict=True)
        )

    def _assemble(self, shards: Sequence[jax.Array], owners: Sequence[jax.Device], shape: tuple) -> jax.Array:
        per_device: dict[jax.Device, list[jax.Array]] = {}
        for device, shard in zip(owners, shards, strict=True):
            per_device.setdefault(device, []).append(shard)
        parts = [jnp.concatenate(p, axis=HEAD_AXIS) if len(p) > 1 else p[0] for p in per_device.values()]
        if len(parts) == self._tp:
            return jax.make_array_from_single_device_arrays(shape, self._sharding, parts)
        return jax.device_put(parts[0], self._sharding)

    def _connection(self, address: str) -> transfer.TransferConnection:
        if address not in self._connections:
            self._connections[address] = self._server.connect(address)
        return self._connections[address]

    def forget(self, address: str) -> None:
        """Drop a cached connection (its sender died or restarted)."""
        self._connections.pop(address, None)
