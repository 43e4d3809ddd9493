"""Splitting a layer over ``tp`` devices (seed document 002's m x n scheme): the bytes and time
per device of a split stage, and which splits a model allows.

Example:
    >>> split_levels(graph, limit=16)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from lwjax.errors import ConfigError
from lwjax.passes.compression import Compression
from lwjax.passes.footprint import Footprint, GraphFootprint, output_channels, value_bytes
from lwjax.passes.padding import StoredArray
from lwjax.passes.planner import numbers_from
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.passes.tp import mixed_axes, residual_bytes, residual_width, split_axes
from lwjax.plan import LayerNumbers

# ---- splitting a layer over tp devices ------------------------------------------------------

def split_footprint(f: Footprint, *, split_weights_bytes: int, largest_input_bytes: int,
                    tp: int) -> Footprint:
    """Bytes one device holds when a segment runs split over ``tp`` devices.

    - weights: ``ceil(split_weights_bytes / tp)`` + the rest of ``f.weights_bytes``
      (replicated: norm scales, quantisation scales, weights no dimension of which divides);
    - KV cache and buffers: ``ceil(bytes / tp)`` (split by heads, like the work);
    - activations: ``max(ceil(f.activation_bytes / tp), largest_input_bytes)``: the inner
      activations split, but the segment's [B, T, D] input stays whole on every device;
    - training: gradients and optimizer state split as the weights do (their split share
      ``split_weights_bytes / weights_bytes``), the backward's activations ``ceil(/ tp)``, and
      the stash -- the stage's [B, T, D] input -- stays whole.

    Args:
        f: the segment's footprint on one device.
        split_weights_bytes: the part of ``f.weights_bytes`` that is split (``split_bytes``).
        largest_input_bytes: the segment's largest activation input.
        tp: devices the segment is split over.

    Returns:
        The per-device Footprint (``f`` itself when ``tp == 1``).

    Example:
        >>> f = Footprint(weights_bytes=1000, activation_bytes=400, buffer_bytes=40)
        >>> g = split_footprint(f, split_weights_bytes=960, largest_input_bytes=150, tp=4)
        >>> g.weights_bytes, g.activation_bytes, g.buffer_bytes
        (280, 150, 10)
    """
    if tp == 1:
        return f
    if not 0 <= split_weights_bytes <= f.weights_bytes:
        raise ConfigError(f"split_weights_bytes={split_weights_bytes} must lie in "
                          f"[0, {f.weights_bytes}] (the segment's weights).")

    def like_weights(nbytes: int) -> int:
        split = nbytes * split_weights_bytes // f.weights_bytes if f.weights_bytes else 0
        return _ceil_div(split, tp) + nbytes - split

    return dataclasses.replace(
        f,
        weights_bytes=like_weights(f.weights_bytes),
        activation_bytes=max(_ceil_div(f.activation_bytes, tp), largest_input_bytes),
        buffer_bytes=_ceil_div(f.buffer_bytes, tp),
        kv_cache_bytes=_ceil_div(f.kv_cache_bytes, tp),
        grad_bytes=like_weights(f.grad_bytes),
        optimizer_bytes=like_weights(f.optimizer_bytes),
        backward_bytes=_ceil_div(f.backward_bytes, tp),
    )


def split_bytes(graph: LayerGraph, seg: Segment, policy: Compression, tp: int,
                channels: dict[int, int] | None = None) -> int:
    """Stored bytes (under ``policy``) of the weights of ``seg`` that ``passes/tp.py``'s rule
    splits over ``tp`` devices. Quantisation scales count as replicated (whole on every
    device: conservative by at most one scale row per weight).

    Example:
        >>> split_bytes(graph, graph.layers[0], compression.get(None), tp=2)
        163840
    """
    if tp == 1:
        return 0
    channels = output_channels(graph) if channels is None else channels
    total = 0
    for i, axis in split_axes(graph, seg, tp).items():
        p = graph.params[i]
        if axis is None:
            continue
        stored = policy.weight_bytes(p.path, int(np.prod(p.shape, dtype=np.int64)),
                                     p.dtype.itemsize, channels.get(i))
        scales = channels[i] * policy.scale_bytes if policy.weight_bits and i in channels else 0
        total += stored - scales
    return total


def largest_input_bytes(seg: Segment) -> int:
    """Bytes of a segment's largest activation input (KV-cache inputs excluded).

    Example:
        >>> largest_input_bytes(graph.layers[0])   # tiny_dense, [1, 16, 64] float32
        4096
    """
    cache = set(seg.cache_inputs)
    return max((value_bytes(v) for v in seg.inputs if v not in cache), default=0)


def split_numbers(graph: LayerGraph, fp: GraphFootprint, costs_s: Sequence[float],
                  tp: int, epilogue_s: float = 0.0) -> LayerNumbers:
    """Per-device LayerNumbers of ``graph`` with every segment split over ``tp`` devices.

    Example:
        >>> split_numbers(graph, footprint(graph), layer_times(graph, hw, ...), tp=2)
    """
    if tp == 1:
        return numbers_from(graph, fp, costs_s, epilogue_s)
    channels = output_channels(graph)
    memo: dict[tuple, Footprint] = {}

    def one(seg: Segment, f: Footprint) -> Footprint:
        key = (seg.signature, tuple(graph.params[i].shape for i in seg.params), f)
        if key not in memo:
            memo[key] = split_footprint(
                f, split_weights_bytes=split_bytes(graph, seg, fp.compression, tp, channels),
                largest_input_bytes=largest_input_bytes(seg), tp=tp)
        return memo[key]

    return LayerNumbers(
        names=tuple(s.name for s in graph.layers),
        footprints=tuple(one(s, f) for s, f in zip(graph.layers, fp.layers, strict=True)),
        prologue=one(graph.prologue, fp.prologue), epilogue=one(graph.epilogue, fp.epilogue),
        costs_s=tuple(costs_s), epilogue_s=epilogue_s,
        signatures=tuple(s.signature for s in graph.layers),
        outer_signatures=graph.outer_signatures,
        stored=() if fp.compression.name != "none" else split_stored(graph, tp))


def split_stored(graph: LayerGraph, tp: int) -> tuple[tuple[StoredArray, ...], ...]:
    """Per segment (prologue, layers, epilogue), the arrays a device of a stage split over
    ``tp`` stores for its weights, as ``passes/storage.SplitStorage`` groups them: by whole
    shape, dtype and split axis, a device's share of each (compressed weights do not run
    split).

    Example:
        >>> [a.size for a in split_stored(graph, 2)[1]][:3]   # tiny_dense q/k/v: heads / 2
    """
    def arrays(seg: Segment) -> tuple[StoredArray, ...]:
        out = []
        for i, axis in split_axes(graph, seg, tp).items():
            aval = graph.param_vars[i].aval
            shape = tuple(int(d) for d in aval.shape)
            size = int(np.prod(shape, dtype=np.int64)) // (1 if axis is None else tp)
            out.append(StoredArray(i, np.dtype(aval.dtype).name, size, shape, axis))
        return tuple(out)

    return tuple(arrays(seg) for seg in (graph.prologue, *graph.layers, graph.epilogue))


def split_levels(graph: LayerGraph, limit: int) -> tuple[int, ...]:
    """tp = 1 and the powers of two <= ``limit`` at which some weight of ``graph`` splits.

    Example:
        >>> split_levels(graph, 16)
        (1, 2, 4, 8, 16)
    """
    levels = [1]
    mixed = {s.name: mixed_axes(graph, s.params, hidden=residual_width(graph, s),
                                whole_below=residual_bytes(s))
             for s in graph.segments}
    tp = 2
    while tp <= limit:
        if any(axis is not None for s in graph.segments
               for axis in split_axes(graph, s, tp, mixed[s.name]).values()):
            levels.append(tp)
        tp *= 2
    return tuple(levels)


def heads_split(graph: LayerGraph, tp: int) -> tuple[int, int, int] | None:
    """Seed 002's m x n factorisation of ``tp``: (heads, m devices across heads, n across
    hidden), or None when the layers have no attention heads. A 3-D weight whose leading
    dimension is the residual width D is a q / k / v projection [D, N, H]: N heads.

    Example:
        >>> heads_split(graph, 16)   # 32 heads
        (32, 16, 1)
    """
    for seg in graph.layers:
        cache = set(seg.cache_inputs)  # a decode KV cache [B, S, N, H] is not the residual
        floats = [v for v in seg.inputs if v not in cache and len(v.aval.shape) >= 2 and
                  np.issubdtype(v.aval.dtype, np.floating)]
        if not floats:
            continue
        hidden = max(floats, key=value_bytes).aval.shape[-1]
        for i in seg.params:
            shape = graph.params[i].shape
            if len(shape) == 3 and shape[0] == hidden:
                m = math.gcd(tp, shape[1])
                return shape[1], m, tp // m
    return None



# ---- helpers --------------------------------------------------------------------------------









def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // b)

