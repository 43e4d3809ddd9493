"""Intra-layer split (seed document 002): one stage's layers over ``tp`` devices.

The rule, shared by the planner (bytes per device) and the lowering (shardings): a weight is
split along its first dimension whose size differs from the layer's residual width D (the
hidden size), divides by ``tp``, and along which the model moves no data (below) -- attention
heads for q/k/v/out, the MLP width F for gate/up/down, experts for stacked expert weights, the
vocabulary for embeddings. That is Megatron's column/row pattern: a layer's inner work is
split and its [B, T, D] input and output stay whole on every device. Weights with no such
dimension (norm scales) are replicated. XLA's SPMD partitioner inserts the reductions the
split needs.

*Mixed axes.* A dimension is not split when the model moves data along a dimension tied to
it (``passes/axes.py``: its product's, or an activation's contracted with it): slices or
splits it (rotary embedding halves the head dimension; a fused qkv projection [D, 3D] is cut
into q, k and v), concatenates, pads, reverses, scans or windows along it. Split there, every
device would need its neighbours' pieces, which XLA's partitioner fetches with
collective-permutes inside the stage's branch -- which hang (``passes/collectives.py``, whose
compiled-program check also catches what this rule misses).

Example:
    >>> split_axis((4096, 32, 128), hidden=4096, tp=8)   # q [D, N, H]: heads
    1
    >>> split_axis((48, 3, 16), hidden=48, tp=2, mixed={2}) is None   # 3 heads, H mixed
    True
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable

import numpy as np

from lwjax._compat import Var
from lwjax.passes.axes import axis_groups
from lwjax.passes.segment import LayerGraph, Segment


def split_axis(shape: tuple[int, ...], hidden: int, tp: int,
               mixed: Collection[int] = ()) -> int | None:
    """The axis a weight of ``shape`` is split along over ``tp`` devices, or None.

    Args:
        shape: the weight's shape.
        hidden: the layer's residual width D (never split).
        tp: devices the layer is split over.
        mixed: axes the model moves data along (``mixed_axes``): never split.
    """
    if tp == 1:
        return None
    for axis, size in enumerate(shape):
        if size != hidden and size % tp == 0 and size >= tp and axis not in mixed:
            return axis
    return None


def residual_width(graph: LayerGraph, seg: Segment) -> int:
    """D: the trailing size of the segment's largest floating-point input activation (KV-cache
    inputs excluded: in decode they outweigh the residual stream); for a segment with none (the
    prologue reads integer tokens), of its largest floating-point output."""
    residual = _residual(seg)
    return -1 if residual is None else int(residual.aval.shape[-1])


def residual_bytes(seg: Segment) -> int:
    """Bytes of the value ``residual_width`` reads D from (0 when there is none)."""
    residual = _residual(seg)
    if residual is None:
        return 0
    return int(np.prod(residual.aval.shape, dtype=np.int64)) * np.dtype(
        residual.aval.dtype).itemsize


def _residual(seg: Segment):
    cache = set(seg.cache_inputs)
    for values in (seg.inputs, seg.outputs):
        floats = [v for v in values if np.issubdtype(v.aval.dtype, np.floating)
                  and v.aval.shape and v not in cache]
        if floats:
            return max(floats, key=lambda v: int(np.prod(v.aval.shape)))
    return None


def split_axes(graph: LayerGraph, seg: Segment, tp: int,
               mixed: dict[int, frozenset[int]] | None = None) -> dict[int, int | None]:
    """The axis (or None) along which each weight ``seg`` reads is split over ``tp`` devices:
    the one rule the planner's bytes and the lowering's shardings share. ``mixed``: the
    segment's ``mixed_axes`` when the caller already has them (they do not depend on tp).

    Example:
        >>> split_axes(graph, graph.layers[0], tp=2)   # tiny_dense: q/k/v/out by heads
        {1: 1, 2: 1, 3: 1, 4: 0, ...}
    """
    if tp == 1:
        return dict.fromkeys(seg.params)
    hidden = residual_width(graph, seg)
    if mixed is None:
        mixed = mixed_axes(graph, seg.params, hidden=hidden, whole_below=residual_bytes(seg))
    return {i: split_axis(graph.params[i].shape, hidden, tp, mixed[i]) for i in seg.params}


def split_weight_bytes(graph: LayerGraph, seg: Segment, tp: int) -> tuple[int, int]:
    """(bytes of the weights split over tp, bytes of replicated weights) of a segment, in the
    stored dtype; a device holds split / tp + replicated."""
    split = replicated = 0
    for i, axis in split_axes(graph, seg, tp).items():
        if axis is None:
            replicated += graph.params[i].nbytes
        else:
            split += graph.params[i].nbytes
    return split, replicated


def replicated_eqns(graph: LayerGraph, seg: Segment, tp: int) -> list:
    """The segment's equations every device of a split stage runs whole: those none of whose
    operands or results has a dimension tied to a split weight's split axis
    (``passes/axes.py``) -- norms, residual adds, an MoE router's softmax, top-k and the
    scatters that route tokens; and whole attention blocks where ``split_axis`` keeps their
    weights whole (a fused qkv projection whose axes the model mixes, as GPT-2's, or q/k/v/o
    kernels of [D, D]), matmuls included. The others do 1/tp of the work (a matmul
    contracting a split axis included: its partial sums are what the all-reduce adds). []
    at tp = 1.

    Example:
        >>> {e.primitive.name for e in replicated_eqns(graph, graph.layers[0], 2)} >= {"rsqrt"}
        True
    """
    if tp == 1:
        return []
    groups = _groups_of(graph.jaxpr.jaxpr)
    roots = {groups.find(((), graph.param_vars[i], axis))
             for i, axis in split_axes(graph, seg, tp).items() if axis is not None}

    def split(v) -> bool:
        return isinstance(v, Var) and any(groups.find(((), v, d)) in roots
                                          for d in range(len(v.aval.shape)))

    return [e for e in seg.eqns if not any(split(v) for v in (*e.invars, *e.outvars))]


# ---- mixed axes -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _groups_of(jaxpr):
    """``axis_groups`` once per program: the planner asks per segment and per tp, and the
    answer depends on neither (the program is immutable; cached by identity)."""
    return axis_groups(jaxpr)


def mixed_axes(graph: LayerGraph, params: Iterable[int] | None = None, *,
               hidden: int | None = None, whole_below: int = 0) -> dict[int, frozenset[int]]:
    """For each parameter index (default: all), the axes tied to a dimension the model moves
    data along (``passes/axes.py``); ``split_axis`` never splits them. Axes of size
    ``hidden`` are left out (never split).

    With ``whole_below`` (``split_axes`` passes the segment's residual bytes): a weight of at
    most that many bytes also keeps whole the axes sort or top_k selects along. Split there,
    every call all-gathers the selected dimension and all-reduces its softmax (an MoE router
    [D, E] over experts: three collectives per layer to save a few KiB); a larger weight (an
    LM head under top-k sampling) saves more than the all-gather costs, and such a
    collective stays inside the tp group, so it may split.

    Example:
        >>> mixed_axes(graph, graph.layers[0].params)   # tiny_dense: rotary mixes q, k's H
        {0: frozenset(), 1: frozenset({2}), 2: frozenset({2}), ...}
    """
    indices = range(len(graph.params)) if params is None else params
    groups = _groups_of(graph.jaxpr.jaxpr)
    variables = graph.param_vars
    def kept(i: int, a: int) -> bool:
        return groups.mixed(variables[i], a) or (
            graph.params[i].nbytes <= whole_below and groups.selected(variables[i], a))

    return {i: frozenset(a for a, size in enumerate(graph.params[i].shape)
                         if size != hidden and kept(i, a))
            for i in indices}
