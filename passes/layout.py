"""Pass: the layout search -- stage count x tp per stage x microbatch count, scored.

The layouts a user would pick are candidates, listed in the registry ``FAMILIES``:

- ``"lwjax"``: any stage count S of ``tp`` devices each (S x tp <= devices), the layers
  partitioned contiguously with the least slowest stage (``partition_layers``);
- ``"TP x PP mesh"``: the meshes a user writes by hand, pp = devices // tp stages of
  near-equal layer counts over every device, tp >= 2 (2 stages x tp 8 is one);
- ``"circular"``: the circular (interleaved) schedule (``passes/schedules.py``): S >= 2
  devices (tp 1) each running ``virtual`` >= 2 stages, S x virtual stages in all with the
  least slowest stage, each device holding all of its stages' weights. Its fill and drain
  are S - 1 ticks of one stage (GPipe's: S - 1 ticks of ``virtual`` stages), and every
  microbatch crosses ``virtual`` times as many device boundaries. Searched for forward
  passes (``Space.schedules``).

Each is tried at every microbatch count M allowed and scored by one projected step
(``step_seconds``): the roofline corrected by ``cost_calibration.tick_model`` -- a layer's
work at the matmul efficiency measured for its FLOPs (a matmul over stacked weights, a
mixture of experts', at the efficiency of one expert's matrix: ``stacked_matmuls``; whole
experts per device keep that size under tp, smaller microbatches shrink it), a per-tick
floor (more per stage and per all-reduce of a split stage), the stage-to-stage transfer, and
on a CPU the cores the simulated devices share: every device of a split stage also runs the
equations that touch no split axis whole (``passes.tp.replicated_eqns``; tp copies of them
share the cores), an all-reduce's rendezvous costs the cores only in the ticks when one
device group alone has work (``lone_ticks``), the devices working in a tick run slower while
the others wait at its collective (``active_groups``, ``TickModel.waiting_slowdown``), and
every device's carry crosses the host's memory each tick. A mesh is a layer-wise plan too
(its stages are contiguous), so the best "lwjax" candidate is never projected slower than the best
mesh: by construction, since for each (S, tp, M) the least slowest stage minimises the step
(for a given S the step grows with the slowest stage only; on shared cores more stages can
lower it, so each stage count's least slowest partition is also tried split into exactly
that many stages).

Example:
    >>> ranking = search_layouts(inputs_at, Space(tps=(1, 2), microbatch_counts=(1, 2, 4),
    ...                                           num_devices=4, num_layers=4))
    >>> ranking.best.layout
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lwjax._compat import jaxprs_in_params
from lwjax.errors import InfeasiblePlanError
from lwjax.hardware import HardwareSpec
from lwjax.passes import padding
from lwjax.passes.cost_calibration import TickModel, tick_model
from lwjax.passes.cost_core import transfer_time
from lwjax.passes.partition import partition_layers
from lwjax.passes.planner import _residual_bytes, eqns_cost, partition_inputs, segment_cost
from lwjax.passes.roofline import JaxprCost
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.passes.tp import replicated_eqns, residual_width, split_axis
from lwjax.plan import LayerNumbers, Residency, schedule_ticks

Range = tuple[int, int]
_TIE = 1e-9  # relative: steps closer than this are equal; fewer devices, stages, M win
# The share of a dense block's FLOPs one of its matmuls holds, FLOPs-weighted: 0.161 / 0.180
# / 0.191 for the hidden 64 / 128 / 256 dense models the CPU efficiency was measured on
# (``cost_calibration``), at any batch. That curve was fitted against whole blocks, so one
# matmul of g FLOPs is taken to run as a block of g / DENSE_MATMUL_SHARE did.
DENSE_MATMUL_SHARE = 0.18


@dataclasses.dataclass(frozen=True)
class LayoutInputs:
    """What scoring one (tp, M) needs, per device at that tp.

    Attributes:
        microbatches: M.
        tp: devices per stage.
        work_s: per layer, seconds of work per microbatch (roofline at the measured
            efficiency; the prologue folded into layer 0).
        floor_s: per layer, seconds per tick beyond its work (a split layer's all-reduces).
        epilogue_s: the epilogue's work per microbatch, on the last stage after the ticks.
        sizes: per layer, the bytes that add up in a stage (``partition_inputs``).
        room: the capacity left for them (<= 0: nothing fits).
        transfer_s: one stage-to-stage send of a microbatch's residual.
        model: the corrections in force (concurrency, per-tick floor).
        numbers: the planner's numbers, for the weight slots' padding a partition adds
            (``passes/padding.py``); None: not counted.
    """

    microbatches: int
    tp: int
    work_s: tuple[float, ...]
    floor_s: tuple[float, ...]
    epilogue_s: float
    sizes: tuple[int, ...]
    room: int
    transfer_s: float
    model: TickModel
    numbers: LayerNumbers | None = None


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate: ``family`` of ``FAMILIES``, S stages x tp devices, M microbatches."""

    family: str
    num_stages: int  # device groups S (a circular layout runs S x virtual stages on them)
    tp: int
    microbatches: int
    virtual: int = 1  # stages per device group: the circular schedule's laps

    def describe(self, family: bool = True) -> str:
        laps = f" x {self.virtual} laps" if self.virtual > 1 else ""
        shape = f"{self.num_stages} x tp {self.tp}{laps}, M={self.microbatches}"
        return f"{shape} ({self.family})" if family else shape


@dataclasses.dataclass(frozen=True)
class Scored:
    layout: Layout
    ranges: tuple[Range, ...]  # S x virtual stages
    step_s: float


@dataclasses.dataclass(frozen=True)
class Space:
    """The dimensions searched: tps allowed, microbatch counts allowed, devices, layers, and
    the schedules whose families are candidates ("gpipe", "circular": forward passes
    only)."""

    tps: tuple[int, ...]
    microbatch_counts: tuple[int, ...]
    num_devices: int
    num_layers: int
    schedules: tuple[str, ...] = ("gpipe",)


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Every feasible candidate, best first (``best``, ``runner_up``, ``best_mesh``), where
    the corrections to the roofline come from (``TickModel.source``), and the schedules
    searched (``Space.schedules``)."""

    scored: tuple[Scored, ...]
    source: str = ""
    schedules: tuple[str, ...] = ("gpipe",)

    @property
    def best(self) -> Scored | None:
        return self.scored[0] if self.scored else None

    @property
    def runner_up(self) -> Scored | None:
        """The best candidate with another (S, tp, M) than the winner."""
        key = _shape(self.best) if self.scored else None
        return next((s for s in self.scored[1:] if _shape(s) != key), None)

    def distinct(self) -> tuple[Scored, ...]:
        """The best candidate of every (S, tp, M, laps), best first."""
        seen: dict[tuple[int, int, int, int], Scored] = {}
        for s in self.scored:
            seen.setdefault(_shape(s), s)
        return tuple(seen.values())

    @property
    def best_mesh(self) -> Scored | None:
        return next((s for s in self.scored if s.layout.family == "TP x PP mesh"), None)

    def best_of(self, schedule: str) -> Scored | None:
        """The best candidate run under ``schedule`` ("gpipe": one stage per device).

        Example:
            >>> ranking.best_of("gpipe").layout.describe()   # what circular won against
        """
        return next((s for s in self.scored
                     if (s.layout.virtual > 1) == (schedule == "circular")), None)

    def notes(self) -> tuple[str, ...]:
        """What won, by how much over the runner-up, the best mesh and the best layout of
        the other schedule searched (projected)."""
        best = self.best
        lines = [f"layout search (projected step; corrections: {self.source}): "
                 f"{best.layout.describe()} wins at {best.step_s * 1e3:.3f} ms of "
                 f"{len(self.scored)} feasible candidates"]
        other_schedule = "gpipe" if best.layout.virtual > 1 else "circular"
        compared = [("the runner-up", self.runner_up)]
        if "gpipe" in self.schedules:
            compared.append(("the best TP x PP mesh", self.best_mesh))
        else:
            lines.append("TP x PP meshes not searched: they run GPipe, and the search was "
                         "asked for the circular schedule only")
        if other_schedule in self.schedules and len(self.schedules) > 1:
            compared.append((f"the best {'GPipe' if other_schedule == 'gpipe' else 'circular'}"
                             " layout", self.best_of(other_schedule)))
        for label, other in compared:
            if other is None:
                lines.append(f"no {label[4:]} fits")
            elif label != "the runner-up" and other.ranges == best.ranges and \
                    _shape(other) == _shape(best):
                lines.append(f"{label} is this layout ({other.layout.describe(False)}): "
                             "the least slowest stage at its stage count is its even split")
            else:
                lines.append(f"{other.step_s / best.step_s:.2f}x faster than {label}, "
                             f"{other.layout.describe()} at {other.step_s * 1e3:.3f} ms")
        return tuple(lines)


def _shape(s: Scored) -> tuple[int, int, int, int]:
    return s.layout.num_stages, s.layout.tp, s.layout.microbatches, s.layout.virtual


# ---- scoring --------------------------------------------------------------------------------

def lone_ticks(num_stages: int, microbatches: int, virtual: int = 1) -> int:
    """Stage-ticks of a step in which one device group alone has work: all of them with one
    group or one microbatch (M x S x ``virtual``), else the first tick's and the last's
    (GPipe's table; the circular schedule's has more when S does not divide M, but its
    stages run at tp 1, with no all-reduce floors to count).

    Example:
        >>> lone_ticks(2, 1), lone_ticks(1, 4), lone_ticks(4, 2)
        (2, 4, 2)
    """
    if num_stages == 1 or microbatches == 1:
        return microbatches * num_stages * virtual
    return 2


def active_groups(num_stages: int, microbatches: int, virtual: int = 1) -> list[int]:
    """Device groups with work in each tick of a forward step: GPipe's ramp (1, 2, .., then
    down), or the circular schedule's table (``passes/schedules.py``). They add up to
    M x S x ``virtual`` stage-ticks.

    Example:
        >>> active_groups(3, 2), active_groups(2, 2, virtual=2)
        ([1, 2, 2, 1], [1, 2, 2, 2, 1])
    """
    s, v = num_stages, virtual
    ticks = schedule_ticks(s, microbatches, v)
    u = np.arange(ticks)[:, None] - np.arange(s)[None, :]  # ticks since each group's first
    if v == 1:
        valid = (u >= 0) & (u < microbatches)
    else:  # as schedules._circular_position: groups of S microbatches, v laps each
        group, within = np.divmod(np.maximum(u, 0), s * v)
        valid = (u >= 0) & (group * s + within % s < microbatches)
    return valid.sum(axis=1).tolist()


def step_seconds(x: LayoutInputs, ranges: Sequence[Range], virtual: int = 1) -> float:
    """Projected seconds of one GPipe step of a partition: ``M + S - 1`` ticks of the
    slowest stage (its work and its all-reduces' floor) plus the per-tick floor and the
    transfer; on shared cores no less than all devices' work -- each tick's active devices'
    (``active_groups`` x tp, the mean stage's work each) slowed by the devices waiting
    meanwhile (``TickModel.waiting_slowdown``) -- and, for each tick when one device group
    alone works (``lone_ticks``), the mean stage's floor -- and every device's transfer per
    tick, not one (all carries cross the host's memory at once); then M epilogues. With
    ``virtual`` > 1 the ``ranges`` are S x virtual stages under the circular schedule, whose
    tick count is its table's (``virtual x M + S - 1`` when S divides M).

    Example:
        >>> step_seconds(inputs, [(0, 2), (2, 4)])
    """
    m, s = x.microbatches, len(ranges) // virtual
    ticks = schedule_ticks(s, m, virtual)
    stage = [sum(x.work_s[a:b]) + sum(x.floor_s[a:b]) for a, b in ranges]
    busy = ticks * max(stage)
    shared = x.model.concurrency is not None
    if shared:  # whole-host rates: every device's work, one after another, and the floors
        # (a split stage's all-reduce rendezvous) of the ticks when one device group alone
        # has work: while several groups work, one's rendezvous overlaps another's work
        devices, mean = s * x.tp, sum(x.work_s) / (s * virtual)
        work = x.tp * mean * sum(k * x.model.waiting_slowdown(k * x.tp, devices)
                                 for k in active_groups(s, m, virtual))
        busy = max(busy, work + lone_ticks(s, m, virtual) * sum(x.floor_s) / (s * virtual))
    # every device sends its carry every tick; on shared cores they share the host's memory
    sends = s * x.tp if shared else 1
    per_tick = x.model.floor_s(s) + (sends * x.transfer_s if s > 1 else 0.0)
    return busy + ticks * per_tick + m * x.epilogue_s * (x.tp if shared else 1)


def _overflow(x: LayoutInputs, ranges: Sequence[Range], virtual: int = 1) -> int:
    """How far the fullest device exceeds the room (<= 0: all fit), padding counted."""
    if x.numbers is not None:
        return padding.overflow(x.numbers, ranges, x.sizes, x.room, virtual)
    return max(sum(sum(x.sizes[slice(*ranges[k])]) for k in stages)
               for stages in padding.device_stages(len(ranges), virtual)) - x.room


def _fits(x: LayoutInputs, ranges: Sequence[Range], virtual: int = 1) -> bool:
    return x.room > 0 and _overflow(x, ranges, virtual) <= 0


# ---- candidate families ---------------------------------------------------------------------

def _lwjax(x: LayoutInputs, space: Space) -> Iterable[tuple[tuple[Range, ...], int]]:
    """The least slowest stage with at most k stages, for every k, and the same split into
    exactly k stages (partitions repeated at a larger k are left out)."""
    if x.room <= 0:
        return
    most = min(space.num_devices // x.tp, space.num_layers)
    costs = [w + f for w, f in zip(x.work_s, x.floor_s, strict=True)]
    lone_floors = x.model.concurrency is not None and any(x.floor_s)
    counts = range(1, most + 1)
    if space.num_layers * most > 200_000:  # keep planning fast for huge models
        counts = sorted({most, *(2**i for i in range(most.bit_length()) if 2**i <= most)})
    seen = set()
    for k in counts:
        try:
            if x.numbers is None:
                ranges = partition_layers(list(x.sizes), costs, x.room, k)
            else:
                ranges = padding.fit(
                    lambda r, k=k: partition_layers(list(x.sizes), costs, r, k),
                    x.numbers, x.sizes, x.room)
        except InfeasiblePlanError:
            continue
        # the same slowest stage over exactly k stages: on shared cores the floors of the
        # ticks one stage works alone shrink with more stages (``step_seconds``); with no
        # floors more stages only add ticks
        exact = _split_to(ranges, costs, k) if len(ranges) < k <= space.num_layers and \
            lone_floors else ranges
        for r in dict.fromkeys((ranges, exact if _fits(x, exact) else ranges)):
            if r not in seen:
                seen.add(r)
                yield r, 1


def _mesh(x: LayoutInputs, space: Space) -> Iterable[tuple[tuple[Range, ...], int]]:
    """pp = devices // tp stages of near-equal layer counts (the longer first), tp >= 2."""
    pp = space.num_devices // x.tp
    if x.tp < 2 or not 1 <= pp <= space.num_layers:
        return
    base, extra = divmod(space.num_layers, pp)
    stops = [0]
    for i in range(pp):
        stops.append(stops[-1] + base + (i < extra))
    ranges = tuple(zip(stops[:-1], stops[1:], strict=True))
    if _fits(x, ranges):
        yield ranges, 1


MAX_LAPS = 8  # the circular family's most stages per device


def _circular(x: LayoutInputs, space: Space) -> Iterable[tuple[tuple[Range, ...], int]]:
    """S >= 2 devices x ``virtual`` in 2..MAX_LAPS stages (S x virtual <= layers), tp 1:
    the least slowest of S x virtual stages whose devices fit (``circular_partition``)."""
    if x.tp != 1 or x.room <= 0:
        return
    costs = [w + f for w, f in zip(x.work_s, x.floor_s, strict=True)]
    for s in range(2, min(space.num_devices, space.num_layers // 2) + 1):
        for v in range(2, min(MAX_LAPS, space.num_layers // s) + 1):
            ranges = circular_partition(x, costs, s, v)
            if ranges is not None:
                yield ranges, v


def circular_partition(x: LayoutInputs, costs: Sequence[float], devices: int,
                       virtual: int) -> tuple[Range, ...] | None:
    """``devices x virtual`` contiguous stages with the least slowest stage whose devices
    (stage k on device k mod S) each hold all their stages, padding counted; None when no
    partition tried fits.

    The least slowest stage over at most S x virtual stages that each fit a per-stage budget
    (``partition_layers``, exact), its stages split until there are exactly S x virtual
    (splitting never raises the slowest stage). A device holds ``virtual`` stages, so the
    budget starts at the whole room and, while a device overflows, drops by the overflow
    over ``virtual`` (and below the partition's largest stage): exact when the room does not
    bind a device, and then no other exactly-V partition has a faster slowest stage; not
    exhaustive when it does (as ``padding.fit``).

    Example:
        >>> circular_partition(inputs, inputs.work_s, devices=2, virtual=2)
        ((0, 1), (1, 2), (2, 3), (3, 4))
    """
    stages = devices * virtual
    if stages > len(x.sizes) or x.room <= 0:
        return None
    budget = x.room
    for _ in range(padding.MAX_REFITS):
        try:
            ranges = partition_layers(list(x.sizes), list(costs), budget, stages)
        except InfeasiblePlanError:
            return None
        ranges = _split_to(ranges, costs, stages)
        over = _overflow(x, ranges, virtual)
        if over <= 0:
            return ranges
        budget = min(budget - -(-over // virtual), max(sum(x.sizes[a:b]) for a, b in ranges) - 1)
        if budget <= 0:
            return None
    return None


def _split_to(ranges: Sequence[Range], costs: Sequence[float], count: int
              ) -> tuple[Range, ...]:
    """``ranges`` split until there are ``count``: each time the slowest stage of two or
    more layers, at the cut with the least slower half."""
    out = list(ranges)
    while len(out) < count:
        k = max((i for i, (a, b) in enumerate(out) if b - a >= 2),
                key=lambda i: (sum(costs[slice(*out[i])]), out[i][1] - out[i][0]))
        a, b = out[k]
        cut = min(range(a + 1, b), key=lambda c: max(sum(costs[a:c]), sum(costs[c:b])))
        out[k:k + 1] = [(a, cut), (cut, b)]
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Family:
    """A registry entry: how one kind of layout partitions the layers at (tp, M): each
    partition with its stages per device (``virtual``; 1 but for the circular schedule),
    run under ``schedule``."""

    name: str
    describe: str
    partitions: Callable[[LayoutInputs, Space], Iterable[tuple[tuple[Range, ...], int]]]
    schedule: str = "gpipe"


FAMILIES: tuple[Family, ...] = (
    Family("lwjax", "any stage count x tp, the least slowest stage", _lwjax),
    Family("TP x PP mesh", "devices // tp stages of near-equal layer counts, tp >= 2", _mesh),
    Family("circular", "S devices x 2..8 stages each (circular schedule), the least slowest "
           "stage", _circular, "circular"),
)


def search_layouts(inputs_at: Callable[[int, int], LayoutInputs], space: Space) -> Ranking:
    """Scores every family's candidates over ``space``; best first (ties: fewer devices,
    then fewer stages, then fewer microbatches; the "lwjax" family before a mesh).

    Args:
        inputs_at: ``(microbatches, tp) -> LayoutInputs`` (memoise it).
        space: tps, microbatch counts, devices, layers.

    Example:
        >>> search_layouts(inputs_at, space).best.layout.num_stages
    """
    scored = []
    for m in space.microbatch_counts:
        for tp in space.tps:
            if tp > space.num_devices:
                continue
            x = inputs_at(m, tp)
            for order, family in enumerate(FAMILIES):
                if family.schedule not in space.schedules:
                    continue
                for ranges, v in family.partitions(x, space):
                    layout = Layout(family.name, len(ranges) // v, tp, m, v)
                    scored.append((order, Scored(layout, tuple(ranges),
                                                 step_seconds(x, ranges, v))))
    if not scored:
        return Ranking(())
    least = min(s.step_s for _, s in scored)

    def key(item):
        order, s = item
        tie = s.step_s <= least * (1 + _TIE)
        return (not tie, s.step_s if not tie else 0.0, s.layout.num_stages * s.layout.tp,
                s.layout.num_stages, s.layout.virtual, s.layout.microbatches, order)

    return Ranking(tuple(s for _, s in sorted(scored, key=key)), x.model.source,
                   tuple(space.schedules))


# ---- inputs from a traced graph -------------------------------------------------------------

def layout_inputs(graph: LayerGraph, numbers: LayerNumbers, hw: HardwareSpec, *,
                  microbatches: int, tp: int, capacity_bytes: int,
                  residency: Residency) -> LayoutInputs:
    """The scoring inputs of one (tp, M) from the graph traced at that microbatch and the
    planner's numbers at that tp (``split_numbers``).

    Example:
        >>> layout_inputs(graph, numbers, hardware.H100_SXM, microbatches=4, tp=1,
        ...               capacity_bytes=50 * 2**20, residency="all").transfer_s > 0
    """
    model = tick_model(hw)
    dtype = graph.layers[0].outputs[0].aval.dtype if graph.layers[0].outputs else "float32"
    peak = hw.peak_flops(str(dtype))
    flops: dict[str, tuple[float, list[StackedMatmul]]] = {}

    def work(seg, roofline_s: float) -> float:
        """The layer's matmuls at the efficiency of their size: a matmul over stacked
        weights (experts) at one matrix's, the rest at the layer's FLOPs per device --
        1/tp of them, but for the equations every device runs whole (``whole``)."""
        if seg.signature not in flops:
            unsplit = whole(seg).flops
            flops[seg.signature] = ((segment_cost(graph, seg).flops - unsplit) / tp + unsplit,
                                    stacked_matmuls(graph, seg, tp))
        f, stacked = flops[seg.signature]
        rest = max(f - sum(m.flops for m in stacked), 0.0)
        t = rest / (peak * model.efficiency(f)) if rest else 0.0
        t += sum(m.flops / (peak * model.efficiency(m.matrix_flops / DENSE_MATMUL_SHARE))
                 for m in stacked)
        return max(roofline_s, t)

    costs_whole: dict[str, JaxprCost] = {}

    def whole(seg) -> JaxprCost:
        """The cost of the equations every device of a split stage runs whole
        (``replicated_eqns``), where the hardware's tick model prices them (a CPU's; the
        GPU roofline divides a layer by tp); once per distinct segment."""
        if seg.signature not in costs_whole:
            eqns = replicated_eqns(graph, seg, tp) if model.replicated_bytes_per_s else []
            costs_whole[seg.signature] = eqns_cost(graph, eqns)
        return costs_whole[seg.signature]

    def replicated(seg) -> float:
        """The bytes of the equations every device runs whole, at the measured rate (their
        FLOPs are in ``work``)."""
        return model.replicated_s(whole(seg).unfused_hbm_bytes)

    work_s = [work(seg, c) + replicated(seg)
              for seg, c in zip(graph.layers, numbers.costs_s, strict=True)]
    work_s[0] += replicated(graph.prologue)
    sizes, room, _ = partition_inputs(numbers, capacity_bytes, residency)
    residual = max(_residual_bytes(seg) for seg in graph.layers)
    floor = 2 * model.allreduce_s(residual, tp)  # Megatron: two per layer
    return LayoutInputs(
        microbatches=microbatches, tp=tp, work_s=tuple(work_s),
        floor_s=(floor,) * len(work_s),
        epilogue_s=work(graph.epilogue, numbers.epilogue_s) + replicated(graph.epilogue),
        sizes=tuple(sizes), room=room, transfer_s=transfer_time(residual, hw), model=model,
        numbers=numbers)


@dataclasses.dataclass(frozen=True)
class StackedMatmul:
    """A matmul batched over a stacked weight's leading axis ([E, D, F] experts): E matmuls,
    each as efficient as one matrix's size allows, not as the layer's total FLOPs would say.

    Attributes:
        flops: per device, all its matrices (the layer split over ``tp``).
        matrix_flops: one matrix's.
    """

    flops: float
    matrix_flops: float


def stacked_matmuls(graph: LayerGraph, seg: Segment, tp: int = 1) -> list[StackedMatmul]:
    """The layer's matmuls over stacked weights (sub-jaxprs included, a scan's ``length``
    times): a ``dot_general`` whose operand has a weight's shape and its leading axis as the
    batch axis. Split over ``tp`` by ``passes/tp.py``'s rule, the stacked axis is split where
    it divides (whole experts per device, each matrix as large as unsplit), else a matrix
    axis (each matrix / tp).

    Example:
        >>> [m.matrix_flops for m in stacked_matmuls(graph, graph.layers[0])]  # MoE: 3
    """
    shapes = {graph.param_vars[i].aval.shape for i in seg.params
              if len(graph.param_vars[i].aval.shape) >= 3}
    if not shapes:
        return []
    hidden = residual_width(graph, seg)
    out = []

    def walk(eqns, times: int) -> None:
        for e in eqns:
            if e.primitive.name == "dot_general":
                (contract, _), batch = e.params["dimension_numbers"]
                for operand, dims in zip(e.invars, batch, strict=True):
                    shape = operand.aval.shape
                    if shape in shapes and tuple(dims) == (0,):
                        k = math.prod(e.invars[0].aval.shape[d] for d in contract)
                        total = times * 2 * math.prod(e.outvars[0].aval.shape) * k
                        matrix = total / shape[0]
                        if split_axis(shape, hidden, tp) != 0:
                            matrix /= tp
                        out.append(StackedMatmul(total / tp, matrix))
                        break
            length = e.params.get("length", 1) if e.primitive.name == "scan" else 1
            for sub in jaxprs_in_params(e.params):
                walk(sub.eqns, times * length)

    walk(seg.eqns, 1)
    return out
