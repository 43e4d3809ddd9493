"""Where a pipeline's weights live: one stage's weights on its own device(s), read without
per-tick copies.

- ``SlotStorage`` (tp = 1): each weight in a slot of its own, a [S, n] array sharded over
  "stage", read as a reshape of the local row (a bitcast).
- ``SplitStorage`` (tp > 1): weights grouped by (shape, dtype, split axis) into [S, k, *shape]
  arrays sharded over "stage" and, along the split axis, over "tp".

Example:
    >>> storage = SlotStorage([st.params for st in stages], graph.param_vars)
    >>> placed = storage.place(mesh, [[values[i] for i in st.params] for st in stages])
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax.passes.codec import Encoded, ParamCodec

AXIS = "stage"


def slot_key(dtype, shape) -> tuple[str, int]:
    """The slot key of an array: (dtype name, element count).

    Example:
        >>> slot_key(jnp.float32, (2, 3))
        ('float32', 6)
    """
    return np.dtype(dtype).name, int(np.prod(shape, dtype=np.int64))


def assign_slots(stage_keys: Sequence[Sequence[tuple[str, int]]]
                 ) -> tuple[list[tuple[tuple[str, int], int]], list[list[tuple[tuple, int]]]]:
    """Slots shared by the stages: a stage's j-th array of a key goes to slot (key, j), so
    there are as many slots of a key as the stage with the most such arrays holds.

    Returns:
        The slots, sorted by key, and per stage the (key, j) of each of its arrays.

    Example:
        >>> assign_slots([[("float32", 4), ("float32", 4)], [("float32", 4)]])[0]
        [(('float32', 4), 0), (('float32', 4), 1)]
    """
    counts_max: dict[tuple[str, int], int] = {}
    assigned = []
    for keys in stage_keys:
        counts: dict[tuple[str, int], int] = {}
        row = []
        for key in keys:
            row.append((key, counts.get(key, 0)))
            counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            counts_max[key] = max(counts_max.get(key, 0), n)
        assigned.append(row)
    return [(key, j) for key in sorted(counts_max) for j in range(counts_max[key])], assigned


class SlotStorage:
    """tp = 1: each weight in a slot of its own, a [S, n] array sharded over "stage", so a
    stage reads it as a reshape of its local [1, n] row -- a bitcast, no per-tick copy.

    Slots are keyed by (dtype, element count): stage s's j-th weight of n elements goes to
    slot j of that key, so stages with the same kinds of layers share slots (an embedding
    and a head of equal size share one). A stage with fewer weights of a key leaves its row
    of the extra slot zero; those padding rows are never read.
    """

    def __init__(self, stage_params: Sequence[tuple[int, ...]], param_vars,
                 codecs: Sequence[ParamCodec | None] | None = None):
        self.codecs = list(codecs) if codecs is not None else [None] * len(param_vars)
        self.stage_params = [tuple(params) for params in stage_params]
        # a stage's stored arrays: each weight's own, or its codec's (values, indices, scales)
        avals = [[a for i in params for a in self._stored_avals(i, param_vars)]
                 for params in stage_params]
        self.slots, assigned = assign_slots([[slot_key(a.dtype, a.shape) for a in row]
                                             for row in avals])
        self.where: list[list[tuple[tuple[str, int], int, tuple[int, ...]]]] = [
            [(key, j, tuple(a.shape)) for (key, j), a in zip(slots, row, strict=True)]
            for slots, row in zip(assigned, avals, strict=True)]
        self._index = {slot: n for n, slot in enumerate(self.slots)}

    def _stored_avals(self, i: int, param_vars) -> list:
        codec = self.codecs[i]
        return [param_vars[i].aval] if codec is None else codec.stored_avals()

    def _counts(self, s: int) -> list[int]:
        """How many stored arrays each of stage s's weights has."""
        return [1 if self.codecs[i] is None else len(self.codecs[i].stored_avals())
                for i in self.stage_params[s]]

    def specs(self):
        return [P(AXIS) for _ in self.slots]

    def slot_indices(self, s: int) -> list[int]:
        """The slot (index into ``place``'s list) of each of stage s's weights, in order
        (uncompressed storage: one slot per weight)."""
        return [self._index[key, j] for key, j, _ in self.where[s]]

    def own_bytes(self, s: int) -> int:
        """Bytes of stage s's own stored arrays (its rows of its slots; padding excluded)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(key[0]).itemsize
                   for key, _, shape in self.where[s])

    def stored(self, local, s: int) -> list:
        """Stage s's stored arrays (each weight's own, or its codec's), in ``where[s]``'s
        order, from its local rows: reshapes of the rows, no copies."""
        return [local[self._index[key, j]].reshape(shape) for key, j, shape in self.where[s]]

    def rows(self, local, s: int) -> list:
        """Stage s's local [1, n] rows of the slots its stored arrays fill, in ``where[s]``'s
        order: each row holds one stored array, flattened (a slot's size is its array's)."""
        return [local[self._index[key, j]] for key, j, _ in self.where[s]]

    def param_bytes(self, s: int) -> dict[int, int]:
        """Per weight of stage s (graph parameter index), its stored bytes."""
        sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(key[0]).itemsize
                 for key, _, shape in self.where[s]]
        out = {}
        for i, n in zip(self.stage_params[s], self._counts(s), strict=True):
            out[i], sizes = sum(sizes[:n]), sizes[n:]
        return out

    def unpack(self, local, s: int, lazy: bool = False) -> list:
        """Stage s's weights from its local rows: reshapes (bitcasts), then each codec's
        ``decode`` for compressed weights -- or, ``lazy``, an ``Encoded`` that the stage's
        equations decode where they first read it (``passes.lower._eval``)."""
        stored = self.stored(local, s)
        out = []
        for i, n in zip(self.stage_params[s], self._counts(s), strict=True):
            arrays, stored = stored[:n], stored[n:]
            codec = self.codecs[i]
            out.append(arrays[0] if codec is None else
                       Encoded(codec, tuple(arrays)) if lazy else codec.decode(arrays))
        return out

    def encode(self, s: int, values: Sequence) -> list:
        """Stage s's stored arrays from its weights (codecs encode; others as they are)."""
        out = []
        for i, x in zip(self.stage_params[s], values, strict=True):
            out.extend([x] if self.codecs[i] is None else self.codecs[i].encode(x))
        return out

    def abstract(self, mesh: Mesh, num_stages: int) -> list:
        """``place``'s arrays as ShapeDtypeStructs (same shapes and shardings)."""
        sharding = NamedSharding(mesh, P(AXIS))
        return [jax.ShapeDtypeStruct((num_stages, size), dt, sharding=sharding)
                for (dt, size), _ in self.slots]

    def assemble(self, mesh: Mesh, stage_arrays: Sequence[Sequence]) -> list:
        """The [S, n] slot arrays from each stage's stored arrays (or their [1, n] rows),
        already on its device; a stage with no array of a slot gets a zero row, made on its
        device. Nothing moves between devices.

        Example:
            >>> params = storage.assemble(mesh, [storage.rows(local[s], s) for s in stages])
        """
        devices = list(mesh.devices.ravel())
        sharding = NamedSharding(mesh, P(AXIS))
        out = []
        for key, j in self.slots:
            dt, size = key
            rows = []
            for s, arrays in enumerate(stage_arrays):
                mine = {(k, jj): x for (k, jj, _), x in zip(self.where[s], arrays, strict=True)}
                x = mine.get((key, j))
                rows.append(jax.device_put(np.zeros((1, size), dt), devices[s]) if x is None
                            else x if x.shape == (1, size) else x.reshape(1, size))
            out.append(jax.make_array_from_single_device_arrays((len(devices), size),
                                                                sharding, rows))
        return out

    def place(self, mesh: Mesh, stage_values: Sequence[list]) -> list:
        devices = mesh.devices.ravel()
        rows: list[list] = [[] for _ in self.slots]
        for s, values in enumerate(stage_values):
            if devices[s].process_index != jax.process_index():
                continue  # multi-process: each process places its own devices' rows
            stored = self.encode(s, values)
            mine = {(key, j): x for (key, j, _), x in zip(self.where[s], stored, strict=True)}
            for n, (key, j) in enumerate(self.slots):
                dt, size = key
                if (key, j) in mine:
                    row = jax.device_put(mine[key, j], devices[s]).reshape(1, size)
                else:
                    row = jax.device_put(np.zeros((1, size), dt), devices[s])
                rows[n].append(row)
        sharding = NamedSharding(mesh, P(AXIS))
        return [jax.make_array_from_single_device_arrays((len(stage_values), key[1]), sharding,
                                                         rows[n], dtype=key[0])
                for n, (key, _) in enumerate(self.slots)]


class SplitStorage:
    """tp > 1: weights grouped by (shape, dtype) into [S, k, *shape] arrays sharded over
    "stage" and, along the axis ``passes.tp.split_axes`` picks, over "tp"; XLA's SPMD
    partitioner splits each stage's equations accordingly (tp is an automatic axis).

    ``stage_axes[s]`` maps each of stage s's parameters to its split axis (or None)."""

    def __init__(self, stage_params, param_vars, stage_axes: Sequence[dict[int, int | None]],
                 tp: int):
        self.tp = tp
        self.where: list[list[tuple[tuple, int]]] = []
        self.groups: dict[tuple, int] = {}
        for s, params in enumerate(stage_params):
            counts: dict[tuple, int] = {}
            where = []
            for i in params:
                aval = param_vars[i].aval
                axis = stage_axes[s][i]
                key = (tuple(aval.shape), np.dtype(aval.dtype).name, axis)
                where.append((key, counts.get(key, 0)))
                counts[key] = counts.get(key, 0) + 1
            for key, n in counts.items():
                self.groups[key] = max(self.groups.get(key, 0), n)
            self.where.append(where)
        self.keys = sorted(self.groups, key=str)

    def _spec(self, key) -> P:
        shape, _, axis = key
        dims = [None] * len(shape)
        if axis is not None:
            dims[axis] = "tp"
        return P(AXIS, None, *dims)

    def specs(self):
        return [P(AXIS) for _ in self.keys]

    def own_bytes(self, s: int) -> int:
        """Bytes a device of stage s holds of its stage's own weights (its share of the
        split ones, the replicated ones whole; padding excluded)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
                   // (1 if axis is None else self.tp)
                   for (shape, dt, axis), _ in self.where[s])

    def unpack(self, local, s: int, lazy: bool = False) -> list:
        index = {k: n for n, k in enumerate(self.keys)}
        return [local[index[key]][0, j] for key, j in self.where[s]]

    def abstract(self, mesh: Mesh, num_stages: int) -> list:
        """``place``'s arrays as ShapeDtypeStructs (same shapes and shardings)."""
        return [jax.ShapeDtypeStruct((num_stages, self.groups[key], *key[0]), key[1],
                                     sharding=NamedSharding(mesh, self._spec(key)))
                for key in self.keys]

    def place(self, mesh: Mesh, stage_values: Sequence[list]) -> list:
        out = []
        for key in self.keys:
            shape, dt, _ = key
            k = self.groups[key]
            full = (len(stage_values), k, *shape)

            def build(index, key=key, k=k, shape=shape, dt=dt):
                s0 = index[0].start or 0
                s1 = index[0].stop if index[0].stop is not None else len(stage_values)
                rows = []
                for s in range(s0, s1):
                    slot = [np.zeros(shape, dt)] * k
                    for (kk, j), x in zip(self.where[s], stage_values[s], strict=True):
                        if kk == key:
                            slot[j] = np.asarray(x)
                    rows.append(np.stack(slot))
                return np.stack(rows)[(slice(None), *index[1:])]

            out.append(jax.make_array_from_callback(full, NamedSharding(mesh, self._spec(key)),
                                                    build))
        return out
