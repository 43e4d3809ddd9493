"""Intra-layer split (seed document 002): one stage's layers over ``tp`` devices.

The rule, shared by the planner (bytes per device) and the lowering (shardings): a weight is
split along its first dimension whose size differs from the layer's residual width D (the
hidden size) and divides by ``tp`` -- attention heads for q/k/v/out, the MLP width F for
gate/up/down, experts for stacked expert weights, the vocabulary for embeddings. That is
Megatron's column/row pattern: a layer's inner work is split and its [B, T, D] input and
output stay whole on every device. Weights with no such dimension (norm scales) are
replicated. XLA's SPMD partitioner inserts the reductions the split needs.

Example:
    >>> split_axis((4096, 32, 128), hidden=4096, tp=8)   # q [D, N, H]: heads
    1
"""

from __future__ import annotations

import numpy as np

from lwjax.passes.segment import LayerGraph, Segment


def split_axis(shape: tuple[int, ...], hidden: int, tp: int) -> int | None:
    """The axis a weight of ``shape`` is split along over ``tp`` devices, or None."""
    if tp == 1:
        return None
    for axis, size in enumerate(shape):
        if size != hidden and size % tp == 0 and size >= tp:
            return axis
    return None


def residual_width(graph: LayerGraph, seg: Segment) -> int:
    """D: the trailing size of the segment's largest floating-point input activation (KV-cache
    inputs excluded: in decode they outweigh the residual stream)."""
    cache = set(seg.cache_inputs)
    floats = [v for v in seg.inputs if np.issubdtype(v.aval.dtype, np.floating) and v.aval.shape
              and v not in cache]
    if not floats:
        return -1
    biggest = max(floats, key=lambda v: int(np.prod(v.aval.shape)))
    return int(biggest.aval.shape[-1])


def split_weight_bytes(graph: LayerGraph, seg: Segment, tp: int) -> tuple[int, int]:
    """(bytes of the weights split over tp, bytes of replicated weights) of a segment, in the
    stored dtype; a device holds split / tp + replicated."""
    hidden = residual_width(graph, seg)
    split = replicated = 0
    for i in seg.params:
        p = graph.params[i]
        if split_axis(p.shape, hidden, tp) is None:
            replicated += p.nbytes
        else:
            split += p.nbytes
    return split, replicated
