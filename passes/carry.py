"""What crosses a stage boundary: the values a cut carries, packed into one buffer per dtype
(``layout`` / ``pack`` / ``unpack``) and sent between devices as one uint8 buffer, so a tick
costs one ``ppermute`` per direction whatever the dtypes (``to_wire`` / ``from_wire``).

Example:
    >>> slots, sizes = layout([residual.aval, positions.aval])   # float32 and int32 buffers
    >>> bufs = pack([residual, positions], slots, sizes)
    >>> sent = from_wire(jax.lax.ppermute(to_wire(bufs), "stage", perm), bufs)
    >>> residual, positions = unpack(sent, slots)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one value lives in a per-dtype flat buffer."""

    dtype: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def layout(avals: Sequence) -> tuple[tuple[Slot, ...], dict[str, int]]:
    """Each value's slot, in order, and each dtype's buffer size (elements).

    Example:
        >>> layout([jax.ShapeDtypeStruct((2, 3), jnp.float32)])
        ((Slot(dtype='float32', offset=0, shape=(2, 3)),), {'float32': 6})
    """
    sizes: dict[str, int] = {}
    slots = []
    for aval in avals:
        dt = np.dtype(aval.dtype).name
        slot = Slot(dt, sizes.get(dt, 0), tuple(aval.shape))
        sizes[dt] = slot.offset + slot.size
        slots.append(slot)
    return tuple(slots), sizes


def pack(values: Sequence, slots: Sequence[Slot], sizes: dict[str, int]) -> dict:
    """The per-dtype buffers (of ``sizes``, zero-padded) holding ``values`` at ``slots``."""
    parts: dict[str, list] = {dt: [] for dt in sizes}
    for x, s in zip(values, slots, strict=True):
        parts[s.dtype].append(jnp.ravel(x))
    out = {}
    for dt, n in sizes.items():
        flat = jnp.concatenate(parts[dt]) if parts[dt] else jnp.zeros((0,), dt)
        out[dt] = jnp.pad(flat, (0, n - flat.shape[0]))
    return out


def unpack(bufs: dict, slots: Sequence[Slot]) -> list:
    """The values at ``slots`` of the per-dtype buffers."""
    return [jax.lax.slice_in_dim(bufs[s.dtype], s.offset, s.offset + s.size).reshape(s.shape)
            for s in slots]


def zeros(sizes: dict[str, int]) -> dict:
    """Zero per-dtype buffers of ``sizes``."""
    return {dt: jnp.zeros((n,), dt) for dt, n in sizes.items()}


def to_wire(bufs: dict) -> jax.Array:
    """Per-dtype buffers as one uint8 buffer, dtypes in sorted order: bitcasts and one
    concatenation. XLA cannot bitcast bool (converted to uint8) or complex (sent as its
    real and imaginary parts).

    Example:
        >>> to_wire({"float32": jnp.ones(2), "int32": jnp.ones(1, jnp.int32)}).shape
        (12,)
    """
    parts = []
    for dt in sorted(bufs):
        x = bufs[dt]
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        elif jnp.issubdtype(x.dtype, jnp.complexfloating):
            x = jnp.stack([x.real, x.imag], axis=-1)
        parts.append(jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1))
    if not parts:
        return jnp.zeros((0,), jnp.uint8)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def from_wire(wire: jax.Array, like: dict) -> dict:
    """``to_wire``'s inverse: buffers shaped and typed as ``like``'s."""
    out, offset = {}, 0
    for dt in sorted(like):
        dtype = np.dtype(dt)
        n, size = like[dt].shape[0], dtype.itemsize
        chunk = wire[offset:offset + n * size]
        offset += n * size
        if dtype == np.bool_:
            out[dt] = chunk != 0
        elif np.issubdtype(dtype, np.complexfloating):
            part = np.dtype(f"float{4 * size}")  # complex64: two float32
            re_im = jax.lax.bitcast_convert_type(chunk.reshape(n, 2, size // 2), part)
            out[dt] = jax.lax.complex(re_im[:, 0], re_im[:, 1])
        else:
            out[dt] = jax.lax.bitcast_convert_type(
                chunk.reshape(n, size) if size > 1 else chunk, dtype)
    return out


def send(bufs: dict, axis: str, perm) -> dict:
    """``bufs`` moved by one ``lax.ppermute`` over ``axis`` (nothing to send: as they are).

    Example:
        >>> sent = send(carry_out, "stage", [(0, 1), (1, 2)])
    """
    if not bufs:
        return bufs
    return from_wire(jax.lax.ppermute(to_wire(bufs), axis, perm), bufs)
