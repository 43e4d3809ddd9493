"""Failover's weights: where each weight a new plan's stage needs comes from, and moving it
there (``move_weights``); hot spares' copies of a stage's rows (``HotSpare``, ``spare_rows``).

A stage's weights are its stored arrays (``SlotStorage.stored``: compressed ones move
compressed). For each weight a new stage needs, the source is, in this order:

1. its device already holds it (an old stage on the same device had it): nothing moves;
2. a hot spare's copy on that very device: nothing moves;
3. a surviving device that held it: a device-to-device ``jax.device_put``;
4. a hot spare's copy on another device: device to device;
5. the arrays the model was built from (``TracedModel.params``; on the host or the default
   device): only for weights that lived on lost devices alone. Excluded devices are lost:
   nothing is read from them (``drain=True``: they still work, e.g. maintenance, and their
   weights move off them).

Each weight's source is recorded as a ``Move``. ``needed_bytes`` is what the two plans imply
(per new stage, its weights that no old stage on its device held); the moves' bytes agree
with it by construction of the sources above, and the tests check it against a placement
from scratch.

Example:
    >>> params, moves = move_weights(old_storage, sm.params, old_plan, new_storage, new_plan,
    ...                              mesh, graph, lost=[3], spares={}, model_params=params)
    >>> sum(m.nbytes for m in moves if m.source != "kept")   # bytes that arrived
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax.errors import DeviceError
from lwjax.passes.lower import _param_values
from lwjax.passes.storage import AXIS, SlotStorage
from lwjax.plan import Plan

Source = Literal["kept", "spare-local", "device", "spare", "model"]


@dataclasses.dataclass(frozen=True)
class Move:
    """One weight's stored arrays reaching a new stage's device.

    Attributes:
        param: the weight's path in the model.
        source: where they came from (module docstring: "kept", "spare-local", "device",
            "spare", "model").
        src_device: the device id read (None: the model's arrays not on a device).
        dst_device: the new stage's device id.
        nbytes: stored bytes.
    """

    param: str
    source: Source
    src_device: int | None
    dst_device: int
    nbytes: int


@dataclasses.dataclass
class HotSpare:
    """A copy of one stage's stored rows on a spare device, and the program that runs with
    the spare in the stage's place, compiled ahead.

    Attributes:
        stage: the stage it covers.
        device: the spare's device id.
        rows: per slot, the spare's [1, n] row (the stage's own arrays copied, padding rows
            made on the spare).
        copied_bytes: bytes copied to the spare (its stage's own stored bytes).
        copy_s: the copy's time (measured).
        compile_s: compiling the program with the spare in place (measured; 0 if not asked).
        warm_s: its first run, on zeros, ahead (measured).
        program: that program (``PipelineProgram``), or None.
        compiled: its ``jax.stages.Compiled``, or None.
    """

    stage: int
    device: int
    rows: list
    copied_bytes: int
    copy_s: float
    compile_s: float = 0.0
    warm_s: float = 0.0
    program: object = None
    compiled: object = None


def _by_id() -> dict[int, jax.Device]:
    return {d.id: d for d in jax.devices()}


def _stage_devices(plan: Plan) -> list[int]:
    return [s.devices[0] for s in plan.stages]


def _locals(params: Sequence[jax.Array], device_ids: Sequence[int]) -> dict[int, list]:
    """Per device id, its local [1, n] row of every slot array."""
    out = {}
    for d in device_ids:
        out[d] = [next(sh.data for sh in a.addressable_shards if sh.device.id == d)
                  for a in params]
    return out


def _names(graph) -> list[str]:
    paths = graph.traced.param_paths
    return [paths[p.source] + ("" if p.slice_index is None else f"[{p.slice_index}]")
            for p in graph.params]


def needed_bytes(old_plan: Plan, new_plan: Plan, stage_params_old, stage_params_new,
                 stored_bytes: Mapping[int, int]) -> int:
    """Bytes the new plan needs moved: per new stage, its weights that no old stage on the
    same device held (``stored_bytes``: per weight, its stored bytes).

    Example:
        >>> needed_bytes(old, new, old_params, new_params, {0: 64, 1: 64})
        64
    """
    held: dict[int, set[int]] = {}
    for st, params in zip(old_plan.stages, stage_params_old, strict=True):
        held.setdefault(st.devices[0], set()).update(params)
    return sum(stored_bytes[i]
               for st, params in zip(new_plan.stages, stage_params_new, strict=True)
               for i in params if i not in held.get(st.devices[0], set()))


def move_weights(old_storage: SlotStorage, old_params, old_plan: Plan,
                 new_storage: SlotStorage, new_plan: Plan, mesh, graph, *,
                 lost: Sequence[int], spares: Mapping[int, HotSpare],
                 model_params, model_current: bool = True) -> tuple[list, list[Move]]:
    """The new plan's placed slot arrays from the weights where they are now (module
    docstring: the sources, in order); returns them and the moves made.

    Example:
        >>> params, moves = move_weights(old_storage, sm.params, old_plan, new_storage,
        ...                              new_plan, mesh, graph, lost=[3], spares={},
        ...                              model_params=model_params)
    """
    by_id = _by_id()
    old_devs = _stage_devices(old_plan)
    alive = [d for d in dict.fromkeys(old_devs) if d not in lost]
    local = _locals(old_params, alive)
    # per weight: (device id, its stored arrays' [1, n] rows) for each surviving old stage
    # that holds it; rows move as they are (no reshapes: nothing to compile per device)
    holders: dict[int, list[tuple[int, list]]] = {}
    for t, d in enumerate(old_devs):
        if d in lost:
            continue
        arrays = old_storage.rows(local[d], t)
        n = 0
        for i, k in zip(old_storage.stage_params[t], old_storage._counts(t), strict=True):
            holders.setdefault(i, []).append((d, arrays[n:n + k]))
            n += k
    # hot spares' copies, per weight
    for spare in spares.values():
        arrays = old_storage.rows(spare.rows, spare.stage)
        n = 0
        for i, k in zip(old_storage.stage_params[spare.stage],
                        old_storage._counts(spare.stage), strict=True):
            holders.setdefault(i, []).append((-1 - spare.device, arrays[n:n + k]))
            n += k
    names = _names(graph)
    values = None
    moves: list[Move] = []
    stage_arrays = []
    for s, st in enumerate(new_plan.stages):
        dst = st.devices[0]
        out = []
        sizes = new_storage.param_bytes(s)
        for i in new_storage.stage_params[s]:
            options = holders.get(i, [])
            rank = {"kept": 0, "spare-local": 1, "device": 2, "spare": 3}

            def kind(d, dst=dst):
                if d >= 0:
                    return "kept" if d == dst else "device"
                return "spare-local" if -1 - d == dst else "spare"

            if options:
                d, arrays = min(options, key=lambda o: rank[kind(o[0])])
                source = kind(d)
                src = d if d >= 0 else -1 - d
                if src != dst:
                    arrays = [jax.device_put(x, by_id[dst]) for x in arrays]
            else:  # lived on lost devices only: the model's own arrays
                if values is None:
                    values = _param_values(graph, model_params)
                x = values[i]
                src_devs = getattr(x, "devices", lambda: set())()
                src = next(iter(src_devs)).id if len(src_devs) == 1 else None
                if src is not None and src in lost:
                    raise DeviceError(
                        f"weight {names[i]} lived only on lost devices, and the model's own "
                        f"array of it is on lost device {src} too; keep a hot spare of its "
                        "stage (sm.keep_hot_spares), replan with drain=True if the device still "
                        "works, or create the model's arrays off the pipeline's devices (on a "
                        "GPU host: under jax.default_device(jax.devices('cpu')[0])).")
                if not model_current:
                    raise DeviceError(
                        f"weight {names[i]} lived only on lost devices, and the running "
                        "weights differ from the model's own arrays (loaded from training or "
                        "recompressed): they cannot be restored. Keep a hot spare of its "
                        "stage (sm.keep_hot_spares) to survive this loss.")
                source = "model"
                codec = new_storage.codecs[i]
                arrays = [jax.device_put(np.asarray(a).reshape(1, -1), by_id[dst])
                          for a in ([x] if codec is None else codec.encode(x))]
            moves.append(Move(names[i], source, src, dst, sizes[i]))
            out.extend(arrays)
        stage_arrays.append(out)
    return new_storage.assemble(mesh, stage_arrays), moves


def spare_rows(sm, k: int, d: int) -> list:
    """Stage k's rows of every slot on device ``d``: its own arrays copied device to device,
    padding rows made there.

    Example:
        >>> rows = spare_rows(sm, 2, 9)          # stage 2's rows, copied to device 9
    """
    storage = sm.program.storage
    src = _stage_devices(sm.plan)[k]
    local = _locals(sm.params, [src])[src]
    own = {(key, j) for key, j, _ in storage.where[k]}
    dev = _by_id()[d]
    return jax.block_until_ready(
        [jax.device_put(row, dev) if slot in own else
         jax.device_put(np.zeros(row.shape, row.dtype), dev)
         for row, slot in zip(local, storage.slots, strict=True)])


def _switched(sm, program, covered: Mapping[int, HotSpare]) -> list:
    """The slot arrays with the covered stages' rows taken from their spares (no copies)."""
    stage_devs = _stage_devices(sm.plan)
    local = _locals(sm.params, [d for k, d in enumerate(stage_devs) if k not in covered])
    sharding = NamedSharding(program.mesh, P(AXIS))
    return [jax.make_array_from_single_device_arrays(
                a.shape, sharding,
                [covered[k].rows[n] if k in covered else local[d][n]
                 for k, d in enumerate(stage_devs)])
            for n, a in enumerate(sm.params)]


def _stage_weights(storage: SlotStorage, s: int, graph) -> list[tuple[str, int]]:
    names = _names(graph)
    return [(names[i], b) for i, b in storage.param_bytes(s).items()]
