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

Edge cases (seed document 003). When the plan as given does not fit -- a layer alone exceeds
the capacity, or the layers need more stages than there are devices -- ``search_plan`` tries
the strategies ``Target.allow`` names, in the order it names them (``lwjax.plan``'s default
is ``("split", "compress", "microbatch")``; ``layerwise_shard`` allows none):

- ``split``: every stage spans ``tp`` devices, tp = 2, 4, 8, ... (the same tp for every
  stage, S stages x tp <= devices, and only a tp at which some weight splits). A device
  holds (``split_footprint``): the weights ``passes/tp.py`` splits / tp + the replicated
  ones, KV cache / tp, buffers / tp, and activations max(peak / tp, largest input) -- the
  [B, T, D] residual stays whole on every device.
- ``compress``: the presets of ``compression.ESCALATION`` after the user's policy.
- ``microbatch``: smaller microbatches (divisors of the batch, i.e. more microbatches); the
  model is retraced at each size.

Search order, least intrusive first. A candidate is one level per strategy; candidates are
tried in lexicographic order with the *last* allowed strategy the most significant, so a
later strategy is escalated one step only when no level of the earlier ones fits. With the
default order: tp = 2, 4, ..., N at the user's compression and microbatch; then int8 with
tp = 1, 2, 4, ...; ...; then the next smaller microbatch with every compression and tp again.
The first candidate that fits is the plan (combinations arise when no single strategy is
enough); ``Plan.strategy`` names the strategies it changed and ``Plan.notes`` say why. A
candidate whose weights alone overflow is skipped without retracing (weights do not depend
on the microbatch). When no candidate fits, ``InfeasiblePlanError`` says what would: the
fewest devices, the least capacity, and (when compression was not allowed) the compression
needed; with no strategy allowed it is the partitioner's own error.

Example:
    >>> plan = plan_from_numbers(numbers, capacity_bytes=50 * 2**20, device_ids=range(16),
    ...                          hardware="H100 SXM", ...)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from lwjax._compat import Jaxpr
from lwjax.errors import ConfigError, DeviceError, InfeasiblePlanError
from lwjax.hardware import HardwareSpec
from lwjax.passes import compression as compression_lib
from lwjax.passes.compression import ESCALATION, Compression
from lwjax.passes.cost import LayerCost, allreduce_time, cost_from_jaxpr, layer_time
from lwjax.passes.footprint import Footprint, GraphFootprint, footprint, output_channels
from lwjax.passes.partition import min_capacity, min_stages, partition_layers
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.passes.tp import residual_width, split_axis
from lwjax.plan import LayerNumbers, Plan, Residency, Stage

MIB = 2**20
STRATEGIES: tuple[str, ...] = ("split", "compress", "microbatch")
MAX_TP = 2**14  # the largest split ``requirement`` considers when counting devices
ESCALATION_POLICIES: tuple[Compression, ...] = tuple(compression_lib.get(n) for n in ESCALATION)


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


def layer_times(graph: LayerGraph, hw: HardwareSpec, *, weights_on_chip: bool,
                tp: int = 1, seg_costs: dict[str, LayerCost] | None = None) -> tuple[float, ...]:
    """Roofline seconds per layer on one device (prologue / epilogue folded into the first /
    last layer).

    Split over ``tp`` devices (projected, an assumption of this planner): FLOPs and bytes /
    tp, plus Megatron's all-reduces of the residual -- two per layer (after attention, after
    the MLP), one for the prologue and epilogue (vocabulary-split embedding and head).
    ``seg_costs`` memoises ``segment_cost`` by signature across calls on one graph.

    Example:
        >>> layer_times(graph, hardware.H100_SXM, weights_on_chip=True, tp=2)[0] > 0
        True
    """
    dtype = graph.layers[0].outputs[0].aval.dtype if graph.layers[0].outputs else "float32"
    memo: dict[str, float] = {}
    seg_costs = {} if seg_costs is None else seg_costs

    def t(seg: Segment) -> float:
        if seg.signature not in memo:
            if seg.signature not in seg_costs:
                seg_costs[seg.signature] = segment_cost(graph, seg)
            c = seg_costs[seg.signature]
            if tp > 1:
                c = LayerCost(c.flops / tp, c.weight_bytes / tp, c.activation_bytes / tp)
            seconds = layer_time(c, hw, weights_on_chip=weights_on_chip,
                                 dtype=str(dtype)).total_s
            reductions = 2 if seg.kind == "layer" else 1
            memo[seg.signature] = seconds + reductions * allreduce_time(
                _residual_bytes(seg), tp, hw)
        return memo[seg.signature]

    times = [t(s) for s in graph.layers]
    times[0] += t(graph.prologue)
    times[-1] += t(graph.epilogue)
    return tuple(times)


def numbers_from(graph: LayerGraph, fp: GraphFootprint, costs_s: Sequence[float]) -> LayerNumbers:
    """The per-layer numbers a plan is made from (one device per stage).

    Example:
        >>> numbers_from(graph, footprint(graph), layer_times(graph, hw, weights_on_chip=True))
    """
    return LayerNumbers(names=tuple(s.name for s in graph.layers), footprints=fp.layers,
                        prologue=fp.prologue, epilogue=fp.epilogue, costs_s=tuple(costs_s))


# ---- splitting a layer over tp devices ------------------------------------------------------

def split_footprint(f: Footprint, *, split_weights_bytes: int, largest_input_bytes: int,
                    tp: int) -> Footprint:
    """Bytes one device holds when a segment runs split over ``tp`` devices.

    - weights: ``ceil(split_weights_bytes / tp)`` + the rest of ``f.weights_bytes``
      (replicated: norm scales, quantisation scales, weights no dimension of which divides);
    - KV cache and buffers: ``ceil(bytes / tp)`` (split by heads, like the work);
    - activations: ``max(ceil(f.activation_bytes / tp), largest_input_bytes)``: the inner
      activations split, but the segment's [B, T, D] input stays whole on every device.

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
    return dataclasses.replace(
        f,
        weights_bytes=_ceil_div(split_weights_bytes, tp) + f.weights_bytes - split_weights_bytes,
        activation_bytes=max(_ceil_div(f.activation_bytes, tp), largest_input_bytes),
        buffer_bytes=_ceil_div(f.buffer_bytes, tp),
        kv_cache_bytes=_ceil_div(f.kv_cache_bytes, tp),
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
    hidden = residual_width(graph, seg)
    total = 0
    for i in seg.params:
        p = graph.params[i]
        if split_axis(p.shape, hidden, tp) is None:
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
    return max((_nbytes(v) for v in seg.inputs if v not in cache), default=0)


def split_numbers(graph: LayerGraph, fp: GraphFootprint, costs_s: Sequence[float],
                  tp: int) -> LayerNumbers:
    """Per-device LayerNumbers of ``graph`` with every segment split over ``tp`` devices.

    Example:
        >>> split_numbers(graph, footprint(graph), layer_times(graph, hw, ...), tp=2)
    """
    if tp == 1:
        return numbers_from(graph, fp, costs_s)
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
        costs_s=tuple(costs_s))


def split_levels(graph: LayerGraph, limit: int) -> tuple[int, ...]:
    """tp = 1 and the powers of two <= ``limit`` at which some weight of ``graph`` splits.

    Example:
        >>> split_levels(graph, 16)
        (1, 2, 4, 8, 16)
    """
    levels = [1]
    tp = 2
    while tp <= limit:
        if any(split_axis(graph.params[i].shape, residual_width(graph, s), tp) is not None
               for s in graph.segments for i in s.params):
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
        hidden = max(floats, key=_nbytes).aval.shape[-1]
        for i in seg.params:
            shape = graph.params[i].shape
            if len(shape) == 3 and shape[0] == hidden:
                m = math.gcd(tp, shape[1])
                return shape[1], m, tp // m
    return None


# ---- one partition --------------------------------------------------------------------------

def _peak(f: Footprint) -> int:
    return f.activation_bytes + f.buffer_bytes


def stage_footprint(numbers: LayerNumbers, start: int, stop: int) -> Footprint:
    """What a stage running layers [start, stop) holds per device.

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
    return total


def partition_inputs(numbers: LayerNumbers, capacity_bytes: int,
                     residency: Residency) -> tuple[list[int], int, int]:
    """Additive sizes, the capacity left for them, and the transient peak reserved.

    Example:
        >>> sizes, room, reserve = partition_inputs(numbers, 2**20, "all")
    """
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
    tp: int = 1,
    model: str = "",
) -> Plan:
    """Partitions the layers over ``device_ids``: stage k runs on ``tp`` consecutive ids
    (``numbers`` are per device at that tp), at most ``len(device_ids) // tp`` stages.

    Raises:
        DeviceError: no devices, or duplicate ids.
        InfeasiblePlanError: no partition fits (the message says what would).

    Example:
        >>> plan_from_numbers(numbers, capacity_bytes=2**20, device_ids=range(4),
        ...                   hardware="cpu", compression="none", microbatches=1,
        ...                   microbatch_size=4, mode="prefill").num_devices
        4
    """
    device_ids = tuple(device_ids)
    if not device_ids:
        raise DeviceError("No devices to plan for: pass devices=[...] or num_devices >= 1.")
    if len(set(device_ids)) != len(device_ids):
        dup = sorted({d for d in device_ids if device_ids.count(d) > 1})
        raise DeviceError(f"Duplicate devices {dup} in the device list; list each device once.")
    groups = [device_ids[k * tp:(k + 1) * tp] for k in range(len(device_ids) // tp)]
    sizes, room, reserve = partition_inputs(numbers, capacity_bytes, residency)
    if not groups:
        raise _infeasible(
            f"A stage split over tp={tp} devices needs {tp} devices; only {len(device_ids)} "
            f"are available. Add devices or plan with a smaller tp.",
            capacity=capacity_bytes, min_devices=tp, tp=tp)
    if room <= 0:
        raise _activations_exceed(capacity_bytes, reserve, microbatch_size, tp)
    try:
        ranges = partition_layers(sizes, numbers.costs_s, room, len(groups), method=method,
                                  names=list(numbers.names))
    except InfeasiblePlanError as e:
        raise _with_reserve(e, reserve, len(device_ids), tp) from None
    stages = tuple(
        Stage(index=k, layers=numbers.names[a:b], layer_range=(a, b), devices=groups[k],
              footprint=stage_footprint(numbers, a, b), est_time_s=sum(numbers.costs_s[a:b]))
        for k, (a, b) in enumerate(ranges)
    )
    return Plan(stages=stages, capacity_bytes=capacity_bytes, hardware=hardware,
                compression=compression, microbatches=microbatches,
                microbatch_size=microbatch_size, mode=mode, residency=residency,
                attention=attention, strategy=strategy, notes=tuple(notes), numbers=numbers,
                device_pool=device_ids, tp=tp, model=model)


def _activations_exceed(capacity: int, reserve: int, microbatch_size: int,
                        tp: int = 1) -> InfeasiblePlanError:
    split = f" split over tp={tp} devices" if tp > 1 else ""
    return _infeasible(
        f"The largest activation + buffer peak of one layer{split} is {_b(reserve)} per "
        f"device at microbatch {microbatch_size}, at or above the capacity {_b(capacity)} "
        "before any weight is placed. Shrink the microbatch, raise cache_bytes, or plan with "
        "residency='weights' (activations streamed through HBM).",
        capacity=capacity, reserve_bytes=reserve, tp=tp)


def _with_reserve(e: InfeasiblePlanError, reserve: int, devices: int,
                  tp: int = 1) -> InfeasiblePlanError:
    """Restates the partitioner's error in whole-device bytes (weights + the reserved peak)."""
    capacity = e.capacity + reserve
    per = f" per device (split over tp={tp})" if tp > 1 else ""
    if e.layer_index is not None:
        need = e.layer_bytes + reserve
        msg = (f"Layer {e.layer_name!r} (index {e.layer_index}) needs {_b(need)}{per}: "
               f"{e.layer_bytes:,} of weights/KV + {reserve:,} of activation/buffer peak, "
               f"more than the capacity {_b(capacity)}. No number of stages can hold it: "
               "split the layer over devices, compress its weights, shrink the microbatch, or "
               "plan with residency='weights'.")
        min_cap, min_dev = need, None
    else:
        min_cap, min_dev = e.min_capacity + reserve, e.min_stages * tp
        groups = f" ({devices // tp} stages of tp={tp})" if tp > 1 else ""
        msg = (f"The layers need at least {e.min_stages} stages of {_b(capacity)}{per} but "
               f"only {devices} devices{groups} were given. Use at least {min_dev} devices, "
               f"or a capacity of at least {_b(min_cap)} for {devices}; compression or a "
               "smaller microbatch also lowers the need.")
    fields = {k: v for k, v in vars(e).items()}
    fields.update(capacity=capacity, min_capacity=min_cap, reserve_bytes=reserve,
                  min_devices=min_dev, tp=tp)
    return _infeasible(msg, **fields)


# ---- the edge-case search -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how to plan: the typed configuration of ``search_plan``.

    Attributes:
        hardware: the device's HardwareSpec (costs).
        capacity_bytes: on-chip bytes per device.
        device_ids: the devices, in order (a tp stage takes consecutive ids).
        batch_size: the full batch.
        microbatch_size: the requested microbatch (divides ``batch_size``).
        compression: the requested compression policy.
        mode: "prefill" or "decode".
        residency: "all" or "weights".
        attention: "as_traced" or "fused".
        method: "optimal" or "greedy" (``partition_layers``).
        allow: edge-case strategies permitted, in order of preference (see module docstring).
        model: model name shown in reports.
    """

    hardware: HardwareSpec
    capacity_bytes: int
    device_ids: tuple[int, ...]
    batch_size: int
    microbatch_size: int
    compression: Compression
    mode: str = "prefill"
    residency: Residency = "all"
    attention: str = "as_traced"
    method: str = "optimal"
    allow: tuple[str, ...] = ()
    model: str = ""

    def __post_init__(self) -> None:
        unknown = [a for a in self.allow if a not in STRATEGIES]
        if unknown or len(set(self.allow)) != len(self.allow):
            raise ConfigError(f"allow={self.allow!r}: list each of {STRATEGIES} at most once, "
                              "in order of preference (e.g. allow=('split', 'compress')).")
        if self.residency not in ("all", "weights"):
            raise ConfigError(f"residency must be 'all' or 'weights', got {self.residency!r}.")
        if not self.device_ids or self.capacity_bytes < 1 or self.microbatch_size < 1:
            raise ConfigError(f"Target needs devices, capacity_bytes >= 1 and microbatch_size "
                              f">= 1; got {len(self.device_ids)} devices, {self.capacity_bytes}"
                              f" bytes, microbatch {self.microbatch_size}.")
        if self.batch_size % self.microbatch_size:
            raise ConfigError(f"microbatch_size {self.microbatch_size} does not divide the "
                              f"batch {self.batch_size}.")


@dataclasses.dataclass(frozen=True)
class Requirement:
    """What one configuration (compression, microbatch, residency) needs to fit; projected
    from footprints.

    Attributes:
        compression: the policy's name.
        microbatch_size: sequences per microbatch.
        residency: "all" or "weights".
        capacity_bytes: the capacity asked about.
        num_devices: the device count asked about.
        min_tp: the least tp with which every stage of one layer fits ``capacity_bytes``.
        fewest_devices: the fewest devices (stages x tp) that fit ``capacity_bytes``.
        fewest_tp: the tp of that plan.
        fewest_stages: its stage count.
        min_capacity_bytes: the least capacity with which ``num_devices`` suffice.
        min_capacity_tp: the tp of that plan.
        floor_bytes: the least, over the splits tried, of the bytes the heaviest single layer
            needs per device (what no split removes: replicated weights, the whole residual).
    """

    compression: str
    microbatch_size: int
    residency: str
    capacity_bytes: int
    num_devices: int
    min_tp: int | None
    fewest_devices: int | None
    fewest_tp: int | None
    fewest_stages: int | None
    min_capacity_bytes: int
    min_capacity_tp: int
    floor_bytes: int


def requirement(numbers_at: Callable[[int], LayerNumbers], tps: Sequence[int], *,
                capacity_bytes: int, num_devices: int, residency: Residency,
                compression: str = "", microbatch_size: int = 0) -> Requirement:
    """The fewest devices and the least capacity for one configuration, over splits ``tps``.

    Args:
        numbers_at: per-device numbers at a tp (e.g. ``split_numbers`` of one graph).
        tps: splits to consider (``split_levels``); those <= ``num_devices`` count for the
            least capacity, all of them for the fewest devices.
        capacity_bytes: capacity per device for the fewest-devices question.
        num_devices: device count for the least-capacity question.
        residency: "all" or "weights".
        compression: label recorded in the result.
        microbatch_size: label recorded in the result.

    Returns:
        Requirement.

    Example:
        >>> r = requirement(lambda tp: split_numbers(g, fp, costs, tp), split_levels(g, 64),
        ...                 capacity_bytes=50 * 2**20, num_devices=16, residency="weights")
        >>> r.fewest_devices
    """
    best_dev: tuple[int, int, int] | None = None
    best_cap: tuple[int, int] | None = None
    min_tp = None
    floor = None
    for tp in tps:
        sizes, room, reserve = partition_inputs(numbers_at(tp), capacity_bytes, residency)
        heaviest = max(sizes) + reserve
        floor = heaviest if floor is None else min(floor, heaviest)
        if heaviest <= capacity_bytes:
            min_tp = tp if min_tp is None else min_tp
            devices = min_stages(sizes, room) * tp
            if best_dev is None or devices < best_dev[0]:
                best_dev = (devices, tp, devices // tp)
        if tp <= num_devices:
            need = min_capacity(sizes, num_devices // tp) + reserve
            if best_cap is None or need < best_cap[0]:
                best_cap = (need, tp)
    if best_cap is None:
        raise ConfigError(f"requirement needs a tp <= num_devices={num_devices}; got {tps}.")
    return Requirement(
        compression=compression, microbatch_size=microbatch_size, residency=residency,
        capacity_bytes=capacity_bytes, num_devices=num_devices, min_tp=min_tp,
        fewest_devices=best_dev[0] if best_dev else None,
        fewest_tp=best_dev[1] if best_dev else None,
        fewest_stages=best_dev[2] if best_dev else None,
        min_capacity_bytes=best_cap[0], min_capacity_tp=best_cap[1], floor_bytes=floor or 0)


class _Search:
    """Memoised numbers for the candidates (microbatch, compression, tp) of one target."""

    def __init__(self, graph_at: Callable[[int], LayerGraph], target: Target):
        self.graph_at, self.t = graph_at, target
        self.n = len(target.device_ids)
        self._fp: dict = {}
        self._costs: dict = {}
        self._seg_costs: dict = {}
        self._numbers: dict = {}
        self._weights_fit: dict = {}
        self.tried = 0
        self.considered = 0
        base = graph_at(target.microbatch_size)
        allow = target.allow
        self.tps = split_levels(base, self.n) if "split" in allow else (1,)
        self.comps = self._escalation() if "compress" in allow else (target.compression,)
        batch, mb0 = target.batch_size, target.microbatch_size
        # Weights-resident prefill keeps no activations or KV on chip: microbatches cannot help.
        helps = target.residency == "all" or target.mode == "decode"
        self.mbs = (mb0, *(d for d in range(mb0 - 1, 0, -1) if batch % d == 0)) \
            if "microbatch" in allow and helps else (mb0,)

    def _escalation(self) -> tuple[Compression, ...]:
        """The user's policy, then the ESCALATION presets after it (for a policy outside the
        ladder: the presets that store this model's weights in fewer bytes)."""
        c0, mb0 = self.t.compression, self.t.microbatch_size
        if c0 in ESCALATION_POLICIES:
            return ESCALATION_POLICIES[ESCALATION_POLICIES.index(c0):]
        w0 = _weights(self.fp(mb0, c0))
        return (c0, *(c for c in ESCALATION_POLICIES if _weights(self.fp(mb0, c)) < w0))

    def fp(self, mb: int, comp: Compression) -> GraphFootprint:
        if (mb, comp) not in self._fp:
            self._fp[mb, comp] = footprint(self.graph_at(mb), comp, attention=self.t.attention)
        return self._fp[mb, comp]

    def numbers(self, mb: int, comp: Compression, tp: int) -> LayerNumbers:
        if (mb, comp, tp) not in self._numbers:
            graph = self.graph_at(mb)
            if (mb, tp) not in self._costs:
                self._costs[mb, tp] = layer_times(
                    graph, self.t.hardware, weights_on_chip=True, tp=tp,
                    seg_costs=self._seg_costs.setdefault(mb, {}))
            self._numbers[mb, comp, tp] = split_numbers(graph, self.fp(mb, comp),
                                                        self._costs[mb, tp], tp)
        return self._numbers[mb, comp, tp]

    def weights_fit(self, comp: Compression, tp: int) -> bool:
        """A bound that needs no retrace: do the weights alone fit at (comp, tp)?"""
        if (comp, tp) not in self._weights_fit:
            nums = self.numbers(self.t.microbatch_size, comp, tp)
            sizes = [f.weights_bytes for f in nums.footprints]
            sizes[0] += nums.prologue.weights_bytes
            sizes[-1] += nums.epilogue.weights_bytes
            cap = self.t.capacity_bytes
            self._weights_fit[comp, tp] = max(sizes) <= cap and \
                min_stages(sizes, cap) <= self.n // tp
        return self._weights_fit[comp, tp]

    def attempt(self, mb: int, comp: Compression, tp: int, *,
                residency: Residency | None = None) -> Plan | InfeasiblePlanError:
        """The plan at one candidate, or why there is none."""
        self.tried += 1
        t = self.t
        try:
            return plan_from_numbers(
                self.numbers(mb, comp, tp), capacity_bytes=t.capacity_bytes,
                device_ids=t.device_ids, hardware=t.hardware.name, compression=comp.name,
                microbatches=t.batch_size // mb, microbatch_size=mb, mode=t.mode,
                residency=residency or t.residency, attention=t.attention, method=t.method,
                tp=tp, model=t.model)
        except InfeasiblePlanError as e:
            return e

    def candidates(self):
        """(mb, comp, tp) in the search order: the last allowed strategy most significant."""
        order = [*self.t.allow, *(s for s in STRATEGIES if s not in self.t.allow)]
        levels = {"split": self.tps, "compress": self.comps, "microbatch": self.mbs}
        for combo in itertools.product(*(levels[k] for k in reversed(order))):
            pick = dict(zip(reversed(order), combo, strict=True))
            yield pick["microbatch"], pick["compress"], pick["split"]


def search_plan(graph_at: Callable[[int], LayerGraph], target: Target) -> Plan:
    """The least intrusive plan that fits (see the module docstring for the order).

    Args:
        graph_at: the LayerGraph traced at a microbatch size (memoise it: the search calls
            it again for sizes it has seen).
        target: devices, capacity, requested compression / microbatch, allowed strategies.

    Returns:
        Plan; ``graph_at(plan.microbatch_size)`` is the graph it was planned from.

    Raises:
        InfeasiblePlanError: no candidate fits; the message and the attributes
            ``min_devices``, ``min_capacity``, ``min_compression`` and ``requirement`` say
            what would (with ``target.allow`` empty: the partitioner's error as it is).

    Example:
        >>> plan = search_plan(lambda mb: segment(trace(model, tokens, microbatch_size=mb)),
        ...                    Target(hardware.H100_SXM, 2**20, tuple(range(8)), 8, 2,
        ...                           compression.get(None), allow=("split",)))
        >>> plan.strategy, plan.tp
        ('split', 2)
    """
    s = _Search(graph_at, target)
    mb0, c0 = target.microbatch_size, target.compression
    first = s.attempt(mb0, c0, 1)
    if isinstance(first, Plan):
        return first
    if not target.allow:
        raise first  # planning exactly as requested: the partitioner's own account
    for mb, comp, tp in s.candidates():
        s.considered += 1
        if (mb, comp, tp) == (mb0, c0, 1) or not s.weights_fit(comp, tp):
            continue  # the weights alone overflow: no microbatch helps, no retrace needed
        changed = [k for k, moved in (("split", tp > 1), ("compress", comp != c0),
                                      ("microbatch", mb != mb0)) if moved]
        strategy = "+".join(k for k in target.allow if k in changed)
        found = s.attempt(mb, comp, tp)
        if isinstance(found, Plan):
            notes = _notes(s, first, found, tp, comp, mb)
            return dataclasses.replace(found, strategy=strategy, notes=notes)
    raise _nothing_fits(s, first)


def _notes(s: _Search, first: InfeasiblePlanError, plan: Plan, tp: int, comp: Compression,
           mb: int) -> tuple[str, ...]:
    t = s.t
    mb0, c0 = t.microbatch_size, t.compression
    notes = [f"as given ({c0.name}, microbatch {mb0}, one device per stage) it does not fit: "
             f"{_reason(first)}"]
    if tp > 1:
        notes.append(
            f"split: every stage spans tp={tp} devices ({len(plan.stages)} stages x {tp} = "
            f"{plan.num_devices} of {s.n} devices); per device: the weights passes/tp.py "
            f"splits / {tp} + replicated weights, KV / {tp}, buffers / {tp}, activations "
            f"max(peak / {tp}, the layer's largest input)")
        heads = heads_split(s.graph_at(mb), tp)
        if heads is not None:
            n_heads, m, n = heads
            notes.append(f"m x n = {m} x {n} (seed 002): {n_heads // m} of {n_heads} heads per "
                         f"device" + (f", hidden split {n} ways" if n > 1 else ""))
    if comp != c0:
        ladder = " -> ".join(c.name for c in s.comps)
        notes.append(f"compress: {c0.name} -> {comp.name}, the first of {ladder} that fits")
    if mb != mb0:
        notes.append(f"microbatch: {mb0} -> {mb} sequences per microbatch "
                     f"({t.batch_size // mb0} -> {t.batch_size // mb} microbatches)")
    notes.append(f"candidate {s.considered} in the search order allow={t.allow} (the last "
                 f"most significant); {s.tried} evaluated, the others pruned (weights alone "
                 "over the capacity)")
    return tuple(notes)


def _reason(e: InfeasiblePlanError) -> str:
    """The first sentence of an error, for a note."""
    text = str(e)
    return text.split(". ")[0].rstrip(".")


def _nothing_fits(s: _Search, first: InfeasiblePlanError) -> InfeasiblePlanError:
    """Infeasible everywhere: say what would fit, with the numbers (also as attributes)."""
    t = s.t
    evaluated = s.tried
    cap, n = t.capacity_bytes, s.n
    comp, mb = s.comps[-1], s.mbs[-1]
    graph = s.graph_at(mb)
    tps = split_levels(graph, MAX_TP) if "split" in t.allow else (1,)
    need = requirement(lambda tp: s.numbers(mb, comp, tp), tps, capacity_bytes=cap,
                       num_devices=n, residency=t.residency, compression=comp.name,
                       microbatch_size=mb)
    at = f"{comp.name}, microbatch {mb}"
    if need.fewest_devices is not None:
        devices = (f"at least {need.fewest_devices} devices ({need.fewest_stages} stages x "
                   f"tp={need.fewest_tp}, {at})")
    else:
        devices = (f"no number of devices: split any of {tps[0]}..{tps[-1]} ways ({at}), the "
                   f"heaviest layer still needs {_b(need.floor_bytes)} per device (replicated "
                   "weights and its whole [B, T, D] input)")
    parts = [devices, f"a capacity of at least {_b(need.min_capacity_bytes)} per device on "
             f"{n} devices (tp={need.min_capacity_tp}, {at})"]
    min_comp = None
    if "compress" not in t.allow:
        for c in ESCALATION_POLICIES[1:]:
            if _weights(s.fp(mb, c)) < _weights(s.fp(mb, t.compression)) and any(
                    isinstance(s.attempt(mb, c, tp), Plan) for tp in s.tps):
                min_comp = c.name
                parts.append(f"compression {c.name} (not allowed here: add 'compress' to allow)")
                break
    if t.residency == "all" and any(
            isinstance(s.attempt(mb, c, tp, residency="weights"), Plan)
            for c in s.comps for tp in s.tps):
        parts.append("or residency='weights' (activations streamed through HBM)")
    missing = [k for k in STRATEGIES if k not in t.allow]
    total = len(s.tps) * len(s.comps) * len(s.mbs)
    tried = (f"split tp {'/'.join(map(str, s.tps))} x compression "
             f"{' -> '.join(c.name for c in s.comps)} x microbatch "
             f"{'/'.join(map(str, s.mbs))}")
    msg = (f"No plan fits {n} devices of {_b(cap)} each ({t.hardware.name}, residency="
           f"{t.residency}). Tried {total} candidates ({tried}; {evaluated} evaluated, the "
           f"others have weights alone over the capacity). As given: {_reason(first)}. "
           f"What would fit: {'; '.join(parts)}."
           + (f" Not allowed: {', '.join(missing)}." if missing else ""))
    fields = {k: v for k, v in vars(first).items()}
    fields.update(capacity=cap, max_stages=n, min_devices=need.fewest_devices,
                  min_capacity=need.min_capacity_bytes, min_compression=min_comp,
                  requirement=need, tried=total)
    return _infeasible(msg, **fields)


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
    excluded = set(exclude_devices)
    unknown = excluded - set(plan.device_pool)
    if unknown:
        raise DeviceError(f"Cannot exclude devices {sorted(unknown)}: not in the plan's pool "
                          f"{list(plan.device_pool)}.")
    pool = [d for d in plan.device_pool if d not in excluded]
    pool += [d for d in dict.fromkeys(spare_devices) if d not in pool and d not in excluded]
    notes = (*plan.notes, f"replanned without devices {sorted(excluded)}"
             + (f", with spares {list(spare_devices)}" if spare_devices else ""))
    try:
        return plan_from_numbers(
            plan.numbers, capacity_bytes=plan.capacity_bytes, device_ids=pool,
            hardware=plan.hardware, compression=plan.compression,
            microbatches=plan.microbatches, microbatch_size=plan.microbatch_size,
            mode=plan.mode, residency=plan.residency, attention=plan.attention,
            strategy=plan.strategy, notes=notes, tp=plan.tp, model=plan.model)
    except (InfeasiblePlanError, DeviceError) as e:
        if isinstance(e, DeviceError) and pool:
            raise
        fields = dict(vars(e))
        sizes, room, _ = partition_inputs(plan.numbers, plan.capacity_bytes, plan.residency)
        fewest = min_stages(sizes, room) * plan.tp if room > 0 and max(sizes) <= room else None
        fields["min_devices"] = fewest
        need = f"; the plan needs at least {fewest} devices" if fewest else ""
        split = f" ({len(pool) // plan.tp} stages of tp={plan.tp})" if plan.tp > 1 else ""
        raise _infeasible(
            f"Without devices {sorted(excluded)} the remaining {len(pool)} devices{split} "
            f"cannot hold the model{need}: add spare_devices=[...] or re-plan with "
            f"lwjax.plan (compression, a smaller microbatch). {e}", **fields) from None


# ---- helpers --------------------------------------------------------------------------------

def _infeasible(message: str, **fields) -> InfeasiblePlanError:
    err = InfeasiblePlanError(message)
    for k, v in fields.items():
        setattr(err, k, v)
    return err


def _weights(fp: GraphFootprint) -> int:
    return sum(f.weights_bytes for f in (fp.prologue, *fp.layers, fp.epilogue))


def _nbytes(v) -> int:
    aval = v.aval
    dtype = getattr(aval, "dtype", None)
    if dtype is None:
        return 0
    return int(np.prod(getattr(aval, "shape", ()), dtype=np.int64)) * np.dtype(dtype).itemsize


def _residual_bytes(seg: Segment) -> int:
    """Bytes of the largest floating-point value crossing the segment's boundary."""
    values = [v for v in (*seg.inputs, *seg.outputs)
              if np.issubdtype(getattr(v.aval, "dtype", np.int32), np.floating)]
    return max((_nbytes(v) for v in values), default=0)


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // b)


def _b(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / MIB:.2f} MiB)"
