"""Edge cases (seed document 003): what to try when the plan as given does not fit.

First, for a forward pass under objective="step" with a split or a microbatch count to choose
(``Target.searches_layout``), ``search_plan`` takes the best layout of ``passes/layout.py``
(S x tp x M at the requested compression, the TP x PP meshes among the candidates); only when
none fits does the edge-case search below run.

When the plan as given does not fit -- one layer alone exceeds the capacity, or the layers
need more stages than there are devices -- ``search_plan`` tries the strategies
``Target.allow`` names, in the order it names them (``lwjax.plan``'s default is
``("split", "compress", "microbatch")``, ``layerwise_shard``'s ``("split", "microbatch")``;
``allow=()`` plans exactly as requested, and leaving out "microbatch" pins the microbatch
count):

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
    >>> plan = search_plan(graph_at, Target(...))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

from lwjax.errors import ConfigError, InfeasiblePlanError
from lwjax.hardware import HardwareSpec
from lwjax.passes import compression as compression_lib
from lwjax.passes import layout, padding
from lwjax.passes.compression import ESCALATION, Compression
from lwjax.passes.footprint import GraphFootprint, footprint
from lwjax.passes.partition import min_capacity, min_stages, partition_layers
from lwjax.passes.planner import (
    counted,
    epilogue_time,
    fmt_bytes,
    infeasible,
    layer_times,
    partition_inputs,
    plan_from_numbers,
)
from lwjax.passes.segment import LayerGraph
from lwjax.passes.split import heads_split, split_levels, split_numbers
from lwjax.passes.train_footprint import Training, train_footprint, training_numbers
from lwjax.plan import OBJECTIVES, LayerNumbers, Objective, Plan, Residency

MIB = 2**20
STRATEGIES: tuple[str, ...] = ("split", "compress", "microbatch")
MAX_TP = 2**14  # the largest split ``requirement`` considers when counting devices
ESCALATION_POLICIES: tuple[Compression, ...] = tuple(compression_lib.get(n) for n in ESCALATION)


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
        mode: "prefill", "decode" or "train".
        residency: "all" or "weights".
        attention: "as_traced" or "fused".
        method: "optimal" or "greedy" (``partition_layers``).
        allow: edge-case strategies permitted, in order of preference (see module docstring).
        model: model name shown in reports.
        objective: "bottleneck" or "step" (how the stage count is chosen; see
            ``planner.plan_from_numbers``). On a CPU the simulated devices share
            ``hardware.num_cores`` cores, which the step objective accounts for.
        training: how a mode="train" plan trains (schedule, optimizer); None otherwise.
        microbatch_counts: the microbatch counts the layout search may pick from besides
            the requested one (divisors of the batch); () pins the requested count.
        schedules: the schedules the layout search may pick ("gpipe"; "circular": several
            stages per device, ``passes/layout.py``); its plans run forward passes.
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
    objective: Objective = "bottleneck"
    training: Training | None = None
    microbatch_counts: tuple[int, ...] = ()
    schedules: tuple[str, ...] = ("gpipe", "circular")

    @property
    def concurrency(self) -> int | None:
        return self.hardware.num_cores if self.hardware.kind == "cpu" else None

    @property
    def searches_layout(self) -> bool:
        """Whether ``search_plan`` starts with the layout search (``passes/layout.py``): the
        step objective of a forward pass, with a split or a microbatch count to choose."""
        return (self.objective == "step" and self.mode == "prefill" and self.training is None
                and ("split" in self.allow or len(self.microbatch_counts) > 0))

    def __post_init__(self) -> None:
        unknown = [a for a in self.allow if a not in STRATEGIES]
        if unknown or len(set(self.allow)) != len(self.allow):
            raise ConfigError(f"allow={self.allow!r}: list each of {STRATEGIES} at most once, "
                              "in order of preference (e.g. allow=('split', 'compress')).")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got "
                              f"{self.objective!r}.")
        if self.residency not in ("all", "weights"):
            raise ConfigError(f"residency must be 'all' or 'weights', got {self.residency!r}.")
        if (self.mode == "train") != (self.training is not None):
            raise ConfigError(f"mode={self.mode!r} with training={self.training!r}: a Target "
                              "trains exactly when mode='train' (give training= then).")
        if self.training is not None:
            if self.compression.name != "none" or "compress" in self.allow:
                raise ConfigError("mode='train' plans uncompressed weights: training "
                                  "compressed weights is not supported; plan with "
                                  "compression=None and allow without 'compress'.")
            if self.residency != "all":
                raise ConfigError("mode='train' keeps weights, gradients, optimizer state and "
                                  "activations in device memory: plan with residency='all'.")
        if not self.device_ids or self.capacity_bytes < 1 or self.microbatch_size < 1:
            raise ConfigError(f"Target needs devices, capacity_bytes >= 1 and microbatch_size "
                              f">= 1; got {len(self.device_ids)} devices, {self.capacity_bytes}"
                              f" bytes, microbatch {self.microbatch_size}.")
        if self.batch_size % self.microbatch_size:
            raise ConfigError(f"microbatch_size {self.microbatch_size} does not divide the "
                              f"batch {self.batch_size}.")
        bad = [m for m in self.microbatch_counts if m < 1 or self.batch_size % m]
        if bad:
            raise ConfigError(f"microbatch_counts {bad} do not divide the batch "
                              f"{self.batch_size}; give divisors of it.")


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
        min_tp: the least tp with which some partition fits ``capacity_bytes``, padding
            counted.
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
                compression: str = "", microbatch_size: int = 0,
                method: str = "optimal") -> Requirement:
    """The fewest devices and the least capacity for one configuration, over splits ``tps``,
    the weight slots' padding of uneven stages counted (``passes/padding.py``).

    Args:
        numbers_at: per-device numbers at a tp (e.g. ``split_numbers`` of one graph).
        tps: splits to consider (``split_levels``); those <= ``num_devices`` count for the
            least capacity, all of them for the fewest devices.
        capacity_bytes: capacity per device for the fewest-devices question.
        num_devices: device count for the least-capacity question.
        residency: "all" or "weights".
        compression: label recorded in the result.
        microbatch_size: label recorded in the result.
        method: the partitioner's method (``partition_layers``), as the planner runs it.

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
        numbers = numbers_at(tp)
        sizes, room, reserve = partition_inputs(numbers, capacity_bytes, residency)
        heaviest = max(sizes) + reserve
        floor = heaviest if floor is None else min(floor, heaviest)
        stages = _fewest_padded_stages(numbers, sizes, room, method) \
            if heaviest <= capacity_bytes else None
        if stages is not None:
            min_tp = tp if min_tp is None else min_tp
            devices = stages * tp
            if best_dev is None or devices < best_dev[0]:
                best_dev = (devices, tp, stages)
        if tp <= num_devices:
            need = _padded_capacity(numbers, sizes, num_devices // tp, method) + reserve
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


def _padded_partition(numbers: LayerNumbers, sizes: Sequence[int], room: int, num_stages: int,
                      method: str) -> tuple[tuple[int, int], ...] | None:
    """The planner's partition into at most ``num_stages`` stages that fits ``room`` with the
    weight slots' padding (``passes/padding.py``) counted, or None."""
    costs = list(numbers.costs_s)
    try:
        return padding.fit(lambda r: partition_layers(sizes, costs, r, num_stages, method=method),
                           numbers, sizes, room)
    except InfeasiblePlanError:
        return None


def _fewest_padded_stages(numbers: LayerNumbers, sizes: Sequence[int], room: int,
                          method: str) -> int | None:
    """The fewest stages the planner's partition fits ``room`` with, padding counted; None
    when no stage count does."""
    for k in range(min_stages(sizes, room), len(sizes) + 1):
        ranges = _padded_partition(numbers, sizes, room, k, method)
        if ranges is not None:
            return len(ranges)
    return None


def _padded_capacity(numbers: LayerNumbers, sizes: Sequence[int], num_stages: int,
                     method: str) -> int:
    """A capacity with which the planner partitions all layers into ``num_stages`` stages,
    padding counted, checked on its own path (``_padded_partition``): the least without
    padding when that fits, else the smallest found by bisection up to that plus the
    weights' bytes (no stage pads more than every weight once)."""
    need = min_capacity(sizes, num_stages)
    if _padded_partition(numbers, sizes, need, num_stages, method) is not None:
        return need
    hi = need + sum(f.weights_bytes for f in (numbers.prologue, *numbers.footprints,
                                              numbers.epilogue))
    for _ in range(8):  # the refits may need more room than the bound; a checked value only
        if _padded_partition(numbers, sizes, hi, num_stages, method) is not None:
            break
        hi *= 2
    lo = need
    while hi - lo > max(1, hi // 4096):
        mid = (lo + hi) // 2
        if _padded_partition(numbers, sizes, mid, num_stages, method) is not None:
            hi = mid
        else:
            lo = mid
    return hi


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
        self._optimizer_bytes: dict = {}  # by parameter shapes, for every microbatch size
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
            fp = footprint(self.graph_at(mb), comp, attention=self.t.attention,
                           backend=self.t.hardware.kind)
            if self.t.training is not None:
                fp = train_footprint(self.graph_at(mb), fp, self.t.training,
                                     self._optimizer_bytes)
            self._fp[mb, comp] = fp
        return self._fp[mb, comp]

    def numbers(self, mb: int, comp: Compression, tp: int) -> LayerNumbers:
        if (mb, comp, tp) not in self._numbers:
            graph = self.graph_at(mb)
            t = self.t
            if (mb, comp, tp) not in self._costs:
                # A training stage's weights live in HBM unless the capacity is on chip.
                on_chip = t.training is None or t.capacity_bytes <= t.hardware.l2_bytes
                times = dict(graph=graph, hw=t.hardware, weights_on_chip=on_chip, tp=tp,
                             seg_costs=self._seg_costs.setdefault(mb, {}),
                             train=t.training is not None,
                             fp=self.fp(mb, comp) if comp.name != "none" else None)
                self._costs[mb, comp, tp] = layer_times(**times), epilogue_time(**times)
            costs, epilogue_s = self._costs[mb, comp, tp]
            numbers = split_numbers(graph, self.fp(mb, comp), costs, tp, epilogue_s)
            if t.training is not None:
                numbers = dataclasses.replace(
                    numbers, training=training_numbers(t.training, t.batch_size // mb))
            self._numbers[mb, comp, tp] = numbers
        return self._numbers[mb, comp, tp]

    def weights_fit(self, comp: Compression, tp: int) -> bool:
        """A bound that needs no retrace: do the weights alone fit at (comp, tp)?"""
        if (comp, tp) not in self._weights_fit:
            nums = self.numbers(self.t.microbatch_size, comp, tp)
            # weights (and a training plan's gradients and optimizer state)
            sizes = [_weights_etc(f) for f in nums.footprints]
            sizes[0] += _weights_etc(nums.prologue)
            sizes[-1] += _weights_etc(nums.epilogue)
            cap = self.t.capacity_bytes
            self._weights_fit[comp, tp] = max(sizes) <= cap and \
                min_stages(sizes, cap) <= self.n // tp
        return self._weights_fit[comp, tp]

    def attempt(self, mb: int, comp: Compression, tp: int, *,
                residency: Residency | None = None,
                ranges=None, virtual: int = 1) -> Plan | InfeasiblePlanError:
        """The plan at one candidate (``ranges``: with this partition), or why there is none."""
        self.tried += 1
        t = self.t
        try:
            return plan_from_numbers(
                self.numbers(mb, comp, tp), capacity_bytes=t.capacity_bytes,
                device_ids=t.device_ids, hardware=t.hardware.name, compression=comp.name,
                microbatches=t.batch_size // mb, microbatch_size=mb, mode=t.mode,
                residency=residency or t.residency, attention=t.attention, method=t.method,
                tp=tp, model=t.model, objective=t.objective, concurrency=t.concurrency,
                ranges=ranges, virtual=virtual)
        except InfeasiblePlanError as e:
            return e

    def layout_plans(self, top: int = 1) -> list[Plan]:
        """The plans of the ``top`` best layouts of ``passes/layout.py`` with distinct
        (S, tp, M), best first, at the requested compression ([] when none fits); the notes
        say what won and by how much over the runner-up and the best mesh, and for a plan
        below the first, its rank."""
        t, comp = self.t, self.t.compression
        counts = sorted({t.batch_size // t.microbatch_size, *t.microbatch_counts})
        # compressed weights run on unsplit stages only (passes/lower.py)
        tps = tuple(tp for tp in self.tps if self.weights_fit(comp, tp)
                    and (tp == 1 or comp.name == "none"))
        if not tps:
            return []
        num_layers = len(self.graph_at(t.microbatch_size).layers)
        space = layout.Space(tps, tuple(counts), self.n, num_layers, schedules=t.schedules)

        def inputs_at(m: int, tp: int) -> layout.LayoutInputs:
            mb = t.batch_size // m
            return layout.layout_inputs(self.graph_at(mb), self.numbers(mb, comp, tp),
                                        t.hardware, microbatches=m, tp=tp,
                                        capacity_bytes=t.capacity_bytes, residency=t.residency)

        ranking = layout.search_layouts(inputs_at, space)
        as_given = self.attempt(t.microbatch_size, comp, 1) if ranking.best else None
        first = as_given if isinstance(as_given, InfeasiblePlanError) else None
        plans = []
        for rank, scored in enumerate(ranking.distinct()[:max(top, 1)]):
            best = scored.layout
            mb = t.batch_size // best.microbatches
            found = self.attempt(mb, comp, best.tp, ranges=scored.ranges, virtual=best.virtual)
            if isinstance(found, InfeasiblePlanError):
                raise found  # the search checked the fit: a disagreement is a bug, not a plan
            changed = [k for k, moved in (("split", best.tp > 1),
                                          ("microbatch", mb != t.microbatch_size)) if moved]
            strategy = "+".join(k for k in dict.fromkeys((*t.allow, "microbatch"))
                                if k in changed) or "fits"
            rank_note = () if rank == 0 else (
                f"layout search: candidate {rank + 1} of the ranking, {best.describe()} at "
                f"{scored.step_s * 1e3:.3f} ms projected ({scored.step_s / ranking.best.step_s:.2f}"
                f"x the winner's)",)
            notes = (*_notes(self, first, found, best.tp, comp, mb), *found.notes,
                     *rank_note, *ranking.notes())
            plans.append(dataclasses.replace(found, strategy=strategy, notes=notes,
                                             layout_step_s=scored.step_s))
        return plans

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
    return search_plans(graph_at, target)[0]


def search_plans(graph_at: Callable[[int], LayerGraph], target: Target,
                 top: int = 1) -> list[Plan]:
    """``search_plan``, and where the layout search decides, the plans of its ``top`` best
    layouts of distinct (S, tp, M), best first (``lwjax.layerwise_shard(..., tune=k)``
    measures them); otherwise the one plan."""
    s = _Search(graph_at, target)
    if target.searches_layout:
        plans = s.layout_plans(top)
        if plans:
            return plans
    return [_edge_cases(s, target)]


def _edge_cases(s: _Search, target: Target) -> Plan:
    """The plan as given, else the first edge-case strategy candidate that fits."""
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
            notes = [*_notes(s, first, found, tp, comp, mb), (
                f"candidate {s.considered} in the search order allow={target.allow} (the last "
                f"most significant); {s.tried} evaluated, the others pruned (weights alone "
                "over the capacity)")]
            return dataclasses.replace(found, strategy=strategy, notes=tuple(notes))
    raise _nothing_fits(s, first)


def _notes(s: _Search, first: InfeasiblePlanError | None, plan: Plan, tp: int,
           comp: Compression, mb: int) -> list[str]:
    """Why the plan differs from the request: it did not fit as given (``first``), and what
    each strategy changed."""
    t = s.t
    mb0, c0 = t.microbatch_size, t.compression
    notes = [] if first is None else [
        f"as given ({c0.name}, microbatch {mb0}, one device per stage) it does not fit: "
        f"{_reason(first)}"]
    if tp > 1:
        notes.append(
            f"split: every stage spans tp={tp} devices ({counted(len(plan.stages), 'stage')} x "
            f"{tp} = {plan.num_devices} of {s.n} devices); per device: the weights passes/tp.py "
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
    return notes


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
                       microbatch_size=mb, method=t.method)
    at = f"{comp.name}, microbatch {mb}"
    if need.fewest_devices is not None:
        devices = (f"at least {need.fewest_devices} devices "
                   f"({counted(need.fewest_stages, 'stage')} x tp={need.fewest_tp}, {at})")
    elif need.floor_bytes <= cap:
        devices = (f"no number of devices: split {tps[0]}..{tps[-1]} ways ({at}), every layer "
                   "fits alone, but no partition fits with the padding of the weight slots "
                   "(every device stores a slot for each kind of weight any stage holds, e.g. "
                   "the embedding's)")
    else:
        devices = (f"no number of devices: split any of {tps[0]}..{tps[-1]} ways ({at}), the "
                   f"heaviest layer still needs {fmt_bytes(need.floor_bytes)} per device "
                   "(replicated weights and its whole [B, T, D] input)")
    parts = [devices, f"a capacity of at least {fmt_bytes(need.min_capacity_bytes)} per device on "
             f"{n} devices (tp={need.min_capacity_tp}, {at})"]
    min_comp = None
    if "compress" not in t.allow and t.training is None:
        for c in ESCALATION_POLICIES[1:]:
            if _weights(s.fp(mb, c)) < _weights(s.fp(mb, t.compression)) and any(
                    isinstance(s.attempt(mb, c, tp), Plan) for tp in s.tps):
                min_comp = c.name
                parts.append(f"compression {c.name} (not allowed here: add 'compress' to allow)")
                break
    if t.residency == "all" and t.training is None and any(
            isinstance(s.attempt(mb, c, tp, residency="weights"), Plan)
            for c in s.comps for tp in s.tps):
        parts.append("or residency='weights' (activations streamed through HBM)")
    missing = [k for k in STRATEGIES if k not in t.allow
               and not (k == "compress" and t.training)]  # training runs uncompressed
    total = len(s.tps) * len(s.comps) * len(s.mbs)
    tried = (f"split tp {'/'.join(map(str, s.tps))} x compression "
             f"{' -> '.join(c.name for c in s.comps)} x microbatch "
             f"{'/'.join(map(str, s.mbs))}")
    msg = (f"No plan fits {n} devices of {fmt_bytes(cap)} each ({t.hardware.name}, residency="
           f"{t.residency}). Tried {total} candidates ({tried}; {evaluated} evaluated, the "
           f"others have weights alone over the capacity). As given: {_reason(first)}. "
           f"What would fit: {'; '.join(parts)}."
           + (f" Not allowed: {', '.join(missing)}." if missing else ""))
    fields = {k: v for k, v in vars(first).items()}
    fields.update(capacity=cap, max_stages=n, min_devices=need.fewest_devices,
                  min_capacity=need.min_capacity_bytes, min_compression=min_comp,
                  requirement=need, tried=total)
    return infeasible(msg, **fields)



# ---- helpers --------------------------------------------------------------------------------



def _weights_etc(f) -> int:
    return f.weights_bytes + f.grad_bytes + f.optimizer_bytes


def _weights(fp: GraphFootprint) -> int:
    return sum(f.weights_bytes for f in (fp.prologue, *fp.layers, fp.epilogue))







