"""Pass 5: footprints + costs + a target -> Plan (contiguous stages, each fitting the cache).

What a stage occupies: layers run one after another, so a stage holds the *sum* of its
layers' weights and KV caches but only the *largest* activation + buffer peak among them
(``Footprint.__add__``). The partitioner works on additive sizes, so layer i's size is its
weights + KV (the prologue's added to layer 0, the epilogue's to the last layer) and the
capacity is reduced by the model-wide largest activation + buffer peak: exact when the
layers are identical (lwjax's models), conservative otherwise. With residency "weights"
only weights + KV must fit (activations stream through HBM).

Per-layer time: a roofline (``passes/cost``) of the layer's traced equations on the
HardwareSpec, weights read from L2 when its stage fits on chip; the prologue's time folds
into the first layer. The epilogue (final norm, LM head) runs on the last stage after the
pipeline's ticks (``passes/lower.py``), so it is no part of a tick: ``step_time`` adds it M
times. The partition minimises the slowest stage exactly.

The strategies for plans that do not fit are in ``passes/strategies.py``; splitting a
layer over devices in ``passes/split.py``.

Example:
    >>> plan = plan_from_numbers(numbers, capacity_bytes=50 * 2**20, device_ids=range(16),
    ...                          hardware="H100 SXM", ...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from lwjax._compat import Jaxpr, Var
from lwjax.errors import ConfigError, DeviceError, InfeasiblePlanError
from lwjax.hardware import HardwareSpec
from lwjax.passes import padding
from lwjax.passes.codec import build_codecs
from lwjax.passes.cost import (
    TRAIN_ALLREDUCE_FACTOR,
    TRAIN_TIME_FACTOR,
    JaxprCost,
    LayerCost,
    allreduce_time,
    cost_from_jaxpr,
    layer_time,
)
from lwjax.passes.footprint import Footprint, GraphFootprint, value_bytes
from lwjax.passes.padding import StoredArray
from lwjax.passes.partition import min_stages, partition_layers
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.plan import (
    OBJECTIVES,
    LayerNumbers,
    Objective,
    Plan,
    Residency,
    Stage,
    step_time,
)

MIB = 2**20
_TIE = 1e-9  # relative: step times closer than this are equal (summing order), fewer stages win


# ---- per-layer numbers ---------------------------------------------------------------------

def segment_cost(graph: LayerGraph, seg: Segment) -> LayerCost:
    """FLOPs and bytes of one segment, by jax.experimental.roofline's rules.

    Example:
        >>> segment_cost(graph, graph.layers[0]).flops > 0
        True
    """
    jaxpr = graph.jaxpr.jaxpr
    params = [graph.param_vars[i] for i in seg.params]
    sub = Jaxpr(constvars=list(jaxpr.constvars), invars=[*params, *seg.inputs],
                outvars=list(seg.outputs), eqns=list(seg.eqns), debug_info=jaxpr.debug_info)
    return cost_from_jaxpr(sub, weight_invars=range(len(params))).layer_cost()


def eqns_cost(graph: LayerGraph, eqns: Sequence) -> JaxprCost:
    """FLOPs and bytes of some of a graph's equations, by jax.experimental.roofline's rules
    (what they read and do not define themselves counted as inputs).

    Example:
        >>> eqns_cost(graph, graph.layers[0].eqns[:3]).unfused_hbm_bytes > 0
        True
    """
    jaxpr = graph.jaxpr.jaxpr
    defined = {v for e in eqns for v in e.outvars}
    reads = dict.fromkeys(v for e in eqns for v in e.invars
                          if isinstance(v, Var) and v not in defined)
    sub = Jaxpr(constvars=list(jaxpr.constvars), invars=list(reads), outvars=[],
                eqns=list(eqns), debug_info=jaxpr.debug_info)
    return cost_from_jaxpr(sub)


def layer_times(graph: LayerGraph, hw: HardwareSpec, *, weights_on_chip: bool,
                tp: int = 1, seg_costs: dict[str, LayerCost] | None = None,
                train: bool = False, fp: GraphFootprint | None = None) -> tuple[float, ...]:
    """Roofline seconds per layer per microbatch on one device, the prologue folded into the
    first layer. The epilogue is not folded into the last: the pipeline runs it after its
    ticks (``epilogue_time``; ``step_time`` adds it M times). ``train``: forward, recompute
    and backward, ``cost.TRAIN_TIME_FACTOR`` x the forward.

    Split over ``tp`` devices (projected, an assumption of this planner): FLOPs and bytes /
    tp, plus Megatron's all-reduces of the residual -- two per layer (after attention, after
    the MLP), one for the prologue and epilogue (vocabulary-split embedding and head).
    ``seg_costs`` memoises ``segment_cost`` by signature across calls on one graph. ``fp``:
    read each segment's weights as that footprint stores them (a compressed policy's bytes;
    the decode's arithmetic is not priced: bytes moved, not FLOPs).

    Example:
        >>> layer_times(graph, hardware.H100_SXM, weights_on_chip=True, tp=2)[0] > 0
        True
    """
    t = _segment_timer(graph, hw, weights_on_chip=weights_on_chip, tp=tp, seg_costs=seg_costs,
                       train=train, fp=fp)
    times = [t(s) for s in graph.layers]
    times[0] += t(graph.prologue)
    return tuple(times)


def epilogue_time(graph: LayerGraph, hw: HardwareSpec, *, weights_on_chip: bool, tp: int = 1,
                  seg_costs: dict[str, LayerCost] | None = None, train: bool = False,
                  fp: GraphFootprint | None = None) -> float:
    """Roofline seconds of the epilogue (final norm, LM head) per microbatch on the last
    stage, as ``layer_times`` counts a layer.

    Example:
        >>> epilogue_time(graph, hardware.H100_SXM, weights_on_chip=True) > 0
        True
    """
    t = _segment_timer(graph, hw, weights_on_chip=weights_on_chip, tp=tp, seg_costs=seg_costs,
                       train=train, fp=fp)
    return t(graph.epilogue)


def _segment_timer(graph: LayerGraph, hw: HardwareSpec, *, weights_on_chip: bool, tp: int,
                   seg_costs: dict[str, LayerCost] | None, train: bool = False,
                   fp: GraphFootprint | None = None) -> Callable[[Segment], float]:
    dtype = graph.layers[0].outputs[0].aval.dtype if graph.layers[0].outputs else "float32"
    memo: dict[str, float] = {}
    seg_costs = {} if seg_costs is None else seg_costs
    stored = {} if fp is None else {
        seg.name: f.weights_bytes
        for seg, f in zip((graph.prologue, *graph.layers, graph.epilogue),
                          (fp.prologue, *fp.layers, fp.epilogue), strict=True)}

    def t(seg: Segment) -> float:
        if seg.signature not in memo:
            if seg.signature not in seg_costs:
                seg_costs[seg.signature] = segment_cost(graph, seg)
            c = seg_costs[seg.signature]
            if seg.name in stored:  # weights read as stored (compressed)
                c = LayerCost(c.flops, stored[seg.name], c.activation_bytes)
            if tp > 1:
                c = LayerCost(c.flops / tp, c.weight_bytes / tp, c.activation_bytes / tp)
            seconds = layer_time(c, hw, weights_on_chip=weights_on_chip,
                                 dtype=str(dtype)).total_s
            reductions = 2 if seg.kind == "layer" else 1
            if train:  # forward + recompute + backward (see cost.TRAIN_TIME_FACTOR)
                seconds *= TRAIN_TIME_FACTOR
                reductions *= TRAIN_ALLREDUCE_FACTOR
            memo[seg.signature] = seconds + reductions * allreduce_time(
                _residual_bytes(seg), tp, hw)
        return memo[seg.signature]

    return t


def numbers_from(graph: LayerGraph, fp: GraphFootprint, costs_s: Sequence[float],
                 epilogue_s: float = 0.0) -> LayerNumbers:
    """The per-layer numbers a plan is made from (one device per stage).

    Example:
        >>> numbers_from(graph, footprint(graph), layer_times(graph, hw, weights_on_chip=True),
        ...              epilogue_time(graph, hw, weights_on_chip=True))
    """
    return LayerNumbers(names=tuple(s.name for s in graph.layers), footprints=fp.layers,
                        prologue=fp.prologue, epilogue=fp.epilogue, costs_s=tuple(costs_s),
                        epilogue_s=epilogue_s,
                        signatures=tuple(s.signature for s in graph.layers),
                        outer_signatures=graph.outer_signatures,
                        stored=stored_arrays(graph, fp.compression))


def stored_arrays(graph: LayerGraph, compression) -> tuple[tuple[StoredArray, ...], ...]:
    """Per segment (prologue, layers, epilogue), the arrays its weights are stored as under
    ``compression`` (a codec's arrays for a compressed weight), as ``SlotStorage`` stores
    them.

    Example:
        >>> [len(seg) for seg in stored_arrays(graph, fp.compression)]
    """
    codecs = build_codecs(graph, compression)

    def arrays(i: int) -> list:
        return [graph.param_vars[i].aval] if codecs[i] is None else codecs[i].stored_avals()

    return tuple(
        tuple(StoredArray(i, np.dtype(a.dtype).name, int(np.prod(a.shape, dtype=np.int64)))
              for i in seg.params for a in arrays(i))
        for seg in (graph.prologue, *graph.layers, graph.epilogue))


# ---- one partition --------------------------------------------------------------------------

def _peak(f: Footprint) -> int:
    return f.activation_bytes + f.buffer_bytes


def _held(f: Footprint) -> int:
    """Bytes that add up over a stage's layers: weights, KV caches; in training gradients,
    optimizer state and the backward's saved values."""
    return (f.weights_bytes + f.kv_cache_bytes + f.grad_bytes + f.optimizer_bytes
            + f.backward_bytes)


def stage_footprint(numbers: LayerNumbers, start: int, stop: int,
                    num_stages: int | None = None) -> Footprint:
    """What a stage running layers [start, stop) holds per device, in a pipeline of
    ``num_stages`` (training: the stash slots depend on it; None: the most any count needs).

    Example:
        >>> stage_footprint(numbers, 0, 2).weights_bytes   # prologue + layers 0 and 1
    """
    parts = list(numbers.footprints[start:stop])
    if start == 0:
        parts.insert(0, numbers.prologue)
    if stop == len(numbers.names):
        parts.append(numbers.epilogue)
    total = parts[0]
    for f in parts[1:]:
        total = total + f
    t = numbers.training
    if t is not None:  # a stage stashes several microbatches' inputs and one optimizer count
        total = dataclasses.replace(
            total, stash_bytes=t.stash_slots(num_stages) * total.stash_bytes,
            optimizer_bytes=total.optimizer_bytes + t.optimizer_shared_bytes)
    return total


def partition_inputs(numbers: LayerNumbers, capacity_bytes: int, residency: Residency,
                     num_stages: int | None = None) -> tuple[list[int], int, int]:
    """Additive sizes, the capacity left for them, and the transient peak reserved. A
    training plan also reserves the stash of a pipeline of ``num_stages`` (None: the most any
    count needs) and the optimizer state every stage holds once.

    Example:
        >>> sizes, room, reserve = partition_inputs(numbers, 2**20, "all")
    """
    sizes = [_held(f) for f in numbers.footprints]
    sizes[0] += _held(numbers.prologue)
    sizes[-1] += _held(numbers.epilogue)
    segments = (numbers.prologue, *numbers.footprints, numbers.epilogue)
    reserve = 0
    if residency == "all":
        reserve = max(_peak(f) for f in segments)
    t = numbers.training
    if t is not None:
        reserve += t.stash_slots(num_stages) * max(f.stash_bytes for f in segments) \
            + t.optimizer_shared_bytes
    return sizes, capacity_bytes - reserve, reserve


def plan_from_numbers(
    numbers: LayerNumbers,
    *,
    capacity_bytes: int,
    device_ids: Sequence[int],
    hardware: str,
    compression: str,
    microbatches: int,
    microbatch_size: int,
    mode: str,
    residency: Residency = "all",
    attention: str = "as_traced",
    method: str = "optimal",
    strategy: str = "fits",
    notes: Sequence[str] = (),
    tp: int = 1,
    model: str = "",
    objective: Objective = "bottleneck",
    concurrency: int | None = None,
    ranges: Sequence[tuple[int, int]] | None = None,
    virtual: int = 1,
) -> Plan:
    """Partitions the layers over ``device_ids``: stage k runs on ``tp`` consecutive ids
    (``numbers`` are per device at that tp), at most ``len(device_ids) // tp`` stages.
    ``ranges``: take this partition (the layout search's, ``passes/layout.py``) instead of
    choosing one; it must fit the capacity. ``virtual`` > 1 (with ``ranges``): they are
    S x virtual stages under the circular schedule, stage k on the ids of stage k mod S,
    each device holding all its stages (``padding.device_stages``).

    With ``objective="step"`` the stage count S is the one with the shortest projected GPipe
    step (``step_time``): (M + S - 1) ticks of the slowest stage, and -- when the stages share
    one host's cores (``concurrency``: a CPU's simulated devices) -- no less than the work
    itself, M x all stages' time. Each candidate S is partitioned exactly; ties go to fewer
    stages. Per-tick dispatch and rendezvous costs are not modelled.

    Raises:
        DeviceError: no devices, or duplicate ids.
        InfeasiblePlanError: no partition fits (the message says what would).

    Example:
        >>> plan_from_numbers(numbers, capacity_bytes=2**20, device_ids=range(4),
        ...                   hardware="cpu", compression="none", microbatches=1,
        ...                   microbatch_size=4, mode="prefill").num_devices
        4
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    device_ids = tuple(device_ids)
    if not device_ids:
        raise DeviceError("No devices to plan for: pass devices=[...] or num_devices >= 1.")
    if len(set(device_ids)) != len(device_ids):
        dup = sorted({d for d in device_ids if device_ids.count(d) > 1})
        raise DeviceError(f"Duplicate devices {dup} in the device list; list each device once.")
    groups = [device_ids[k * tp:(k + 1) * tp] for k in range(len(device_ids) // tp)]
    if not groups:
        raise infeasible(
            f"A stage split over tp={tp} devices needs {tp} devices; only {len(device_ids)} "
            f"are available. Add devices or plan with a smaller tp.",
            capacity=capacity_bytes, min_devices=tp, tp=tp)
    if virtual != 1 and (ranges is None or tp != 1):
        raise ConfigError(f"virtual={virtual} stages per device takes given ranges (the layout "
                          f"search's) and tp=1, got ranges={ranges}, tp={tp}.")
    if ranges is not None:
        ranges = _given(numbers, capacity_bytes, residency, tuple(map(tuple, ranges)),
                        len(groups), virtual)
    else:
        ranges = _plan_ranges(numbers, capacity_bytes, residency, len(groups), method,
                              microbatch_size, len(device_ids), tp, objective, microbatches,
                              concurrency)
        notes = (*notes, *ranges[1])
        ranges = ranges[0]
    ring = len(ranges) // virtual
    stages = tuple(
        Stage(index=k, layers=numbers.names[a:b], layer_range=(a, b), devices=groups[k % ring],
              footprint=stage_footprint(numbers, a, b, len(ranges)),
              est_time_s=sum(numbers.costs_s[a:b]))
        for k, (a, b) in enumerate(ranges)
    )
    return Plan(stages=stages, capacity_bytes=capacity_bytes, hardware=hardware,
                compression=compression, microbatches=microbatches,
                microbatch_size=microbatch_size, mode=mode, residency=residency,
                attention=attention, strategy=strategy, notes=tuple(notes), numbers=numbers,
                device_pool=device_ids, tp=tp, model=model, objective=objective,
                concurrency=concurrency, method=method, virtual=virtual)


def _given(numbers: LayerNumbers, capacity_bytes: int, residency: Residency,
           ranges: tuple[tuple[int, int], ...], most: int, virtual: int = 1
           ) -> tuple[tuple[int, int], ...]:
    """``ranges`` checked: contiguous, covering every layer, at most ``most`` stages (x
    ``virtual``, a multiple of it), each device within the capacity."""
    n = len(numbers.names)
    stops = [0, *(b for _, b in ranges)]
    if (not ranges or stops[-1] != n or len(ranges) > most * virtual
            or len(ranges) % virtual
            or any((a, b) != (lo, hi) or a >= b
                   for (a, b), lo, hi in zip(ranges, stops[:-1], stops[1:], strict=True))):
        laps = (f" x {virtual} (virtual stages per device; their count a multiple of "
                f"{virtual})" if virtual > 1 else "")
        raise ConfigError(f"ranges={ranges} must be at most {most}{laps} contiguous, "
                          f"non-empty (start, stop) stages covering layers 0..{n}.")
    sizes, room, reserve = partition_inputs(numbers, capacity_bytes, residency, len(ranges))
    pads = padding.padding(numbers, ranges, virtual)
    for stages in padding.device_stages(len(ranges), virtual):
        k = stages[0]
        (a, b), pad = ranges[k], pads[k]
        held = sum(sum(sizes[slice(*ranges[j])]) for j in stages)
        if held + pad > room:
            padded = (f", {fmt_bytes(pad)} of it padding of the weight"
                      + (" and KV-cache" if numbers.cached else "") + " slots (every device "
                      "stores the sum of the slots, at least the largest stage's own)"
                      if pad else "")
            which = f"Stage {k} (layers {a}..{b - 1})" if len(stages) == 1 else \
                f"The device running stages {stages} (circular)"
            raise infeasible(
                f"{which} needs "
                f"{fmt_bytes(held + pad + reserve)} per device{padded}, more than "
                f"the capacity {fmt_bytes(capacity_bytes)}; give a partition that fits or let "
                "the planner choose.", capacity=capacity_bytes)
    return ranges


def _plan_ranges(numbers, capacity_bytes, residency, most, method, microbatch_size,
                 num_devices, tp, objective, microbatches, concurrency):
    """The partition (and its notes) by the objective: the least slowest stage over at most
    ``most`` stages, then for "step" the stage count with the shortest projected step."""
    notes = ()
    ranges, sizes, room = _fit(numbers, capacity_bytes, residency, most, method,
                               microbatch_size, num_devices, tp)
    if objective == "step":
        shortest = _shortest_step(sizes, numbers, room, len(ranges), microbatches, method,
                                  concurrency, tp) or ranges
        if len(shortest) < len(ranges):
            new, old = (step_time(r, numbers.costs_s, microbatches, concurrency,
                                  numbers.epilogue_s, tp)
                        for r in (shortest, ranges))
            notes = (_fewer_stages_note(len(shortest), len(ranges), new, old, concurrency),)
            ranges = shortest
    return ranges, notes


def _fit(numbers: LayerNumbers, capacity_bytes: int, residency: Residency, most: int,
         method: str, microbatch_size: int, num_devices: int,
         tp: int) -> tuple[tuple[tuple[int, int], ...], list[int], int]:
    """The partition into at most ``most`` stages, with the additive sizes and the room it
    was made for. A training plan's reserve can shrink with fewer stages (1F1B stashes
    min(S, M) inputs), so when ``most`` stages do not fit, fewer are tried, each count whose
    reserve is smaller; the error is the one for ``most``.
    """
    first, last_reserve = None, None
    for k in range(most, 0, -1) if numbers.training else (most,):
        sizes, room, reserve = partition_inputs(numbers, capacity_bytes, residency, k)
        if reserve == last_reserve:
            continue  # at most k + 1 stages with the same reserve already covered k
        last_reserve = reserve
        if room <= 0:
            first = first or _activations_exceed(capacity_bytes, reserve, microbatch_size, tp,
                                                 training=numbers.training is not None)
            continue
        try:
            ranges = padding.fit(
                lambda r, k=k, sizes=sizes: partition_layers(
                    sizes, numbers.costs_s, r, k, method=method, names=list(numbers.names)),
                numbers, sizes, room)
            return ranges, sizes, room
        except InfeasiblePlanError as e:
            first = first or _with_reserve(e, reserve, num_devices, tp,
                                           training=numbers.training is not None)
    raise first


def _shortest_step(sizes, numbers: LayerNumbers, room: int, most: int, microbatches: int,
                   method: str, concurrency: int | None,
                   tp: int = 1) -> tuple[tuple[int, int], ...]:
    """The partition with the shortest step over stage counts min_stages..``most``."""
    fewest = min_stages(sizes, room)
    counts = range(fewest, most + 1)
    if len(numbers.names) * len(counts) > 200_000:  # keep planning fast for huge models
        counts = sorted({fewest, most, *(2**i for i in range(most.bit_length())
                                          if fewest <= 2**i <= most)})
    best = None
    for k in counts:  # ascending
        try:
            ranges = padding.fit(
                lambda r, k=k: partition_layers(sizes, numbers.costs_s, r, k, method=method),
                numbers, sizes, room)
        except InfeasiblePlanError:  # k stages fit without the slots' padding, not with it
            continue
        step = step_time(ranges, numbers.costs_s, microbatches, concurrency, numbers.epilogue_s,
                         tp)
        # ties -- equal up to the rounding of summing the same costs in other groups -- go
        # to fewer stages
        if best is None or step < best[0] * (1 - _TIE):
            best = (step, ranges)
    return None if best is None else best[1]


def _fewer_stages_note(fewer: int, most: int, new_s: float, old_s: float,
                       concurrency: int | None) -> str:
    """Why the step objective took ``fewer`` stages than the ``most`` the partition allows:
    a shorter projected step (by how much, with enough digits to tell the two apart), or a
    tie, which goes to fewer stages.

    Example:
        >>> _fewer_stages_note(1, 4, 0.000882, 0.000882, 2)[:60]
        '1 stage instead of 4: the projected GPipe step is the same ('
    """
    head = f"{counted(fewer, 'stage')} instead of {most}: the projected GPipe step is"
    if old_s - new_s <= _TIE * old_s:
        why = ("; the stages share one host's cores, so every stage count does the same work, "
               "M x all stages' time" if concurrency else "")
        return f"{head} the same ({new_s * 1e3:.3f} ms for both{why}); ties go to fewer stages"
    new, old = _distinct_ms(new_s, old_s)
    shared = "; the stages share one host's cores" if concurrency else ""
    return f"{head} {_percent(1 - new_s / old_s)} shorter ({new} vs {old} ms{shared})"


def _distinct_ms(a_s: float, b_s: float) -> tuple[str, str]:
    """Two times in ms with 3 decimals, or as many more (up to 12) as tell them apart."""
    for digits in range(3, 13):
        a, b = f"{a_s * 1e3:.{digits}f}", f"{b_s * 1e3:.{digits}f}"
        if a != b:
            break
    return a, b


def _percent(fraction: float) -> str:
    """0.123 -> '12.3%'; 0.0000123 -> '0.0012%' (two significant digits below 0.1%)."""
    return f"{100 * fraction:.1f}%" if fraction >= 0.001 else f"{100 * fraction:.2g}%"


def _activations_exceed(capacity: int, reserve: int, microbatch_size: int,
                        tp: int = 1, training: bool = False) -> InfeasiblePlanError:
    split = f" split over tp={tp} devices" if tp > 1 else ""
    if training:
        return infeasible(
            f"A training stage{split} reserves {fmt_bytes(reserve)} per device at microbatch "
            f"{microbatch_size} (the largest forward activation peak of one layer, the "
            "stashed stage inputs of the microbatches in flight, the optimizer's shared "
            f"state), at or above the capacity {fmt_bytes(capacity)} before any weight is "
            "placed. Shrink the microbatch, use schedule='1f1b' (fewer microbatches stashed), "
            "or raise cache_bytes.", capacity=capacity, reserve_bytes=reserve, tp=tp)
    return infeasible(
        f"The largest activation + buffer peak of one layer{split} is {fmt_bytes(reserve)} per "
        f"device at microbatch {microbatch_size}, at or above the capacity {fmt_bytes(capacity)} "
        "before any weight is placed. Shrink the microbatch, raise cache_bytes, or plan with "
        "residency='weights' (activations streamed through HBM).",
        capacity=capacity, reserve_bytes=reserve, tp=tp)


def _with_reserve(e: InfeasiblePlanError, reserve: int, devices: int,
                  tp: int = 1, training: bool = False) -> InfeasiblePlanError:
    """Restates the partitioner's error in whole-device bytes (weights + the reserved peak)."""
    capacity = e.capacity + reserve
    if getattr(e, "padded", False):  # only the slots' padding overflows: said in full
        out = infeasible(f"{e} (Capacity {fmt_bytes(capacity)}: {e.capacity:,} bytes for "
                         f"what the stages hold + {reserve:,} reserved for the activation "
                         "peak.)", **vars(e))
        out.capacity, out.reserve_bytes, out.tp = capacity, reserve, tp
        return out
    per = f" per device (split over tp={tp})" if tp > 1 else ""
    if e.layer_index is not None:
        need = e.layer_bytes + reserve
        held, peak, options = ("weights/KV", "activation/buffer peak", "compress its weights, "
                               "shrink the microbatch, or plan with residency='weights'")
        if training:
            held, peak, options = (
                "weights, gradients, optimizer state and backward activations", "forward "
                "activation peak, stashed stage inputs and shared optimizer state", "shrink the "
                "microbatch, or use schedule='1f1b' (fewer microbatches stashed)")
        msg = (f"Layer {e.layer_name!r} (index {e.layer_index}) needs {fmt_bytes(need)}{per}: "
               f"{e.layer_bytes:,} of {held} + {reserve:,} of {peak}, "
               f"more than the capacity {fmt_bytes(capacity)}. No number of stages can hold it: "
               f"split the layer over devices, {options}.")
        min_cap, min_dev = need, None
    else:
        min_cap, min_dev = e.min_capacity + reserve, e.min_stages * tp
        groups = f" ({devices // tp} stages of tp={tp})" if tp > 1 else ""
        msg = (f"The layers need at least {e.min_stages} stages of {fmt_bytes(capacity)}{per} but "
               f"only {counted(devices, 'device')}{groups} were given. Use at least {min_dev} "
               "devices, "
               f"or a capacity of at least {fmt_bytes(min_cap)} for {devices}; "
               + ("a smaller microbatch or schedule='1f1b' also lowers the need." if training
                  else "compression or a smaller microbatch also lowers the need."))
    fields = {k: v for k, v in vars(e).items()}
    fields.update(capacity=capacity, min_capacity=min_cap, reserve_bytes=reserve,
                  min_devices=min_dev, tp=tp)
    return infeasible(msg, **fields)


# ---- replanning -----------------------------------------------------------------------------

def replan(plan: Plan, exclude_devices=(), spare_devices=()) -> Plan:
    """Re-partitions a plan's layers over its device pool minus ``exclude_devices`` plus
    ``spare_devices``, from the per-layer numbers it carries (no retrace). A split plan keeps
    its tp: stages of ``plan.tp`` consecutive devices of the new pool.

    Raises:
        DeviceError: an excluded device is not in the pool.
        InfeasiblePlanError: the remaining devices cannot hold the model (the message says
            how many would; also ``min_devices``).

    Example:
        >>> new = replan(plan, exclude_devices=[3])
        >>> 3 in {d for s in new.stages for d in s.devices}
        False
    """
    excluded = _device_ids(exclude_devices, "exclude_devices")
    spares = _device_ids(spare_devices, "spare_devices")
    unknown = [d for d in excluded if d not in plan.device_pool]
    if unknown:
        raise DeviceError(f"Cannot exclude devices {unknown}: not in the plan's pool "
                          f"{list(plan.device_pool)}; exclude ids from the pool.")
    both = [d for d in spares if d in excluded]
    if both:
        raise DeviceError(f"Devices {both} are both excluded and spare; list each in one of "
                          "exclude_devices= and spare_devices=.")
    pooled = [d for d in spares if d in plan.device_pool]
    if pooled:
        raise DeviceError(f"Spare devices {pooled} are already in the plan's pool "
                          f"{list(plan.device_pool)}; spares must be new device ids.")
    pool = [d for d in plan.device_pool if d not in excluded] + spares
    notes = (*(n if n.startswith("before replanning: ") else f"before replanning: {n}"
               for n in plan.notes),
             f"replanned without devices {excluded}" + (f", with spares {spares}" if spares
                                                        else "")
             + ("; one stage per device (GPipe): the circular layout was the layout "
                "search's, which replanning does not run" if plan.virtual > 1 else ""))
    try:
        return plan_from_numbers(
            plan.numbers, capacity_bytes=plan.capacity_bytes, device_ids=pool,
            hardware=plan.hardware, compression=plan.compression,
            microbatches=plan.microbatches, microbatch_size=plan.microbatch_size,
            mode=plan.mode, residency=plan.residency, attention=plan.attention,
            method=plan.method, strategy=plan.strategy, notes=notes, tp=plan.tp,
            model=plan.model, objective=plan.objective, concurrency=plan.concurrency)
    except (InfeasiblePlanError, DeviceError) as e:
        if isinstance(e, DeviceError) and pool:
            raise
        fields = dict(vars(e))
        sizes, room, _ = partition_inputs(plan.numbers, plan.capacity_bytes, plan.residency)
        fewest = min_stages(sizes, room) * plan.tp if room > 0 and max(sizes) <= room else None
        fields["min_devices"] = fewest
        need = f"; the plan needs at least {fewest} devices" if fewest else ""
        split = f" ({len(pool) // plan.tp} stages of tp={plan.tp})" if plan.tp > 1 else ""
        raise infeasible(
            f"Without devices {excluded} the remaining {len(pool)} devices{split} "
            f"cannot hold the model{need}: add spare_devices=[...] or re-plan with "
            f"lwjax.plan (compression, a smaller microbatch). {e}", **fields) from None


# ---- helpers --------------------------------------------------------------------------------

def device_id(device, what: str) -> int:
    """The id of a jax device or of a non-negative integer id (numpy integers too).

    Raises:
        DeviceError: anything else, named with ``what`` (the argument it came from).

    Example:
        >>> device_id(jax.devices()[3], "devices="), device_id(np.int64(2), "devices=")
        (3, 2)
    """
    d = getattr(device, "id", device)
    if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 0:
        raise DeviceError(f"{what} holds {d!r}, which is not a device: neither a jax device "
                          "nor an integer id >= 0; pass jax.devices()[:k] or a list of ids.")
    return int(d)


def _device_ids(devices, what: str) -> list[int]:
    """Device ids, in order, without repeats, from ids or jax devices (one or an iterable)."""
    if isinstance(devices, int | np.integer) or hasattr(devices, "id"):
        devices = [devices]
    try:
        items = list(devices)
    except TypeError:
        raise DeviceError(f"{what} must be a list of device ids or jax devices, got "
                          f"{devices!r}.") from None
    return list(dict.fromkeys(device_id(d, what) for d in items))


def infeasible(message: str, **fields) -> InfeasiblePlanError:
    err = InfeasiblePlanError(message)
    for k, v in fields.items():
        setattr(err, k, v)
    return err






def _residual_bytes(seg: Segment) -> int:
    """Bytes of the largest floating-point value crossing the segment's boundary."""
    values = [v for v in (*seg.inputs, *seg.outputs)
              if np.issubdtype(getattr(v.aval, "dtype", np.int32), np.floating)]
    return max((value_bytes(v) for v in values), default=0)




def fmt_bytes(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / MIB:.2f} MiB)"


def counted(n: int, noun: str) -> str:
    """(1, 'stage') -> '1 stage'; (4, 'stage') -> '4 stages'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

