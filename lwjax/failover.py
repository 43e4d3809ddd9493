"""Device loss while running: a ShardedModel or Generator moves to a new plan without the lost
devices, its weights travelling device to device (``ShardedModel.replan``,
``Generator.replan``), or switches to a hot spare that already holds a stage's weights and
whose program is compiled ahead (``ShardedModel.keep_hot_spares``).

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

``Failover`` records each part and its time. The bytes moved are summed from the transfers
made; ``bytes_needed`` is what the two plans imply (per new stage, its weights that no old
stage on its device held); the two agree by construction of the sources above, and the
tests check it against a placement from scratch.

Example:
    >>> sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:8])
    >>> sm2 = sm.replan(exclude_devices=[3])              # device 3 is lost
    >>> sm2.failover.bytes_moved, sm2.failover.compile_s
    >>> sm.keep_hot_spares({2: 9})                          # stage 2's weights on device 9
    >>> sm3 = sm.replan(exclude_devices=[2])                # a switch: nothing moves
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax.errors import ConfigError, DeviceError
from lwjax.passes.lower import _param_values, lower
from lwjax.passes.planner import _device_ids, device_id, fmt_bytes, stage_footprint
from lwjax.passes.storage import AXIS, SlotStorage
from lwjax.plan import Plan, Stage

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


@dataclasses.dataclass(frozen=True)
class Failover:
    """What a move to a new plan did and how long each part took (measured, wall clock).

    Attributes:
        kind: "migrate" (a new partition) or "switch" (hot spares take lost stages over;
            the partition is unchanged).
        excluded: the lost (or drained) device ids.
        replan_s: making the new plan.
        migrate_s: moving the weights and assembling the new slots, until they exist.
        compile_s: lowering and compiling the new program (0 when compiled ahead).
        moves: per weight the new stages need, where it came from.
        bytes_needed: bytes the plans imply must reach a device that did not hold them.
    """

    kind: Literal["migrate", "switch"]
    excluded: tuple[int, ...]
    replan_s: float
    migrate_s: float
    compile_s: float
    moves: tuple[Move, ...]
    bytes_needed: int

    def _bytes(self, *sources: str) -> int:
        return sum(m.nbytes for m in self.moves if m.source in sources)

    @property
    def bytes_moved(self) -> int:
        """Bytes copied device to device (from surviving devices or spares)."""
        return self._bytes("device", "spare")

    @property
    def bytes_from_model(self) -> int:
        """Bytes re-read from the arrays the model was built from (weights that lived only
        on lost devices, with no spare)."""
        return self._bytes("model")

    @property
    def bytes_arrived(self) -> int:
        """Bytes that reached a device which did not hold them before (moved, re-read, or a
        spare's copy taking over): what ``bytes_needed`` says the plans require."""
        return sum(m.nbytes for m in self.moves if m.source != "kept")

    @property
    def bytes_in_place(self) -> int:
        """Bytes already on their new device, as that device's own before the loss."""
        return self._bytes("kept")

    @property
    def bytes_from_spares(self) -> int:
        """Bytes a hot spare held already on the device that now runs them (a switch)."""
        return self._bytes("spare-local")

    @property
    def total_s(self) -> float:
        return self.replan_s + self.migrate_s + self.compile_s

    def summary(self) -> str:
        """The record in a few lines.

        Example:
            >>> print(sm2.failover.summary())
        """
        return (f"{self.kind} without devices {list(self.excluded)}: replan "
                f"{self.replan_s * 1e3:.1f} ms, weights {self.migrate_s * 1e3:.1f} ms, compile "
                f"{self.compile_s * 1e3:.1f} ms (total {self.total_s * 1e3:.1f} ms, measured)\n"
                f"weights: {fmt_bytes(self.bytes_in_place)} stayed where they were; of the "
                f"{fmt_bytes(self.bytes_arrived)} the new plan needs on other devices "
                f"({fmt_bytes(self.bytes_needed)} by the plans), "
                f"{fmt_bytes(self.bytes_from_spares)} were on their hot spares already, "
                f"{fmt_bytes(self.bytes_moved)} moved device to device and "
                f"{fmt_bytes(self.bytes_from_model)} were re-read from the model's arrays")


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


def _check_runnable(sm_storage, plan: Plan, what: str, virtual: int = 1) -> None:
    if virtual != 1:
        raise ConfigError(f"{what} moves one stage per device; this program runs {virtual} "
                          "stages per device (circular). Use a one-lap schedule to replan "
                          "while running.")
    if not isinstance(sm_storage, SlotStorage):
        raise ConfigError(f"{what} moves one device per stage; this plan splits stages over "
                          f"tp={plan.tp} devices. Plan with tp=1 (allow=() or without "
                          "'split') to keep spares and replan while running.")
    if jax.process_count() > 1:
        raise ConfigError(f"{what} copies weights between devices of one process; this run "
                          f"has {jax.process_count()} processes. Restart the run on the new "
                          "plan (lwjax.plan(...).replan) instead.")


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
    docstring: the sources, in order); returns them and the moves made."""
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


def lost_devices(plan: Plan, exclude_devices, spare_devices) -> tuple[list[int], list[int]]:
    """The excluded and spare device ids, checked against the plan (``DeviceError``)."""
    excluded = _device_ids(exclude_devices, "exclude_devices")
    spares = _device_ids(spare_devices, "spare_devices")
    known = set(_by_id())
    unknown = [d for d in [*excluded, *spares] if d not in known]
    if unknown:
        raise DeviceError(f"devices {unknown} are not among this process's devices "
                          f"(ids {min(known)}..{max(known)}).")
    return excluded, spares


def local_repair(old: Plan, planned: Plan, excluded: Sequence[int],
                 spares: Sequence[int]) -> Plan | None:
    """``old``'s partition, repaired where it broke: each lost stage runs on a new spare if
    one is left, else its layers join the faster of its surviving neighbours. Every other
    stage keeps its layers and device, so only the lost layers move. Returns None when a
    stage would not fit or the repair is projected slower than ``planned`` (a full
    re-partition), under the plan's own objective.

    Example:
        >>> repaired = local_repair(old, old.replan(exclude_devices=[5]), [5], [])
        >>> [st.layer_range for st in repaired.stages][4]      # stage 5's layer joined 4
        (4, 6)
    """
    if old.tp != 1 or old.mode == "train":
        return None
    free = [d for d in spares if d not in excluded]
    ranges = [list(st.layer_range) for st in old.stages]
    devs: list[int | None] = [st.devices[0] for st in old.stages]
    for k, d in enumerate(devs):
        if d in excluded:
            devs[k] = free.pop(0) if free else None
    if all(d is None for d in devs):
        return None

    def alive_next_to(k: int) -> list[int]:
        return [n for n in (k - 1, k + 1) if 0 <= n < len(devs) and devs[n] is not None]

    while None in devs:  # a lost stage next to a surviving one joins it
        k = next(k for k, d in enumerate(devs) if d is None and alive_next_to(k))
        alive = alive_next_to(k)
        times = {n: sum(old.numbers.costs_s[ranges[n][0]:ranges[n][1]]) for n in alive}
        n = min(alive, key=lambda m: (times[m], m))
        ranges[n] = [min(ranges[n][0], ranges[k][0]), max(ranges[n][1], ranges[k][1])]
        del ranges[k], devs[k]
    num = len(ranges)
    stages = tuple(
        Stage(index=k, layers=old.numbers.names[a:b], layer_range=(a, b), devices=(d,),
              footprint=stage_footprint(old.numbers, a, b, num),
              est_time_s=sum(old.numbers.costs_s[a:b]))
        for k, ((a, b), d) in enumerate(zip(ranges, devs, strict=True)))
    repaired = dataclasses.replace(planned, stages=stages, notes=(
        *planned.notes, "repaired in place: the lost stages' layers run on spares or join a "
                        "neighbour; every other stage keeps its layers and device"))
    if any(repaired.resident_bytes(st) > repaired.capacity_bytes for st in stages):
        return None

    def score(p: Plan) -> float:
        return p.bottleneck.est_time_s if p.objective == "bottleneck" else p.step_time_s

    return repaired if score(repaired) <= score(planned) * (1 + 1e-9) else None


def _new_plan(old: Plan, excluded: Sequence[int], spares: Sequence[int]) -> Plan:
    """The plan to move to: the repaired old partition when it is projected no slower than
    a full re-partition, else that re-partition with devices keeping what they hold."""
    planned = old.replan(exclude_devices=excluded, spare_devices=spares)
    return local_repair(old, planned, excluded, spares) or keep_in_place(planned, old)


def keep_in_place(plan: Plan, old: Plan) -> Plan:
    """``plan`` with its stages' devices permuted so that as many weight bytes as possible
    stay where they are: stage k scores device d by the weight bytes of the layers both it
    and d's old stage run; pairs are taken best first (greedy matching), the rest in pool
    order. The partition, and so the projected step, is unchanged (devices are alike).

    Example:
        >>> keep_in_place(old.replan(exclude_devices=[6], spare_devices=[12]), old)
    """
    if plan.tp != 1:
        return plan
    weights = [f.weights_bytes for f in plan.numbers.footprints]
    held = {st.devices[0]: set(range(*st.layer_range)) for st in old.stages}
    devs = [st.devices[0] for st in plan.stages]
    pairs = sorted(((sum(weights[i] for i in range(*st.layer_range) if i in held.get(d, ())),
                     -k, -n, k, d) for k, st in enumerate(plan.stages)
                    for n, d in enumerate(devs)), reverse=True)
    chosen: dict[int, int] = {}
    for score, _, _, k, d in pairs:
        if score > 0 and k not in chosen and d not in chosen.values():
            chosen[k] = d
    rest = iter(d for d in devs if d not in chosen.values())
    order = [chosen[k] if k in chosen else next(rest) for k in range(len(plan.stages))]
    if order == devs:
        return plan
    return dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(st, devices=(d,)) for st, d in zip(plan.stages, order, strict=True)))


def switch_plan(plan: Plan, replace: Mapping[int, int], excluded: Sequence[int]) -> Plan:
    """The same partition with stage k on device ``replace[k]`` (its hot spare)."""
    stages = tuple(dataclasses.replace(st, devices=(replace[k],)) if k in replace else st
                   for k, st in enumerate(plan.stages))
    pool = tuple(d for d in plan.device_pool if d not in excluded) + tuple(
        d for d in replace.values() if d not in plan.device_pool)
    note = (f"devices {list(excluded)} lost: stage(s) {sorted(replace)} switched to hot "
            f"spare(s) {[replace[k] for k in sorted(replace)]}")
    return dataclasses.replace(plan, stages=stages, device_pool=pool,
                               notes=(*plan.notes, note))


def _jax_devices(plan: Plan) -> list:
    by_id = _by_id()
    return [by_id[d] for d in _stage_devices(plan)]


def _lower(sm, plan: Plan):
    prog = sm.program
    return lower(prog.graph, [st.layer_range for st in plan.stages], _jax_devices(plan),
                 plan.microbatches, schedule=prog.schedule, codecs=prog.storage.codecs)


def _compile(program, params) -> tuple[object, float]:
    """``program`` compiled for ``params`` and the call's abstract arguments (``Compiled``:
    calling it skips tracing and lowering), and the seconds it took."""
    start = time.perf_counter()
    compiled = program.fn.lower(params, *program.abstract_args()[1:]).compile()
    return compiled, time.perf_counter() - start


def keep_hot_spares(sm, spares: Mapping[int, int] | Sequence[int], *,
                    compile_ahead: bool = True) -> dict[int, HotSpare]:
    """``ShardedModel.keep_hot_spares``'s work: per stage, its spare's copy (and program)."""
    plan, storage = sm.plan, sm.program.storage
    _check_runnable(storage, plan, "keep_hot_spares", sm.program.virtual)
    num_stages = len(plan.stages)
    if not isinstance(spares, Mapping):
        spares = dict(enumerate(_device_ids(spares, "spares")))
    stage_devs = _stage_devices(plan)
    taken = {hs.device: k for k, hs in sm.hot_spares.items()}
    by_id = _by_id()
    out = {}
    for k, d in spares.items():
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or \
                not 0 <= k < num_stages:
            raise ConfigError(f"hot spare for stage {k!r}: the plan has stages "
                              f"0..{num_stages - 1}.")
        d = device_id(d, f"keep_hot_spares' device for stage {k}")
        if d not in by_id:
            raise DeviceError(f"hot spare device {d} is not among this process's devices.")
        if d in stage_devs:
            raise DeviceError(f"device {d} runs stage {stage_devs.index(d)}; a hot spare must be "
                              "a device the plan does not use.")
        if taken.get(d, k) != k or list(spares.values()).count(d) > 1:
            raise DeviceError(f"device {d} is already the hot spare of another stage; give "
                              "each stage its own spare.")
        start = time.perf_counter()
        rows = spare_rows(sm, k, d)
        hs = HotSpare(k, d, rows, storage.own_bytes(k), time.perf_counter() - start)
        if compile_ahead:
            program = _lower(sm, switch_plan(plan, {k: d}, [stage_devs[k]]))
            hs.program = program
            params = _switched(sm, program, {k: hs})
            hs.compiled, hs.compile_s = _compile(program, params)
            # one run on zeros: an executable's first run costs several later ones
            # (measured on XLA:CPU: 689 vs 64 ms), so the switch's first call does not pay it
            start = time.perf_counter()
            zeros = [np.zeros(a.shape, a.dtype) for a in program.abstract_args()[1:]]
            jax.block_until_ready(hs.compiled(params, *zeros))
            hs.warm_s = time.perf_counter() - start
        out[k] = hs
    return out


def spare_rows(sm, k: int, d: int) -> list:
    """Stage k's rows of every slot on device ``d``: its own arrays copied device to device,
    padding rows made there."""
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


def replan(sm, exclude_devices=(), spare_devices=(), *, drain: bool = False):
    """``ShardedModel.replan``'s work: (plan, program, placed params, its Compiled,
    Failover)."""
    old_plan, old_prog = sm.plan, sm.program
    _check_runnable(old_prog.storage, old_plan, "replan", old_prog.virtual)
    excluded, new_spares = lost_devices(old_plan, exclude_devices, spare_devices)
    unknown = [d for d in excluded if d not in old_plan.device_pool]
    if unknown:  # as Plan.replan says it, before a switch could skip that check
        raise DeviceError(f"Cannot exclude devices {unknown}: not in the plan's pool "
                          f"{list(old_plan.device_pool)}; exclude ids from the pool.")
    stage_devs = _stage_devices(old_plan)
    hit = [k for k, d in enumerate(stage_devs) if d in excluded]
    covered = {k: sm.hot_spares[k] for k in hit if k in sm.hot_spares
               and sm.hot_spares[k].device not in excluded}
    lost = [] if drain else excluded
    start = time.perf_counter()
    if hit and len(covered) == len(hit) and not new_spares:
        kind = "switch"
        plan = switch_plan(old_plan, {k: hs.device for k, hs in covered.items()}, excluded)
    else:
        kind = "migrate"
        plan = _new_plan(old_plan, excluded, new_spares)
    replan_s = time.perf_counter() - start
    ahead = next(iter(covered.values())) if kind == "switch" and len(covered) == 1 else None
    if ahead is None or ahead.program is None:
        ahead = None
    program = ahead.program if ahead is not None else _lower(sm, plan)
    storage = program.storage
    start = time.perf_counter()
    if kind == "switch":
        params = _switched(sm, program, covered)
        moves = [Move(name, "spare-local" if k in covered else "kept", st.devices[0],
                      st.devices[0], nbytes)
                 for k, st in enumerate(plan.stages)
                 for name, nbytes in _stage_weights(storage, k, sm.program.graph)]
    else:
        params, moves = move_weights(old_prog.storage, sm.params, old_plan, storage, plan,
                                     program.mesh, old_prog.graph, lost=lost,
                                     spares=sm.hot_spares, model_params=sm._traced.params,
                                     model_current=sm.model_weights)
    jax.block_until_ready(params)
    migrate_s = time.perf_counter() - start
    compiled, compile_s = (ahead.compiled, 0.0) if ahead is not None else \
        _compile(program, params)
    sizes = {i: b for s in range(len(plan.stages)) for i, b in storage.param_bytes(s).items()}
    needed = needed_bytes(old_plan, plan, old_prog.storage.stage_params, storage.stage_params,
                          sizes)
    return plan, program, params, compiled, Failover(kind, tuple(excluded), replan_s,
                                                     migrate_s, compile_s, tuple(moves), needed)


def _stage_weights(storage: SlotStorage, s: int, graph) -> list[tuple[str, int]]:
    names = _names(graph)
    return [(names[i], b) for i, b in storage.param_bytes(s).items()]


def replan_generator(g, exclude_devices=(), spare_devices=(), *, drain: bool = False):
    """``Generator.replan``'s work: the new Generator, with ``.failover`` set."""
    from lwjax.generate import Generator

    old_prog = next(iter(g._programs.values()))
    _check_runnable(old_prog.storage, g.plan, "replan")
    excluded, new_spares = lost_devices(g.plan, exclude_devices, spare_devices)
    start = time.perf_counter()
    plan = _new_plan(g.plan, excluded, new_spares)
    replan_s = time.perf_counter() - start
    moves: list[Move] = []

    def place(program):
        params, made = move_weights(old_prog.storage, g.params, g.plan, program.storage, plan,
                                    program.mesh, program._graph,
                                    lost=[] if drain else excluded, spares={},
                                    model_params=g._decode.traced.params,
                                    model_current=g.model_weights)
        moves.extend(made)
        return jax.block_until_ready(params)

    placing = [0.0]

    def timed_place(program):
        start = time.perf_counter()
        out = place(program)
        placing[0] = time.perf_counter() - start
        return out

    start = time.perf_counter()
    new = Generator(g.lm, plan, g._decode, jax.devices(), prompt_shape=g.prompt_shape,
                    max_new_tokens=g.max_new_tokens, cache_len=g.cache_len, eos_id=g.eos_id,
                    pad_id=g.pad_id, layers=g._layers, vocab=g.vocab,
                    compression=g.compression, place=timed_place)
    built_s = time.perf_counter() - start
    migrate_s = placing[0]
    prog = new.program(g.prompt_shape[1])
    m, mb = plan.microbatches, plan.microbatch_size
    start = time.perf_counter()
    prog.fn.lower(new.params, prog.abstract_caches(),
                  jax.ShapeDtypeStruct((m, mb, g.prompt_shape[1]), np.int32),
                  jax.ShapeDtypeStruct((m, mb), np.int32)).compile()
    new.compile_seconds[g.prompt_shape[1]] = time.perf_counter() - start
    # lowering, cache allocation and the compile: what building the new program costs
    compile_s = built_s - migrate_s + new.compile_seconds[g.prompt_shape[1]]
    storage = prog.storage
    sizes = {i: b for s in range(len(plan.stages)) for i, b in storage.param_bytes(s).items()}
    needed = needed_bytes(g.plan, plan, old_prog.storage.stage_params, storage.stage_params,
                          sizes)
    new.failover = Failover("migrate", tuple(excluded), replan_s, migrate_s, compile_s,
                            tuple(moves), needed)
    return new
