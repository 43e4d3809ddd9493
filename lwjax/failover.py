"""Device loss while running: a ShardedModel or Generator moves to a new plan without the lost
devices, its weights travelling device to device (``ShardedModel.replan``,
``Generator.replan``), or switches to a hot spare that already holds a stage's weights and
whose program is compiled ahead (``ShardedModel.keep_hot_spares``).

The parts, each in its module:

- the new plan (``lwjax.failover_plan``): a switch keeps the partition with hot spares in
  the lost stages' places; a migration repairs the old partition in place when that is
  projected no slower than a full re-partition, else re-partitions with devices keeping
  what they hold;
- the weights (``lwjax.failover_weights``): where each weight the new plan needs comes from
  (its device, a hot spare, a surviving device, the model's arrays) and moving it;
- here, the orchestration (``replan``, ``replan_generator``, ``keep_hot_spares``): check,
  plan, move the weights, lower and compile, each timed, into a ``Failover`` record.

The record's bytes moved are summed from the transfers made; ``bytes_needed`` is what the
two plans imply; the two agree by construction of the weights' sources.

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

from lwjax.errors import ConfigError, DeviceError
from lwjax.failover_plan import _new_plan
from lwjax.failover_plan import keep_in_place as keep_in_place
from lwjax.failover_plan import local_repair as local_repair
from lwjax.failover_plan import switch_plan as switch_plan
from lwjax.failover_weights import HotSpare as HotSpare
from lwjax.failover_weights import Move as Move
from lwjax.failover_weights import Source as Source
from lwjax.failover_weights import _by_id, _stage_devices, _stage_weights, _switched
from lwjax.failover_weights import move_weights as move_weights
from lwjax.failover_weights import needed_bytes as needed_bytes
from lwjax.failover_weights import spare_rows as spare_rows
from lwjax.passes.lower import lower
from lwjax.passes.planner import _device_ids, device_id, fmt_bytes
from lwjax.passes.storage import SlotStorage
from lwjax.plan import Plan


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


def _check_runnable(sm_storage, plan: Plan, what: str, virtual: int = 1) -> None:
    if virtual != 1:
        raise ConfigError(f"{what} moves one stage per device; this program runs {virtual} "
                          "stages per device (circular). Shard with "
                          "layerwise_shard(..., schedule='gpipe') to replan while running.")
    if not isinstance(sm_storage, SlotStorage):
        raise ConfigError(f"{what} moves one device per stage; this plan splits stages over "
                          f"tp={plan.tp} devices. Plan with tp=1 (allow=() or without "
                          "'split') to keep spares and replan while running.")
    if jax.process_count() > 1:
        raise ConfigError(f"{what} copies weights between devices of one process; this run "
                          f"has {jax.process_count()} processes. Restart the run on the new "
                          "plan (lwjax.plan(...).replan) instead.")


def lost_devices(plan: Plan, exclude_devices, spare_devices) -> tuple[list[int], list[int]]:
    """The excluded and spare device ids, checked against the plan (``DeviceError``).

    Example:
        >>> lost_devices(plan, [3], [12])
        ([3], [12])
    """
    excluded = _device_ids(exclude_devices, "exclude_devices")
    spares = _device_ids(spare_devices, "spare_devices")
    known = set(_by_id())
    unknown = [d for d in [*excluded, *spares] if d not in known]
    if unknown:
        raise DeviceError(f"devices {unknown} are not among this process's devices "
                          f"(ids {min(known)}..{max(known)}).")
    return excluded, spares


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
    """``ShardedModel.keep_hot_spares``'s work: per stage, its spare's copy (and program).

    Example:
        >>> keep_hot_spares(sm, {2: 9})[2].copied_bytes      # stage 2's own stored bytes
    """
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


def replan(sm, exclude_devices=(), spare_devices=(), *, drain: bool = False):
    """``ShardedModel.replan``'s work: (plan, program, placed params, its Compiled,
    Failover).

    Example:
        >>> plan, program, params, compiled, record = replan(sm, exclude_devices=[3])
    """
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


def replan_generator(g, exclude_devices=(), spare_devices=(), *, drain: bool = False):
    """``Generator.replan``'s work: the new Generator, with ``.failover`` set.

    Example:
        >>> replan_generator(g, exclude_devices=[3]).failover.kind
        'migrate'
    """
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
