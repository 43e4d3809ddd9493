"""Weights stored compressed on their stage and expanded inside it: int8 / int4 with
per-output-channel scales, 2:4 and 1:4 structured sparsity (values + 2-bit indices).

A ``ParamCodec`` turns one weight into the arrays a device stores (``encode``) and back,
inside the stage's computation (``decode``); ``passes.storage.SlotStorage`` keeps the stored
arrays in its slots, so a device holds the compressed bytes and the layer reads the weight
through ``decode``, which XLA fuses into the computation that follows where it can. The
stored bytes are exactly ``Compression.weight_bytes``'s, the planner's count:

- The *dot view*: a weight reaches its matmul through reshapes / transposes / converts; the
  codec quantises in that view, so "output channels" are the matmul's non-contracted
  dimensions (``footprint.output_channels``), whatever the weight's own layout.
- ``weight_bits=8``: int8 values, round-to-nearest of w / scale, scale = max |w| over the
  contracted dimensions / 127 per output channel, stored as float16 (``scale_bytes=2``).
  ``weight_bits=4``: values in [-7, 7], two per byte (uint8, low nibble first).
- Sparsity along the last contracted dimension (groups of 4 consecutive elements, as
  NVIDIA's 2:4 does along the reduction): the 2 (2:4) or 1 (1:4) largest magnitudes of
  each group are kept, the rest pruned (magnitude pruning); a kept value's position in its
  group is a 2-bit index, four per byte. The planner's bytes: kept values + kept / 4 bytes.
  A contracted dimension that 4 does not divide is refused (``CompressionError``).
- Weights no matmul reads (norm scales, an embedding read by a gather) stay as they are.

No XLA backend runs a sparse matmul from this layout (JAX issue 19212: no path to sparse
tensor cores): decode expands the weight before the dense dot, so sparsity saves stored
bytes and bytes moved, never FLOPs.

Example:
    >>> codecs = build_codecs(graph, compression.get("int8-2:4"))
    >>> stored = codecs[3].encode(w)                 # (int8 values, uint8 indices, f16 scales)
    >>> w_hat = codecs[3].decode(stored)             # w's shape and dtype, pruned + rounded
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwjax._compat import Var
from lwjax.errors import CompressionError
from lwjax.passes.compression import _KEPT, Compression
from lwjax.passes.segment import LayerGraph

_QMAX = {8: 127, 4: 7}


@dataclasses.dataclass(frozen=True)
class ParamCodec:
    """How one weight is stored.

    Attributes:
        path: the weight's path (for messages).
        shape, dtype: the weight as the model holds it.
        ops: reshape / transpose / convert steps from the weight to its matmul operand, as
            (name, argument) pairs.
        contract: the contracted dimensions of the dot view.
        bits: 8, 4 or None (values keep the weight's dtype).
        sparsity: "2:4", "1:4" or None.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    ops: tuple[tuple[str, tuple[int, ...]], ...]
    contract: tuple[int, ...]
    bits: int | None
    sparsity: str | None

    # ---- layout --------------------------------------------------------------------------
    @property
    def view_shape(self) -> tuple[int, ...]:
        shape = self.shape
        for name, arg in self.ops:
            shape = tuple(shape[p] for p in arg) if name == "transpose" else \
                arg if name == "reshape" else shape
        return shape

    @property
    def channels(self) -> int:
        view = self.view_shape
        return int(np.prod([n for d, n in enumerate(view) if d not in self.contract],
                           dtype=np.int64))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def kept(self) -> int:
        if self.sparsity is None:
            return self.size
        num, den = _KEPT[self.sparsity]
        return self.size * num // den

    def stored_avals(self) -> list[jax.ShapeDtypeStruct]:
        """The arrays a device stores for this weight: values, [indices], [scales]."""
        if self.bits == 4:
            values = jax.ShapeDtypeStruct((math.ceil(self.kept / 2),), jnp.uint8)
        elif self.bits == 8:
            values = jax.ShapeDtypeStruct((self.kept,), jnp.int8)
        else:
            values = jax.ShapeDtypeStruct((self.kept,), self.dtype)
        out = [values]
        if self.sparsity is not None:
            out.append(jax.ShapeDtypeStruct((math.ceil(self.kept / 4),), jnp.uint8))
        if self.bits is not None:
            out.append(jax.ShapeDtypeStruct((self.channels,), jnp.float16))
        return out

    @property
    def stored_bytes(self) -> int:
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in self.stored_avals())

    # ---- the dot view and back -----------------------------------------------------------
    def _to_view(self, w):
        for name, arg in self.ops:
            w = jnp.transpose(w, arg) if name == "transpose" else \
                w.reshape(arg) if name == "reshape" else w
        return w

    def _from_view(self, v):
        shapes = [self.shape]
        for name, arg in self.ops:
            s = shapes[-1]
            shapes.append(tuple(s[p] for p in arg) if name == "transpose" else
                          arg if name == "reshape" else s)
        for (name, arg), before in zip(reversed(self.ops), reversed(shapes[:-1]), strict=True):
            if name == "transpose":
                v = jnp.transpose(v, np.argsort(arg))
            elif name == "reshape":
                v = v.reshape(before)
        return v

    def _grouped(self, v):
        """[..., K] with the last contracted dimension moved last, as [..., K / 4, 4]."""
        axis = self.contract[-1]
        moved = jnp.moveaxis(v, axis, -1)
        return moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)

    def _ungrouped(self, g):
        axis = self.contract[-1]
        moved = g.reshape(*g.shape[:-2], g.shape[-2] * 4)
        return jnp.moveaxis(moved, -1, axis)

    # ---- encode / decode -----------------------------------------------------------------
    def encode(self, w) -> list:
        """The stored arrays of weight ``w`` (values, [2-bit indices], [float16 scales])."""
        v = self._to_view(jnp.asarray(w)).astype(jnp.float32)
        out = []
        if self.sparsity is not None:
            k = _KEPT[self.sparsity][0] * 4 // _KEPT[self.sparsity][1]
            g = self._grouped(v)
            index = jnp.sort(jnp.argsort(-jnp.abs(g), axis=-1, stable=True)[..., :k], axis=-1)
            mask = jnp.sum(jax.nn.one_hot(index, 4, dtype=jnp.float32), axis=-2)
            v = self._ungrouped(g * mask)
        if self.bits is not None:
            qmax = _QMAX[self.bits]
            amax = jnp.max(jnp.abs(v), axis=self.contract, keepdims=True)
            scale = (amax / qmax).astype(jnp.float16)
            safe = jnp.where(scale == 0, 1.0, scale.astype(jnp.float32))
            v = jnp.clip(jnp.round(v / safe), -qmax, qmax)
        if self.sparsity is not None:
            values = jnp.take_along_axis(self._grouped(v), index, axis=-1).reshape(-1)
        else:
            values = v.reshape(-1)
        if self.bits == 4:
            out.append(_pack(values.astype(jnp.int32) + 8, 4))
        elif self.bits == 8:
            out.append(values.astype(jnp.int8))
        else:
            out.append(values.astype(self.dtype))
        if self.sparsity is not None:
            out.append(_pack(index.reshape(-1).astype(jnp.int32), 2))
        if self.bits is not None:
            out.append(scale.reshape(-1))
        return out

    def decode(self, stored: Sequence):
        """The weight from its stored arrays (inside the stage's computation)."""
        stored = list(stored)
        values = stored.pop(0)
        if self.bits == 4:
            values = _unpack(values, 4, self.kept) - 8
        values = values.astype(jnp.float32)
        view = self.view_shape
        if self.sparsity is not None:
            index = _unpack(stored.pop(0), 2, self.kept)
            k = _KEPT[self.sparsity][0] * 4 // _KEPT[self.sparsity][1]
            moved = list(view)
            moved.append(moved.pop(self.contract[-1]))
            groups = (*moved[:-1], moved[-1] // 4)
            index = index.reshape(*groups, k)
            values = values.reshape(*groups, k)
            # each kept value to its position: a select per kept slot, summed over the k
            # slots -- XLA fuses this into one pass (a one-hot product would materialise
            # a [groups, k, 4] temporary, k times the dense weight)
            dense = sum(jnp.where(index[..., m, None] == jnp.arange(4), values[..., m, None],
                                  0.0) for m in range(k))
            v = self._ungrouped(dense)
        else:
            v = values.reshape(view)
        if self.bits is not None:
            scale_shape = [1 if d in self.contract else n for d, n in enumerate(view)]
            v = v * stored.pop(0).astype(jnp.float32).reshape(scale_shape)
        return self._from_view(v.astype(self.dtype))


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A compressed weight inside a stage, decoded where an equation first reads it
    (``passes.lower._eval``): decoding every weight at the start of a stage would let
    XLA hold all of its decoded weights at once."""

    codec: ParamCodec
    arrays: tuple

    def decode_after(self, anchor):
        """The weight, decoded after ``anchor`` (another operand of the equation that reads
        it) exists, so that XLA does not move every decode to the stage's start."""
        arrays = list(self.arrays)
        if anchor is not None:
            # (byte | 1) & 1 is 1 for any byte of the anchor, NaN and inf included, but XLA
            # does not fold it: the decode now waits for the anchor (an optimization_barrier
            # is gone before XLA:CPU schedules, and the decoded weights of a whole stage
            # were live at once: 3x the temporary bytes on an 8-layer int8 model)
            first = jnp.ravel(anchor)[:1]
            byte = first.astype(jnp.uint8) if first.dtype == jnp.bool_ else \
                jax.lax.bitcast_convert_type(first, jnp.uint8).reshape(-1)[:1]
            one = (byte | 1) & 1
            arrays[-1] = arrays[-1] * one.astype(arrays[-1].dtype)
        return self.codec.decode(arrays)


def _pack(x, bits: int):
    """Unsigned ``bits``-bit integers (int32) -> uint8, 8 // bits per byte, low bits first."""
    per = 8 // bits
    x = x.reshape(-1)
    pad = (-x.shape[0]) % per
    x = jnp.pad(x, (0, pad)).reshape(-1, per)
    shifts = jnp.arange(per, dtype=jnp.int32) * bits
    return jnp.sum(x << shifts, axis=-1).astype(jnp.uint8)


def _unpack(packed, bits: int, count: int):
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.int32) * bits
    x = (packed.astype(jnp.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return x.reshape(-1)[:count]


# ---- which weights, seen how ------------------------------------------------------------------

def dot_views(graph: LayerGraph) -> dict[int, tuple[tuple, tuple[int, ...]]]:
    """Param index -> (ops from the weight to its first matmul operand, contracted dims of
    that operand), following reshape / transpose / convert / copy."""
    index = {v: i for i, v in enumerate(graph.param_vars)}
    chain: dict = {}  # value -> (param index, ops so far)
    out: dict[int, tuple[tuple, tuple[int, ...]]] = {}
    for e in graph.jaxpr.jaxpr.eqns:
        def origin(v):
            if not isinstance(v, Var):
                return None
            if v in index:
                return index[v], ()
            return chain.get(v)
        name = e.primitive.name
        if name in ("transpose", "reshape", "convert_element_type", "copy"):
            src = origin(e.invars[0])
            if src is not None:
                op = ("transpose", tuple(e.params["permutation"])) if name == "transpose" else \
                    ("reshape", tuple(e.outvars[0].aval.shape)) if name == "reshape" else \
                    ("convert", ())
                chain[e.outvars[0]] = (src[0], (*src[1], op))
        if name == "dot_general":
            (lc, rc), _ = e.params["dimension_numbers"]
            for operand, contract in ((0, lc), (1, rc)):
                src = origin(e.invars[operand])
                if src is not None and src[0] not in out:
                    out[src[0]] = (src[1], tuple(int(d) for d in contract))
    return out


def build_codecs(graph: LayerGraph, compression: Compression) -> list[ParamCodec | None]:
    """Per graph parameter, its codec under ``compression`` (None: stored as it is).

    Raises:
        CompressionError: a weight to be made sparse whose contracted dimension 4 does not
            divide (names the weight, its shape and what to change).
    """
    if compression.weight_bits is None and compression.sparsity is None:
        return [None] * len(graph.params)
    views = dot_views(graph)
    codecs: list[ParamCodec | None] = []
    for i, info in enumerate(graph.params):
        if i not in views or not views[i][1]:
            codecs.append(None)
            continue
        ops, contract = views[i]
        sparse = compression.sparsity if compression.sparsity is not None and \
            re.search(compression.sparse_params, info.path) else None
        codec = ParamCodec(path=info.path, shape=tuple(info.shape),
                           dtype=np.dtype(info.dtype).name, ops=ops, contract=contract,
                           bits=compression.weight_bits, sparsity=sparse)
        if sparse is not None and codec.view_shape[contract[-1]] % 4:
            raise CompressionError(
                f"{compression.name}: weight {info.path!r} {list(info.shape)} is contracted "
                f"over a dimension of {codec.view_shape[contract[-1]]}, which groups of 4 do "
                f"not divide; {sparse} sparsity needs a multiple of 4. Exclude it with "
                "Compression(sparse_params=...) or use a preset without sparsity "
                "('int8', 'int4').")
        if codec.bits is None and codec.sparsity is None:
            codecs.append(None)
        else:
            codecs.append(codec)
    return codecs
