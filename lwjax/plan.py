"""Plan and Stage: which layers run where, what they occupy, how long they take.

A Plan is data: it prints (``summary``), serialises (``to_json`` / ``from_json``), draws
(``figure``), and re-plans without the devices you exclude (``replan``) from the per-layer
numbers it carries, without retracing the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

from lwjax.passes.cost import TRAIN_TIME_FACTOR
from lwjax.passes.footprint import Footprint
from lwjax.passes.padding import StoredArray, device_stages
from lwjax.passes.padding import padding as slot_padding
from lwjax.passes.schedules import CIRCULAR
from lwjax.passes.train_footprint import BACKWARD_FACTOR, TrainingNumbers

MIB = 2**20
Residency = Literal["all", "weights"]
PlanMode = Literal["prefill", "decode", "train"]
Objective = Literal["bottleneck", "step"]
OBJECTIVES: tuple[str, ...] = ("step", "bottleneck")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        index: position in the pipeline.
        layers: names of its layers, in order.
        layer_range: (start, stop) layer indices, half-open.
        devices: ids of the devices running it (``Plan.tp`` of them: the layers are split).
        footprint: bytes per device: its layers (plus prologue / epilogue when first / last).
        est_time_s: estimated seconds per microbatch (roofline).
    """

    index: int
    layers: tuple[str, ...]
    layer_range: tuple[int, int]
    devices: tuple[int, ...]
    footprint: Footprint
    est_time_s: float

    @property
    def tp(self) -> int:
        return len(self.devices)


@dataclasses.dataclass(frozen=True)
class LayerNumbers:
    """The per-layer inputs a plan was made from (kept so that it can re-plan), per device
    at the plan's ``tp`` (a split layer's share).

    Attributes:
        names: layer names.
        footprints: one Footprint per layer.
        prologue: the prologue's footprint (runs on the first stage).
        epilogue: the epilogue's footprint (runs on the last stage).
        costs_s: estimated seconds per layer per microbatch (the prologue folded into the
            first layer).
        epilogue_s: estimated seconds of the epilogue per microbatch; the pipeline runs it on
            the last stage after its ticks, so it is not part of any stage's tick time.
        signatures: per layer, a hash of its equations, shapes and dtypes: running the plan
            on a model whose layers differ is refused (``lwjax.plan_check``).
        outer_signatures: the same for the prologue and the epilogue (embedding, head).
        training: a training plan's schedule, optimizer and per-stage optimizer bytes (None
            unless mode="train"); ``footprints[i].stash_bytes`` is then one microbatch's.
        stored: per segment -- the prologue, each layer, the epilogue -- the arrays its
            weights are stored as, per device (split stages: a device's share); () in
            numbers made before they were recorded and for compressed weights on split
            stages (which do not run), and then the padding of uneven stages is not counted
            (``passes/padding.py``).
        cached: generation plans: per segment, the KV-cache leaves its stage keeps, as
            ``passes/kv_slots.CacheSlots`` stores them for all M groups (slots that pad
            like the weights'); () otherwise.
    """

    names: tuple[str, ...]
    footprints: tuple[Footprint, ...]
    prologue: Footprint
    epilogue: Footprint
    costs_s: tuple[float, ...]
    epilogue_s: float = 0.0
    signatures: tuple[str, ...] = ()
    outer_signatures: tuple[str, ...] = ()
    training: TrainingNumbers | None = None
    stored: tuple[tuple[StoredArray, ...], ...] = ()
    cached: tuple[tuple[StoredArray, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """A layer-wise deployment plan.

    Attributes:
        stages: the stages in pipeline order.
        capacity_bytes: on-chip bytes per device the plan fits.
        hardware: name of the HardwareSpec.
        compression: name of the compression policy used.
        microbatches: number of microbatches M.
        microbatch_size: sequences per microbatch.
        mode: "prefill", "decode" or "train" (``schedule`` and ``optimizer`` say how).
        residency: "all" (weights, activations, buffers fit) or "weights" (weights + KV fit;
            activations stream through HBM).
        attention: the attention assumption of the footprints.
        strategy: "fits" (as requested), or the edge-case strategies it took, joined by
            "+" in the order the policy allowed them ("split", "compress", "microbatch").
        notes: why, in words.
        numbers: the per-layer inputs (for replanning), per device at ``tp``.
        device_pool: every device id the plan could use, in order.
        tp: devices per stage (the layers of every stage are split over ``tp`` devices; 1:
            one device per stage). ``Stage.devices`` holds ``tp`` ids.
        model: the model's name, for reports.
        objective: how the stage count was chosen: "bottleneck" (the fewest stages with the
            smallest slowest-stage time) or "step" (the shortest projected GPipe step,
            (M + S - 1) ticks, which can favour fewer stages).
        concurrency: the cores a CPU's simulated devices share (None: every stage has its own
            device); the step objective then bounds a step by the total work.
        method: "optimal" or "greedy" partitioning; ``replan`` keeps it.
        virtual: stages per device group: 1 (GPipe), or the circular schedule's laps
            (``passes/schedules.py``): ``stages`` are S x virtual, stage k running on the
            devices of stage k mod S, which hold the weights of all their stages
            (``device_footprint``). Chosen by the layout search for forward passes.
        layout_step_s: the layout search's projected step for this layout, the figure it
            was ranked by (``passes.layout.step_seconds``: the roofline corrected by the
            hardware's tick model -- on a CPU the matmul efficiency, per-tick floors,
            shared cores, replicated work and waiting threads measured on calibration
            hosts; its absolute value also moves with ``host_cpu()``'s peak, measured in
            each process: compare layouts with it, not measurements); None where
            the layout search did not choose the plan. ``step_time_s`` is the roofline alone.
    """

    stages: tuple[Stage, ...]
    capacity_bytes: int
    hardware: str
    compression: str
    microbatches: int
    microbatch_size: int
    mode: PlanMode
    residency: Residency
    attention: str
    strategy: str
    notes: tuple[str, ...]
    numbers: LayerNumbers
    device_pool: tuple[int, ...]
    tp: int = 1
    model: str = ""
    objective: Objective = "bottleneck"
    concurrency: int | None = None
    method: str = "optimal"
    virtual: int = 1
    layout_step_s: float | None = None

    @property
    def num_devices(self) -> int:
        return sum(s.tp for s in self.stages[:self.ring])

    @property
    def ring(self) -> int:
        """S: the device groups the stages run on (the stage count unless circular)."""
        return len(self.stages) // self.virtual

    @property
    def pipeline_schedule(self) -> str:
        """The forward pass's schedule: "circular" with several stages per device, else
        "gpipe"."""
        return "circular" if self.virtual > 1 else "gpipe"

    def stages_with(self, stage: Stage) -> list[int]:
        """The stages that run on ``stage``'s devices (``padding.device_stages``): itself,
        and under the circular schedule every ``ring``-th stage.

        Example:
            >>> plan.stages_with(plan.stages[1])   # 8 stages on 4 devices x 2 laps
            [1, 5]
        """
        return device_stages(len(self.stages), self.virtual)[stage.index % self.ring]

    def device_footprint(self, stage: Stage) -> Footprint:
        """What the stage's devices hold: its footprint, plus (circular) their other
        stages' weights (``Footprint.__add__``: transient bytes the larger)."""
        total = stage.footprint
        for k in self.stages_with(stage):
            if k != stage.index:
                total = total + self.stages[k].footprint
        return total

    @property
    def schedule(self) -> str | None:
        """A training plan's pipeline schedule ("gpipe" or "1f1b"); None otherwise."""
        return self.numbers.training.schedule if self.numbers.training else None

    @property
    def optimizer(self) -> str | None:
        """A training plan's optimizer, by name; None otherwise."""
        return self.numbers.training.optimizer if self.numbers.training else None

    @property
    def bottleneck(self) -> Stage:
        """The stage with the largest estimated time (first on ties)."""
        return max(self.stages, key=lambda s: (s.est_time_s, -s.index))

    def resident_bytes(self, stage: Stage) -> int:
        """Bytes the plan requires on chip for a stage's devices under its residency policy
        (its own, with its devices' other stages under the circular schedule;
        ``device_bytes`` adds the weight and KV-cache slots' padding)."""
        f = self.device_footprint(stage)
        if self.residency == "weights":
            return f.weights_bytes + f.kv_cache_bytes
        return f.total_bytes

    @property
    def padding_bytes(self) -> tuple[int, ...]:
        """Per stage, the bytes its device stores beyond its own: one SPMD program gives
        every device the same weight slots (and in generation the same KV-cache slots), so
        a stage with fewer arrays of a kind than another holds zero rows
        (``passes/padding.py``; split stages pad alike, in slots of (shape, dtype, split
        axis)).

        Example:
            >>> plan.padding_bytes   # 16 layers on 5 stages: the 1-layer stage pads 3 layers
        """
        return slot_padding(self.numbers, [s.layer_range for s in self.stages], self.virtual)

    def device_bytes(self, stage: Stage) -> int:
        """What the stage's device holds on chip: ``resident_bytes`` plus the padding."""
        return self.resident_bytes(stage) + self.padding_bytes[stage.index]

    @property
    def step_time_s(self) -> float:
        """Projected seconds of one step of the whole batch (``step_time``)."""
        return step_time([s.layer_range for s in self.stages], self.numbers.costs_s,
                         self.microbatches, self.concurrency, self.numbers.epilogue_s, self.tp,
                         self.virtual)

    @property
    def ticks(self) -> int:
        """The schedule's tick count: M + S - 1 (GPipe), the circular table's otherwise."""
        return schedule_ticks(self.ring, self.microbatches, self.virtual)

    @property
    def outside_weights_share(self) -> float:
        """Share of the weight bytes in the prologue and epilogue (embedding, head): what the
        partition cannot spread over stages. Counted per segment, as the stages hold them: a
        weight two segments read (an embedding tied to the head, a block shared by the
        layers) counts in each, so this can exceed ``analyze``'s ``outside_weights_share``,
        which counts every parameter once.

        Example:
            >>> f"{plan.outside_weights_share:.1%} of the weights sit outside the layers"
        """
        n = self.numbers
        outside = n.prologue.weights_bytes + n.epilogue.weights_bytes
        total = outside + sum(f.weights_bytes for f in n.footprints)
        return outside / total if total else 0.0

    def summary(self) -> str:
        """The plan as a table: layers -> stage -> devices, bytes per device vs capacity,
        fill, projected time, the bottleneck marked.

        Example:
            >>> print(plan.summary())
        """
        cap = self.capacity_bytes
        split = f", tp={self.tp} devices per stage" if self.tp > 1 else ""
        model = f" for {self.model}" if self.model else ""
        spans = [layer_span(s.layers) for s in self.stages]
        ids = [_ids(s.devices) for s in self.stages]
        w_layers = max(len("layers"), *map(len, spans))
        w_ids = max(len("devices"), *map(len, ids))
        laps = (f" ({self.ring} device groups x {self.virtual} laps, circular schedule)"
                if self.virtual > 1 else "")
        lines = [
            f"Plan: {_count(len(self.stages), 'stage')}{laps} on {self.num_devices} of "
            f"{len(self.device_pool)} devices ({self.hardware}){model}{split}, capacity "
            f"{cap / MIB:.2f} MiB/device, "
            f"compression={self.compression}, M={self.microbatches} x {self.microbatch_size}, "
            f"mode={self.mode}, residency={self.residency}, attention={self.attention}, "
            f"bytes on {self.stages[0].footprint.backend}",
            f"strategy: {self.strategy}",
            *[f"  - {n}" for n in self.notes],
            f"  - {100 * self.outside_weights_share:.1f}% of the weight bytes the segments read "
            "are the prologue's (on the first stage) and the epilogue's (on the last); a weight "
            "read in several segments (a tied embedding) counts in each",
            *self._training_lines(),
            f"{'stage':>5} {'layers':<{w_layers}} {'devices':<{w_ids}} "
            + " ".join(f"{head:>{width}}" for head, width, _ in self._columns())
            + f" {'fill %':>7} {'est ms':>9}",
        ]
        slow = self.bottleneck.index
        for s, span, id_list in zip(self.stages, spans, ids, strict=True):
            lines.append(
                f"{s.index:>5} {span:<{w_layers}} {id_list:<{w_ids}} "
                + " ".join(f"{count(s.footprint) / MIB:>{width}.2f}"
                           for _, width, count in self._columns())
                + f" {100 * self.device_bytes(s) / cap:>7.1f} {s.est_time_s * 1e3:>9.3f}"
                + ("  <- bottleneck" if s.index == slow else ""))
        ticks = self.ticks
        epilogue = self.microbatches * self.numbers.epilogue_s
        shared = self.concurrency and self.step_time_s - epilogue > (
            ticks * self.bottleneck.est_time_s * (1 + 1e-9))
        circular = ([f"circular: each device group runs {self.virtual} stages (stage k on the "
                     f"devices of stage k mod {self.ring}) and holds all their weights: fill % "
                     "is the group's"] if self.virtual > 1 else [])
        lines += [
            *circular,
            *self._padding_lines(),
            "(MiB per device; fill % counts what the residency policy keeps on chip, the "
            "padding included; est ms: projected roofline per microbatch, excluding the "
            "epilogue; not measured)",
            f"projected {_step_name(self.schedule, self.virtual)}: {ticks} ticks x "
            f"{self.bottleneck.est_time_s * 1e3:.3f} ms "
            f"(stage {slow})"
            + (" [the stages share one host's cores: M x all stages' time instead]"
               if shared else "")
            + f" + epilogue {self.microbatches} x {self.numbers.epilogue_s * 1e3:.3f} ms "
            f"= {self.step_time_s * 1e3:.3f} ms, transfers excluded (the roofline alone)",
        ]
        if self.layout_step_s is not None:
            lines.append(
                f"layout search's projected step: {self.layout_step_s * 1e3:.3f} ms (the "
                "roofline corrected by the hardware's tick model, transfers and per-tick "
                "floors included: the figure this layout was ranked by; not measured)")
        if self.schedule == "1f1b":  # lockstep ticks: see passes/train_cost.py
            backward = (TRAIN_TIME_FACTOR - 1) / TRAIN_TIME_FACTOR * self.bottleneck.est_time_s
            lockstep = 2 * ticks * backward + epilogue
            lines.append(
                f"1F1B in one SPMD program runs in lockstep: its steady ticks mix forwards and "
                f"backwards, so each lasts a backward: about {2 * ticks} ticks x "
                f"{backward * 1e3:.3f} ms + epilogue = {lockstep * 1e3:.3f} ms (GPipe: the "
                "line above); 1F1B saves stash memory, not time")
        return "\n".join(lines)

    def _columns(self) -> list[tuple[str, int, Callable[[Footprint], int]]]:
        """The byte columns of ``summary``: (heading, width, bytes of a stage's footprint)."""
        if self.mode == "train":
            return [("weights", 10, lambda f: f.weights_bytes),
                    ("grads", 10, lambda f: f.grad_bytes),
                    ("opt state", 10, lambda f: f.optimizer_bytes),
                    ("stash", 10, lambda f: f.stash_bytes),
                    ("activ.", 10, lambda f: f.activation_bytes + f.buffer_bytes),
                    ("backward", 10, lambda f: f.backward_bytes)]
        return [("weights", 10, lambda f: f.weights_bytes),
                ("activ.", 10, lambda f: f.activation_bytes),
                ("buffers", 9, lambda f: f.buffer_bytes),
                ("kv", 9, lambda f: f.kv_cache_bytes)]

    def _padding_lines(self) -> list[str]:
        pads = self.padding_bytes
        if not any(pads):
            return []
        if self.virtual > 1:  # one figure per device, beyond all of its stages' own
            parts = [f"device {self.stages[d].devices[0]} (stages "
                     f"{','.join(map(str, self.stages_with(self.stages[d])))}) +{_amount(pads[d])}"
                     for d in range(self.ring) if pads[d]]
            return ["weight slots: one SPMD program gives every device the same weight arrays, "
                    "so a device with fewer weights of a kind stores zero rows (counted in fill "
                    "%): " + ", ".join(parts)]
        runs: list[list[int]] = []  # consecutive stages with the same padding
        for k, p in enumerate(pads):
            if runs and pads[runs[-1][-1]] == p:
                runs[-1].append(k)
            else:
                runs.append([k])
        parts = [(f"stage {r[0]}" if len(r) == 1 else f"stages {r[0]}-{r[-1]}")
                 + f" +{_amount(pads[r[0]])}" for r in runs if pads[r[0]]]
        if self.numbers.cached:
            return ["weight and KV-cache slots: one SPMD program gives every device the same "
                    "weight and cache arrays, so a stage with fewer of a kind stores zero rows "
                    "(counted in fill %): " + ", ".join(parts)]
        return ["weight slots: one SPMD program gives every device the same weight arrays, so "
                "a stage with fewer weights of a kind stores zero rows (counted in fill %): "
                + ", ".join(parts)]

    def _training_lines(self) -> list[str]:
        t = self.numbers.training
        if t is None:
            return []
        return [
            f"training: schedule={t.schedule}, optimizer={t.optimizer}; per stage: grads (the "
            "parameters' dtypes), optimizer state (measured with optimizer.init), stash = "
            f"{t.stash_slots(len(self.stages))} of M={self.microbatches} microbatches' stage "
            "inputs (rematerialised), activ. = forward peak, backward = what one "
            f"microbatch's recompute + backward keeps beyond it ({BACKWARD_FACTOR}x the "
            f"forward peak per layer); est ms = forward + recompute + backward "
            f"({TRAIN_TIME_FACTOR}x the forward)"]

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        """The plan as JSON, round-trippable with ``Plan.from_json``.

        Example:
            >>> Plan.from_json(plan.to_json()) == plan
            True
        """
        from lwjax.plan_json import encode

        return encode(self)

    @staticmethod
    def from_json(text: str) -> Plan:
        """Inverse of ``to_json``.

        Raises:
            PlanFormatError: the text is not JSON, or a field is missing, unknown, of the
                wrong type or inconsistent (the message names it).

        Example:
            >>> Plan.from_json(plan.to_json()) == plan
            True
        """
        from lwjax.plan_json import decode

        return decode(text)

    def figure(self, path: str, *, title: str | None = None) -> str:
        """Writes a PNG: per-device stacked bars (weights, activations, buffers, KV) against
        the capacity line (log scale when the bars dwarf it). Returns the path.

        Example:
            >>> plan.figure("plan.png")
            'plan.png'
        """
        from lwjax.plan_figure import plan_figure

        return plan_figure(self, path, title=title)

    def replan(self, exclude_devices=(), spare_devices=()) -> Plan:
        """A new plan without ``exclude_devices`` (e.g. failed ones), optionally adding
        ``spare_devices`` to the pool; re-partitions from the stored per-layer numbers.

        Raises:
            InfeasiblePlanError: the remaining devices cannot hold the model.

        Example:
            >>> new = plan.replan(exclude_devices=[3], spare_devices=[16])
        """
        from lwjax.passes.planner import replan

        return replan(self, exclude_devices=exclude_devices, spare_devices=spare_devices)


def layer_span(layers: Sequence[str]) -> str:
    """A stage's layers in a table cell: the first and the last name, the last without the
    path components they share; whole names, never cut.

    Example:
        >>> layer_span(["MyGPT/block_0", "MyGPT/block_1", "MyGPT/block_5"])
        'MyGPT/block_0..block_5'
        >>> layer_span(["model/layers/0", "model/layers/1"])
        'model/layers/0..1'
        >>> layer_span(["layers_3"])
        'layers_3'
    """
    if len(layers) == 1:
        return layers[0]
    first, last = layers[0].split("/"), layers[-1].split("/")
    shared = 0
    while shared < min(len(first), len(last)) - 1 and first[shared] == last[shared]:
        shared += 1
    return f"{layers[0]}..{'/'.join(last[shared:])}"


def _step_name(schedule: str | None, virtual: int = 1) -> str:
    """How ``summary`` names the step: 'GPipe step' (inference), 'circular step',
    'GPipe training step', '1F1B training step' (the same tick count: 1F1B reorders the
    ticks, same bubble)."""
    if schedule is None:
        return "circular step" if virtual > 1 else "GPipe step"
    return f"{'GPipe' if schedule == 'gpipe' else schedule.upper()} training step"


def _count(n: int, noun: str) -> str:
    """(1, 'stage') -> '1 stage'; (3, 'stage') -> '3 stages'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ids(ids: tuple[int, ...]) -> str:
    """(4, 5, 6, 7) -> '4-7'; otherwise comma-separated."""
    if len(ids) > 2 and list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def schedule_ticks(ring: int, microbatches: int, virtual: int = 1) -> int:
    """Ticks of a forward step over ``ring`` device groups: M + S - 1 (GPipe, ``virtual``
    1), else the circular schedule's (``virtual x M + S - 1`` when S divides M).

    Example:
        >>> schedule_ticks(8, 8, virtual=2)
        23
    """
    if virtual == 1:
        return microbatches + ring - 1
    return int(CIRCULAR.output_ticks(ring, microbatches, virtual)[-1]) + 1


def step_time(ranges: Sequence[tuple[int, int]], costs_s: Sequence[float], microbatches: int,
              concurrency: int | None = None, epilogue_s: float = 0.0, tp: int = 1,
              virtual: int = 1) -> float:
    """Projected GPipe step: (M + S - 1) ticks of the slowest stage, then the last stage's
    epilogue (final norm, LM head) on the M microbatches, ``M x epilogue_s``. When the stages
    share one host's cores (``concurrency``, a CPU's simulated devices; stage times are then
    whole-host times) the work itself bounds the ticks too: M microbatches x all stages' time
    on all ``tp`` devices of each (``costs_s`` are one device's share of a split stage).

    Example:
        >>> step_time([(0, 1), (1, 2)], [1.0, 1.0], microbatches=4)   # 5 ticks of 1 s
        5.0
        >>> step_time([(0, 1), (1, 2)], [1.0, 1.0], microbatches=4, concurrency=2)  # 4 x 2 s
        8.0
    """
    times = [sum(costs_s[a:b]) for a, b in ranges]
    step = schedule_ticks(len(times) // virtual, microbatches, virtual) * max(times)
    if concurrency:
        step = max(step, microbatches * tp * sum(times))
    return step + microbatches * epilogue_s


def _amount(num_bytes: int) -> str:
    return f"{num_bytes / MIB:.2f} MiB" if num_bytes >= MIB // 100 else f"{num_bytes:,} B"
