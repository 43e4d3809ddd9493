"""Pass 5: footprints + costs + a target -> Plan (contiguous stages, each fitting the cache).

What a stage occupies: layers run one after another, so a stage holds the *sum* of its
layers' weights and KV caches but only the *largest* activation + buffer peak among them
(``Footprint.__add__``). The partitioner works on additive sizes, so layer i's size is its
weights + KV (the prologue's added to layer 0, the epilogue's to the last layer) and the
capacity is reduced by the model-wide largest activation + buffer peak: exact when the
layers are identical (lwjax's models), conservative otherwise. With residency "weights"
only weights + KV must fit (activations stream through HBM).

Per-layer time: a roofline (``passes/cost``) of the layer's traced equations on the
HardwareSpec, weights read from L2 when its stage fits on chip; prologue and epilogue time
fold into the first and last layer. The partition minimises the slowest stage exactly.

Example:
    >>> plan = plan_from_numbers(numbers, capacity_bytes=50 * 2**20, device_ids=range(16),
    ...                          hardware="H100 SXM", ...)
"""

from __future__ import annotations

from collections.abc import Sequence

from lwjax._compat import Jaxpr
from lwjax.errors import DeviceError, InfeasiblePlanError
from lwjax.hardware import HardwareSpec
from lwjax.passes.cost import LayerCost, cost_from_jaxpr, layer_time
from lwjax.passes.footprint import Footprint, GraphFootprint
from lwjax.passes.partition import partition_layers
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.plan import LayerNumbers, Plan, Residency, Stage


def segment_cost(graph: LayerGraph, seg: Segment) -> LayerCost:
    """FLOPs and bytes of one segment, by jax.experimental.roofline's rules."""
    jaxpr = graph.jaxpr.jaxpr
    params = [graph.param_vars[i] for i in seg.params]
    sub = Jaxpr(constvars=list(jaxpr.constvars), invars=[*params, *seg.inputs],
                outvars=list(seg.outputs), eqns=list(seg.eqns), debug_info=jaxpr.debug_info)
    return cost_from_jaxpr(sub, weight_invars=range(len(params))).layer_cost()


def layer_times(graph: LayerGraph, hw: HardwareSpec, *, weights_on_chip: bool) -> tuple[float, ...]:
    """Roofline seconds per layer (prologue / epilogue folded into first / last layer)."""
    dtype = graph.layers[0].outputs[0].aval.dtype if graph.layers[0].outputs else "float32"
    memo: dict[str, float] = {}

    def t(seg: Segment) -> float:
        if seg.signature not in memo:
            memo[seg.signature] = layer_time(segment_cost(graph, seg), hw,
                                             weights_on_chip=weights_on_chip,
                                             dtype=str(dtype)).total_s
        return memo[seg.signature]

    times = [t(s) for s in graph.layers]
    times[0] += t(graph.prologue)
    times[-1] += t(graph.epilogue)
    return tuple(times)


def numbers_from(graph: LayerGraph, fp: GraphFootprint, costs_s: Sequence[float]) -> LayerNumbers:
    return LayerNumbers(names=tuple(s.name for s in graph.layers), footprints=fp.layers,
                        prologue=fp.prologue, epilogue=fp.epilogue, costs_s=tuple(costs_s))


def _peak(f: Footprint) -> int:
    return f.activation_bytes + f.buffer_bytes


def stage_footprint(numbers: LayerNumbers, start: int, stop: int) -> Footprint:
    """What a stage running layers [start, stop) holds per device."""
    parts = list(numbers.footprints[start:stop])
    if start == 0:
        parts.insert(0, numbers.prologue)
    if stop == len(numbers.names):
        parts.append(numbers.epilogue)
    total = parts[0]
    for f in parts[1:]:
        total = total + f
    return total


def partition_inputs(numbers: LayerNumbers, capacity_bytes: int,
                     residency: Residency) -> tuple[list[int], int, int]:
    """Additive sizes, the capacity left for them, and the transient peak reserved."""
    sizes = [f.weights_bytes + f.kv_cache_bytes for f in numbers.footprints]
    sizes[0] += numbers.prologue.weights_bytes + numbers.prologue.kv_cache_bytes
    sizes[-1] += numbers.epilogue.weights_bytes + numbers.epilogue.kv_cache_bytes
    reserve = 0
    if residency == "all":
        reserve = max(_peak(f) for f in (numbers.prologue, *numbers.footprints,
                                          numbers.epilogue))
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
) -> Plan:
    """Partitions the layers over ``device_ids`` (one device per stage).

    Raises:
        DeviceError: no devices, or duplicate ids.
        InfeasiblePlanError: no partition fits (the message says what would).
    """
    device_ids = tuple(device_ids)
    if not device_ids:
        raise DeviceError("No devices to plan for: pass devices=[...] or num_devices >= 1.")
    if len(set(device_ids)) != len(device_ids):
        dup = sorted({d for d in device_ids if device_ids.count(d) > 1})
        raise DeviceError(f"Duplicate devices {dup} in the device list; list each device once.")
    sizes, room, reserve = partition_inputs(numbers, capacity_bytes, residency)
    if room <= 0:
        raise _activations_exceed(capacity_bytes, reserve, microbatch_size)
    try:
        ranges = partition_layers(sizes, numbers.costs_s, room, len(device_ids), method=method,
                                  names=list(numbers.names))
    except InfeasiblePlanError as e:
        raise _with_reserve(e, reserve, len(device_ids)) from None
    stages = tuple(
        Stage(index=k, layers=numbers.names[a:b], layer_range=(a, b), devices=(device_ids[k],),
              footprint=stage_footprint(numbers, a, b), est_time_s=sum(numbers.costs_s[a:b]))
        for k, (a, b) in enumerate(ranges)
    )
    return Plan(stages=stages, capacity_bytes=capacity_bytes, hardware=hardware,
                compression=compression, microbatches=microbatches,
                microbatch_size=microbatch_size, mode=mode, residency=residency,
                attention=attention, strategy=strategy, notes=tuple(notes), numbers=numbers,
                device_pool=device_ids)


def _activations_exceed(capacity: int, reserve: int, microbatch_size: int) -> InfeasiblePlanError:
    err = InfeasiblePlanError(
        f"The largest activation + buffer peak of one layer is {reserve:,} bytes "
        f"({reserve / 2**20:.2f} MiB) at microbatch {microbatch_size}, at or above the capacity "
        f"{capacity:,} bytes ({capacity / 2**20:.2f} MiB) before any weight is placed. Shrink "
        "the microbatch, raise cache_bytes, or plan with residency='weights' (activations "
        "streamed through HBM)."
    )
    err.min_capacity = None
    err.reserve_bytes = reserve
    return err


def _with_reserve(e: InfeasiblePlanError, reserve: int, devices: int) -> InfeasiblePlanError:
    """Restates the partitioner's error in whole-device bytes (weights + the reserved peak)."""
    mib = 2**20
    capacity = e.capacity + reserve
    if e.layer_index is not None:
        need = e.layer_bytes + reserve
        msg = (f"Layer {e.layer_name!r} (index {e.layer_index}) needs {need:,} bytes "
               f"({need / mib:.2f} MiB: {e.layer_bytes:,} of weights/KV + {reserve:,} of "
               f"activation/buffer peak), more than the capacity {capacity:,} bytes "
               f"({capacity / mib:.2f} MiB). No number of stages can hold it: split the layer "
               "over devices, compress its weights, shrink the microbatch, or plan with "
               "residency='weights'.")
        min_capacity = need
    else:
        min_capacity = e.min_capacity + reserve
        msg = (f"The layers need at least {e.min_stages} stages of {capacity:,} bytes "
               f"({capacity / mib:.2f} MiB) but only {devices} devices were given. Use at "
               f"least {e.min_stages} devices, or a capacity of at least {min_capacity:,} bytes "
               f"({min_capacity / mib:.2f} MiB) for {devices}; compression or a smaller "
               "microbatch also lowers the need.")
    err = InfeasiblePlanError(msg)
    for k, v in vars(e).items():
        setattr(err, k, v)
    err.capacity, err.min_capacity, err.reserve_bytes = capacity, min_capacity, reserve
    return err


def replan(plan: Plan, exclude_devices=(), spare_devices=()) -> Plan:
    """Re-partitions a plan's layers over its device pool minus ``exclude_devices`` plus
    ``spare_devices``, from the per-layer numbers it carries.

    Example:
        >>> new = replan(plan, exclude_devices=[3])
        >>> 3 in {d for s in new.stages for d in s.devices}
        False
    """
    excluded = set(exclude_devices)
    unknown = excluded - set(plan.device_pool)
    if unknown:
        raise DeviceError(f"Cannot exclude devices {sorted(unknown)}: not in the plan's pool "
                          f"{list(plan.device_pool)}.")
    pool = [d for d in plan.device_pool if d not in excluded]
    pool += [d for d in spare_devices if d not in pool and d not in excluded]
    notes = (*plan.notes, f"replanned without devices {sorted(excluded)}"
             + (f", with spares {list(spare_devices)}" if spare_devices else ""))
    try:
        return plan_from_numbers(
            plan.numbers, capacity_bytes=plan.capacity_bytes, device_ids=pool,
            hardware=plan.hardware, compression=plan.compression,
            microbatches=plan.microbatches, microbatch_size=plan.microbatch_size,
            mode=plan.mode, residency=plan.residency, attention=plan.attention,
            strategy=plan.strategy, notes=notes)
    except InfeasiblePlanError as e:
        raise InfeasiblePlanError(
            f"Without devices {sorted(excluded)} the remaining {len(pool)} devices cannot hold "
            f"the model: {e}") from None
