"""What every device of a pipeline stores of the weights, predicted from the plan's numbers,
so that a plan counts it against the capacity.

One SPMD program gives every device arrays of the same shapes. The weights sit in slots
(``passes/storage.SlotStorage``): one ``[S, n]`` array per (dtype, element count), a
stage's j-th array of a key in slot j, read as a bitcast of the device's row. A device
therefore stores the sum of the slots' sizes:

- at least the largest stage's own weights, whatever its own stage holds: 16 layers on 5
  stages of 3 or 4 layers store 4 layers' weights on every device;
- more where stages hold different kinds of weights (an embedding on the first stage that
  no other stage's slot can take): the slots' sum exceeds every single stage's weights.

A layout that stored only the largest stage's bytes (one flat buffer per dtype, each weight
a static slice of it) reads a weight as a slice, and XLA:CPU copies the slice on every tick
(``python experiments/packed_weights.py`` measures it), which is what the slots avoid. So the
slots stay, and the planner counts what they store: ``padding`` per stage, ``overflow``
against a room, ``fit`` to re-partition until the padded stages fit.

Example:
    >>> pad = padding(numbers, [(0, 3), (3, 7)])     # bytes beyond each stage's own
    >>> stored_bytes(numbers, [(0, 3), (3, 7)])      # what every device stores
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from lwjax.errors import InfeasiblePlanError
from lwjax.passes.storage import assign_slots

if TYPE_CHECKING:
    from lwjax.plan import LayerNumbers

Range = tuple[int, int]
MAX_REFITS = 64


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """One array a pipeline stores for a weight (the weight itself, or one of its codec's
    arrays when compressed): which graph parameter, its dtype and element count per device.
    ``passes/padding.py`` predicts each device's weight slots from these.

    In a stage split over tp (``passes/storage.SplitStorage``) arrays share a slot only with
    arrays of the same whole ``shape``, dtype and split ``axis`` (None: replicated), and
    ``size`` is a device's share; ``shape`` is None in unsplit stages (``SlotStorage``:
    slots of one dtype and element count)."""

    param: int
    dtype: str
    size: int
    shape: tuple[int, ...] | None = None
    axis: int | None = None

    @property
    def key(self) -> tuple:
        """The slot key: arrays of one key on different stages share slots."""
        if self.shape is None:
            return (self.dtype, self.size)
        return (self.dtype, self.size, self.shape, -1 if self.axis is None else self.axis)


def stage_arrays(numbers: LayerNumbers, start: int, stop: int,
                 num_layers: int, per_segment=None) -> list[StoredArray]:
    """The arrays a stage running layers [start, stop) stores, in the lowering's order: its
    segments' weights (the prologue's on the first stage, the epilogue's on the last), each
    weight once; or, given ``per_segment`` (``numbers.cached``), its cache leaves.

    Example:
        >>> [a.param for a in stage_arrays(numbers, 0, 1, 4)]   # prologue + layer 0
    """
    per_segment = numbers.stored if per_segment is None else per_segment
    segs = list(per_segment[1 + start:1 + stop])
    if start == 0:
        segs.insert(0, per_segment[0])
    if stop == num_layers:
        segs.append(per_segment[-1])
    return _each_weight_once(segs)


def _each_weight_once(groups: Sequence[Sequence[StoredArray]]) -> list[StoredArray]:
    """The arrays of ``groups`` (segments, or a device's stages), a weight's arrays once:
    from its first group that stores it."""
    seen: dict[int, list[StoredArray]] = {}
    for group in groups:
        mine: dict[int, list[StoredArray]] = {}
        for a in group:
            mine.setdefault(a.param, []).append(a)
        for param, arrays in mine.items():
            seen.setdefault(param, arrays)
    return [a for arrays in seen.values() for a in arrays]


def _nbytes(a: StoredArray) -> int:
    return a.size * np.dtype(a.dtype).itemsize


def stored_bytes(numbers: LayerNumbers, ranges: Sequence[Range], virtual: int = 1
                 ) -> int | None:
    """Bytes of weights every device stores under ``ranges``: the slots' sizes summed
    (None when the numbers do not say how weights are stored: ``LayerNumbers.stored``).
    ``virtual`` > 1: the circular schedule's stages per device (``device_stages``).

    Example:
        >>> stored_bytes(numbers, [(0, 2), (2, 4)])
    """
    if not numbers.stored:
        return None
    return _slots_bytes(_held(numbers, ranges, numbers.stored, virtual))


def device_stages(num_stages: int, virtual: int = 1) -> list[list[int]]:
    """Per device, the stages it runs: stage k on device k mod S, S = stages / ``virtual``
    (the circular schedule's laps; 1: one stage each).

    Example:
        >>> device_stages(4, virtual=2)
        [[0, 2], [1, 3]]
    """
    ring = num_stages // virtual
    return [list(range(d, num_stages, ring)) for d in range(ring)]


def padding(numbers: LayerNumbers, ranges: Sequence[Range], virtual: int = 1
            ) -> tuple[int, ...]:
    """Per stage, the bytes its device stores beyond its own (zero rows of slots that other
    stages fill): the weights' (all zero when the numbers do not say), plus a generation
    plan's KV-cache slots' (``cache_padding``). A training plan's gradients and optimizer
    state live in the weights' slots, so they pad alike.

    With ``virtual`` > 1 a device holds several stages (``device_stages``): each stage's
    entry is its device's padding, beyond all of that device's stages' own.

    Example:
        >>> padding(numbers, [(0, 1), (1, 4)])   # the 1-layer stage stores 3 layers' more
    """
    kv = cache_padding(numbers, ranges, virtual)
    if not numbers.stored:
        return kv
    factor = _state_factor(numbers)
    weights = _beyond_own(numbers, ranges, numbers.stored, virtual)
    return tuple(w * factor + k for w, k in zip(weights, kv, strict=True))


def cache_padding(numbers: LayerNumbers, ranges: Sequence[Range], virtual: int = 1
                  ) -> tuple[int, ...]:
    """Per stage, the KV-cache bytes its device allocates beyond its own leaves: the cache
    slots (``passes/kv_slots.CacheSlots``, one per dtype and size, as the weights') hold
    zero rows where a stage keeps fewer leaves of a kind; all zero without ``cached``.

    Example:
        >>> cache_padding(numbers, [(0, 3), (3, 4)])   # the 1-layer stage: 2 layers' caches
    """
    if not numbers.cached:
        return (0,) * len(ranges)
    return _beyond_own(numbers, ranges, numbers.cached, virtual)


def _held(numbers: LayerNumbers, ranges: Sequence[Range], per_segment, virtual: int = 1
          ) -> list[list]:
    """Per device, the arrays it stores: its stages', each weight once."""
    n = len(numbers.names)
    per_stage = [stage_arrays(numbers, a, b, n, per_segment) for a, b in ranges]
    if virtual == 1:
        return per_stage
    return [_each_weight_once([per_stage[k] for k in stages])
            for stages in device_stages(len(ranges), virtual)]


def _slots_bytes(held: Sequence[Sequence[StoredArray]]) -> int:
    """Bytes of the slots the stages' arrays share (``storage.assign_slots``)."""
    slots, _ = assign_slots([[a.key for a in arrays] for arrays in held])
    return sum(key[1] * np.dtype(key[0]).itemsize for key, _ in slots)


def _beyond_own(numbers: LayerNumbers, ranges: Sequence[Range], per_segment,
                virtual: int = 1) -> tuple[int, ...]:
    """Per stage, the slots' bytes beyond its device's own arrays (``per_segment``: stored
    or cached)."""
    held = _held(numbers, ranges, per_segment, virtual)
    total = _slots_bytes(held)
    beyond = [total - sum(map(_nbytes, arrays)) for arrays in held]
    return tuple(beyond[k % len(held)] for k in range(len(ranges)))


def _state_factor(numbers: LayerNumbers) -> int:
    """How many copies of the weights' slots a device holds: 1, and in training the
    gradients (one) and the optimizer's per-weight state (its bytes per weight byte)."""
    if numbers.training is None:
        return 1
    fps = (numbers.prologue, *numbers.footprints, numbers.epilogue)
    weights = sum(f.weights_bytes for f in fps)
    state = sum(f.optimizer_bytes for f in fps)
    return 2 + (-(-state // weights) if weights else 0)


def overflow(numbers: LayerNumbers, ranges: Sequence[Range], sizes: Sequence[int],
             room: int, virtual: int = 1) -> int:
    """How far the most over-full device exceeds ``room`` once padding is counted (<= 0: all
    fit): its stages' additive ``sizes`` (``planner.partition_inputs``) plus its padding
    (``virtual`` > 1: several stages per device, ``device_stages``).

    Example:
        >>> overflow(numbers, ranges, sizes, room) <= 0
        True
    """
    pads = padding(numbers, ranges, virtual)
    return max(sum(sum(sizes[slice(*ranges[k])]) for k in stages) + pads[stages[0]]
               for stages in device_stages(len(ranges), virtual)) - room


def fit(partition: Callable[[int], tuple[Range, ...]], numbers: LayerNumbers,
        sizes: Sequence[int], room: int) -> tuple[Range, ...]:
    """``partition(room)``, re-run with less room until its stages fit ``room`` with their
    padding. Each round takes the overflow off the room, so a stage that fits only with
    its padding counted gets smaller; ``partition``'s InfeasiblePlanError ends the search
    (the message says what the padding needs).

    Example:
        >>> ranges = fit(lambda r: partition_layers(sizes, costs, r, 4), numbers, sizes, room)
    """
    budget = room
    for _ in range(MAX_REFITS):
        try:
            ranges = partition(budget)
        except InfeasiblePlanError as e:
            if budget == room:
                raise
            raise _padded_infeasible(room, budget, getattr(e, "max_stages", None)) from None
        over = overflow(numbers, ranges, sizes, room)
        if over <= 0:
            return ranges
        # less room by the overflow, and below this partition's largest stage, so that the
        # next round cannot return the same partition
        budget = min(budget - over, max(sum(sizes[a:b]) for a, b in ranges) - 1)
        if budget <= 0:
            break
    raise _padded_infeasible(room, max(budget, 0), None)


def _padded_infeasible(room: int, budget: int, max_stages: int | None) -> InfeasiblePlanError:
    """The error when only the padding stops a partition: ``padded`` tells the planner not
    to restate it as a layer's or a stage count's need (it adds the reserve)."""
    within = f"at most {max_stages} stages" if max_stages else "the stages allowed"
    out = InfeasiblePlanError(
        f"No partition into {within} fits once the slots' padding is counted: one SPMD "
        "program gives every device the same weight (and, generating, KV-cache) arrays, so "
        "a stage with fewer of a kind than another stores zero rows for them. Partitions "
        "without "
        f"padding fit the {room:,} bytes per device left beside the activation reserve, but "
        f"with it every one tried overflows (the last allowed {budget:,} bytes for a "
        "stage's own; the search re-fits with less room and is not exhaustive). Give more "
        "capacity or more devices, or compress the weights.")
    out.capacity, out.max_stages, out.padded = room, max_stages, True
    return out
