"""Where generation keeps a model's KV cache: each cache leaf on the stages that read or
write it, in per-dtype slots with one row per group of sequences, and how a decode tick
writes a leaf (the model's own ``dynamic_update_slice``, found in the jaxpr).

Example:
    >>> leaves = cache_leaves((prefill_graph, decode_graph), ranges, fills)
    >>> slots = CacheSlots(leaves, num_stages=len(ranges))
    >>> slots.where[0]          # stage 0: leaf index -> slot
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwjax._compat import Var
from lwjax.passes.padding import StoredArray
from lwjax.passes.segment import LayerGraph
from lwjax.passes.storage import assign_slots, slot_key


@dataclasses.dataclass(frozen=True)
class CacheLeaf:
    """One leaf of the model's cache and the stages that keep a copy of it."""

    index: int
    path: str
    shape: tuple[int, ...]
    dtype: str
    fill: float | int
    stages: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


class CacheSlots:
    """Stage s's cache leaves in slots ``[S, M, n]`` sharded over "stage" (one row per
    group), keyed by (dtype, element count) as ``SlotStorage`` keys weights."""

    def __init__(self, leaves: Sequence[CacheLeaf], num_stages: int):
        held = [[leaf for leaf in leaves if s in leaf.stages] for s in range(num_stages)]
        self.slots, assigned = assign_slots([[slot_key(leaf.dtype, leaf.shape) for leaf in row]
                                             for row in held])
        index = {slot: n for n, slot in enumerate(self.slots)}
        # per stage: leaf index -> slot
        self.where: list[dict[int, int]] = [
            {leaf.index: index[slot] for leaf, slot in zip(row, slots, strict=True)}
            for row, slots in zip(held, assigned, strict=True)]
        # per stage and slot: the fill value of the leaf it holds (0 for a padding row)
        fills = np.zeros((num_stages, len(self.slots)), np.float64)
        by_index = {leaf.index: leaf for leaf in leaves}
        for s, where in enumerate(self.where):
            for leaf, slot in where.items():
                fills[s, slot] = by_index[leaf].fill
        self.fills = fills


def cache_leaves(graphs: Sequence[LayerGraph], ranges, fills) -> tuple[CacheLeaf, ...]:
    """Each cache leaf and the stages that read or write it in either graph.

    Example:
        >>> [leaf.stages for leaf in cache_leaves((pre, dec), [(0, 1), (1, 2)], fills)]
        [(0,), (1,), (0,), (1,), (0, 1)]      # keys 0, 1; values 0, 1; the counter
    """
    first = graphs[0]
    paths = [p for p, c in zip(first.traced.arg_paths, first.traced.cache_args, strict=True) if c]
    avals = [a for a, c in zip(first.traced.args, first.traced.cache_args, strict=True) if c]
    stage_of = stage_of_segment(first, ranges)
    stages = [set() for _ in paths]
    for k, leaves in enumerate(segment_leaves(graphs)):
        for j in leaves:
            stages[j].add(stage_of[k])
    return tuple(CacheLeaf(j, paths[j].split("/", 2)[-1], tuple(avals[j].shape),
                           np.dtype(avals[j].dtype).name, fills[j], tuple(sorted(stages[j])))
                 for j in range(len(paths)))


def segment_leaves(graphs: Sequence[LayerGraph]) -> list[set[int]]:
    """Per segment (prologue 0, layer i at i + 1, epilogue last), the cache leaves (by index)
    it reads or writes in any of ``graphs`` (the same layers traced for prefill and decode).

    Example:
        >>> segment_leaves((pre, dec))[1]   # layer 0: its keys and values, the counter
    """
    touched: list[set[int]] = [set() for _ in graphs[0].segments]
    for graph in graphs:
        outs = graph.jaxpr.jaxpr.outvars[1:]
        index = {v: j for j, v in enumerate(cache_arg_vars(graph))}
        for k, seg in enumerate(graph.segments):
            touched[k].update(index[v] for v in seg.cache_inputs)
            defined = {v for e in seg.eqns for v in e.outvars}
            touched[k].update(j for j, o in enumerate(outs) if isinstance(o, Var) and o in defined)
    return touched


def stored_caches(graphs: Sequence[LayerGraph], num_microbatches: int
                  ) -> tuple[tuple[StoredArray, ...], ...]:
    """Per segment (prologue, layers, epilogue), the cache leaves it keeps on its stage, as
    ``CacheSlots`` stores them for all ``num_microbatches`` groups (``passes/padding.py``
    predicts the slots' padding from these; ``StoredArray.param`` is the leaf's index).

    Example:
        >>> [len(seg) for seg in stored_caches((pre, dec), 2)]
    """
    first = graphs[0]
    avals = [a for a, c in zip(first.traced.args, first.traced.cache_args, strict=True) if c]
    return tuple(
        tuple(StoredArray(j, np.dtype(avals[j].dtype).name,
                          num_microbatches * int(np.prod(avals[j].shape, dtype=np.int64)))
              for j in sorted(leaves))
        for leaves in segment_leaves(graphs))


def cache_arg_vars(graph: LayerGraph) -> list[Var]:
    return [v for v, c in zip(graph.arg_vars, graph.traced.cache_args, strict=True) if c]


def stage_of_segment(graph: LayerGraph, ranges) -> list[int]:
    """Segment index (prologue 0, layer i at i + 1, epilogue last) -> its stage."""
    out = [0]
    for s, (start, stop) in enumerate(ranges):
        out.extend([s] * (stop - start))
    return [*out, len(ranges) - 1]


def find_patch(segments, cache_var: Var, out_var):
    """The equation that makes a cache leaf's new value when it is ``dynamic_update_slice(
    leaf, update, *index)`` (a K/V write): a decode tick then writes only ``update`` into the
    slot, instead of the group's whole row."""
    for seg in segments:
        for e in seg.eqns:
            if e.outvars[0] is out_var:
                ok = e.primitive.name == "dynamic_update_slice" and e.invars[0] is cache_var
                return e if ok else None
    return None


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """A slot whose holders all write their leaf with one ``dynamic_update_slice`` of the same
    update shape: decode ticks write ``update`` at ``index`` in the group's row of the slot
    (viewed as [1, M, *leaf shape]), so the row is not copied back whole."""

    leaf_shape: tuple[int, ...]
    update_shape: tuple[int, ...]
    dtype: str

    def zeros(self):
        return (jnp.zeros(self.update_shape, self.dtype),
                jnp.zeros((len(self.leaf_shape),), jnp.int32))

    def unchanged(self, row):
        """What the row holds at index 0: writing it back changes nothing (idle ticks)."""
        index = (0,) * len(self.leaf_shape)
        return (jax.lax.dynamic_slice(row.reshape(self.leaf_shape), index, self.update_shape),
                jnp.zeros((len(self.leaf_shape),), jnp.int32))

    def write(self, slot, update_index, group):
        update, index = update_index
        view = slot.reshape(*slot.shape[:2], *self.leaf_shape)
        start = (0, group, *(index[k] for k in range(len(self.leaf_shape))))
        return jax.lax.dynamic_update_slice(view, update[None, None], start).reshape(slot.shape)


def patch_specs(phase: Sequence, slots: CacheSlots,
                 leaves: Sequence[CacheLeaf]) -> dict[int, PatchSpec]:
    """Slot -> _PatchSpec, for the slots whose every holder patches its leaf alike."""
    holders: dict[int, list] = {}
    for s, st in enumerate(phase):
        for j, n in slots.where[s].items():
            e = st.patches.get(j)
            update = None if e is None else e.invars[1].aval
            holders.setdefault(n, []).append(
                None if update is None else (leaves[j].shape, tuple(update.shape),
                                             np.dtype(leaves[j].dtype).name))
    return {n: PatchSpec(*specs[0]) for n, specs in holders.items()
            if specs[0] is not None and all(x == specs[0] for x in specs)}
