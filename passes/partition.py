"""Partition a model's layers into contiguous pipeline stages that fit one cache each.

A plan is a tuple of half-open ``(start, stop)`` layer ranges that cover ``0..n`` in
order. Each range's summed size must fit ``capacity`` bytes and there may be at most
``max_stages`` ranges. This module is pure: numbers in, ranges out, no JAX.

Algorithm (``method="optimal"``). Minimise the bottleneck, the largest summed stage cost,
exactly; among optimal plans take the fewest stages, then the smallest largest stage size.

* Exact arithmetic. Costs are turned into integers over one common denominator (a float
  is an exact dyadic fraction), so a stage cost is one exact number, a prefix-sum
  difference, and :func:`bottleneck` rounds it to ``float`` once.
* Feasibility probe. For limits (cost ``B``, size ``C``) the greedy packing that makes each
  stage as long as both limits allow uses the fewest stages, because both constraints are
  monotone on contiguous ranges of non-negative values. Each stage end is two bisections
  on prefix sums and the probe stops after ``k = max_stages`` stages: O(min(k, n) log n).
* Parametric search. The optimum ``B*`` is a contiguous range sum. Keep ``lo`` infeasible
  and ``hi`` feasible; count the range sums strictly between them (two bisections per
  prefix, O(n log n)); draw 63 of them uniformly at random (a seeded local generator that
  only steers the search: the result does not depend on it) and bisect among them with the
  probe. Each round keeps an expected 1/32 of the candidates, so after O(log n) rounds
  (three to five in practice) at most 4n remain; list them and bisect. Expected time
  O(n log^2 n) (about 50 probes in all for n = 10,000), memory O(n).
* Tie-breaks. With ``s*`` stages (the probe's count at ``B*``), the smallest largest size is
  the same search with the roles swapped: the least ``C*`` such that the probe at
  ``(B*, C*)`` needs at most ``s*`` stages. The plan is the greedy packing at ``(B*, C*)``,
  so it is deterministic (each stage as long as possible, from the left).

``method="greedy"`` is the first-fit fallback: walk the layers in order and open a new stage
when the next layer would overflow ``capacity``; costs are ignored. It is feasible exactly
when an optimal plan is.
"""

from __future__ import annotations

import math
import numbers
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate
from operator import sub
from typing import Literal

from lwjax.errors import ConfigError, InfeasiblePlanError

Method = Literal["optimal", "greedy"]
Range = tuple[int, int]
_METHODS: tuple[str, ...] = ("optimal", "greedy")
_MIB = 2**20
_SAMPLES_PER_ROUND = 63
_ENUMERATE_PER_LAYER = 4  # list the candidates once at most this many per layer remain
_SEED = 0
# Set on every InfeasiblePlanError raised here (None where it does not apply), so a planner
# can read the numbers without parsing the message.
_INFEASIBLE_FIELDS = (
    "layer_index",
    "layer_name",
    "layer_bytes",
    "capacity",
    "max_stages",
    "min_stages",
    "min_capacity",
)


def partition_layers(
    sizes: Sequence[int],
    costs: Sequence[float],
    capacity: int,
    max_stages: int,
    *,
    method: Method = "optimal",
    names: Sequence[str] | None = None,
) -> tuple[Range, ...]:
    """Splits layers into contiguous stages that each fit ``capacity`` bytes.

    Args:
        sizes: Bytes each layer needs in the cache (non-negative integers).
        costs: Time of each layer (non-negative, finite); same length as ``sizes``.
        capacity: Bytes one stage may hold (a positive integer).
        max_stages: Most stages the plan may use (a positive integer).
        method: ``"optimal"`` minimises the largest stage cost exactly (ties: fewest
            stages, then smallest largest stage size); ``"greedy"`` is first-fit on sizes.
        names: Layer names for error messages; default ``layer {i}``.

    Returns:
        Half-open ``(start, stop)`` ranges covering ``0..len(sizes)`` in order.

    Raises:
        ConfigError: An argument is invalid (the message names it and its value).
        InfeasiblePlanError: A layer exceeds ``capacity`` on its own, or more than
            ``max_stages`` stages are needed. The instance carries ``layer_index``,
            ``layer_name``, ``layer_bytes``, ``capacity``, ``max_stages``, ``min_stages``
            and ``min_capacity`` (``None`` where not applicable).

    Example:
        >>> partition_layers([1, 1, 1, 1], [5, 1, 1, 5], capacity=4, max_stages=3)
        ((0, 1), (1, 3), (3, 4))
    """
    layer_bytes = _checked_sizes(sizes)
    scaled_costs, _ = _exact_costs(costs)
    if len(scaled_costs) != len(layer_bytes):
        raise ConfigError(
            f"costs has {_entries(len(scaled_costs))} but sizes has {_entries(len(layer_bytes))}; "
            "give one cost per layer"
        )
    capacity = _checked_positive_int(capacity, "capacity")
    max_stages = _checked_positive_int(max_stages, "max_stages")
    if method not in _METHODS:
        raise ConfigError(f"method = {method!r} is unknown; use one of {_METHODS}")
    names = _checked_names(names, len(layer_bytes))

    size_prefix = _prefix_sums(layer_bytes)
    _require_layers_fit(layer_bytes, size_prefix, capacity, max_stages, names)
    first_fit = _greedy_stops(((size_prefix, capacity),), max_stages)
    if first_fit is None:
        raise _too_many_stages(size_prefix, capacity, max_stages)
    if method == "greedy":
        return _ranges(first_fit)
    return _ranges(_optimal_stops(size_prefix, _prefix_sums(scaled_costs), capacity, max_stages))


def min_stages(sizes: Sequence[int], capacity: int, *, names: Sequence[str] | None = None) -> int:
    """Fewest contiguous stages whose summed sizes each fit ``capacity``.

    Args:
        sizes: Bytes per layer (non-negative integers).
        capacity: Bytes one stage may hold (a positive integer).
        names: Layer names for error messages; default ``layer {i}``.

    Returns:
        The stage count of first-fit packing, which is the minimum.

    Raises:
        ConfigError: An argument is invalid.
        InfeasiblePlanError: A layer alone exceeds ``capacity``.

    Example:
        >>> min_stages([6, 6, 6, 6, 6], capacity=12)
        3
    """
    layer_bytes = _checked_sizes(sizes)
    capacity = _checked_positive_int(capacity, "capacity")
    size_prefix = _prefix_sums(layer_bytes)
    names = _checked_names(names, len(layer_bytes))
    _require_layers_fit(layer_bytes, size_prefix, capacity, None, names)
    return len(_greedy_stops(((size_prefix, capacity),), len(layer_bytes)) or ())


def min_capacity(sizes: Sequence[int], num_stages: int) -> int:
    """Smallest capacity (bytes) with which ``num_stages`` contiguous stages hold all layers.

    Args:
        sizes: Bytes per layer (non-negative integers).
        num_stages: Stages available (a positive integer).

    Returns:
        The exact minimum of the largest stage size over all plans with at most
        ``num_stages`` stages.

    Example:
        >>> min_capacity([6, 6, 6, 6, 6], num_stages=2)
        18
    """
    layer_bytes = _checked_sizes(sizes)
    num_stages = _checked_positive_int(num_stages, "num_stages")
    return _min_capacity(_prefix_sums(layer_bytes), num_stages)


def bottleneck(ranges: Sequence[Range], costs: Sequence[float]) -> float:
    """Largest summed cost over ``ranges``, summed exactly and rounded to float once.

    Args:
        ranges: Half-open ``(start, stop)`` layer ranges, e.g. from ``partition_layers``.
        costs: Time of each layer (non-negative, finite).

    Returns:
        The bottleneck stage cost.

    Example:
        >>> bottleneck(((0, 1), (1, 3), (3, 4)), [0.1, 0.2, 0.3, 0.4])
        0.5
    """
    scaled_costs, denominator = _exact_costs(costs)
    if len(ranges) == 0:
        raise ConfigError("ranges is empty; give at least one (start, stop) range")
    prefix = _prefix_sums(scaled_costs)
    for start, stop in ranges:
        if not 0 <= start < stop <= len(scaled_costs):
            raise ConfigError(
                f"range ({start}, {stop}) is not a non-empty slice of {len(scaled_costs)} layers"
            )
    return max(prefix[stop] - prefix[start] for start, stop in ranges) / denominator


def _optimal_stops(
    size_prefix: list[int], cost_prefix: list[int], capacity: int, max_stages: int
) -> list[int]:
    """Stage stops minimising (bottleneck cost, stage count, largest size), leftmost-greedy."""
    rng = random.Random(_SEED)
    n = len(size_prefix) - 1
    best_cost = _least_feasible_sum(
        cost_prefix,
        lower=max(_largest_step(cost_prefix), -(-cost_prefix[n] // max_stages)),
        upper=cost_prefix[n],
        is_feasible=lambda b: _fits(cost_prefix, b, size_prefix, capacity, max_stages),
        rng=rng,
    )
    num_stages = len(_greedy_stops(((cost_prefix, best_cost), (size_prefix, capacity)), n) or ())
    best_size = _least_feasible_sum(
        size_prefix,
        lower=max(_largest_step(size_prefix), -(-size_prefix[n] // num_stages)),
        upper=min(capacity, size_prefix[n]),
        is_feasible=lambda c: _fits(cost_prefix, best_cost, size_prefix, c, num_stages),
        rng=rng,
    )
    return _greedy_stops(((cost_prefix, best_cost), (size_prefix, best_size)), num_stages) or []


def _min_capacity(size_prefix: list[int], num_stages: int) -> int:
    """Least largest-stage size over plans with at most ``num_stages`` stages."""
    n = len(size_prefix) - 1
    return _least_feasible_sum(
        size_prefix,
        lower=max(_largest_step(size_prefix), -(-size_prefix[n] // num_stages)),
        upper=size_prefix[n],
        is_feasible=lambda c: _greedy_stops(((size_prefix, c),), num_stages) is not None,
        rng=random.Random(_SEED),
    )


def _fits(cost_prefix: list[int], cost: int, size_prefix: list[int], size: int, limit: int) -> bool:
    """Whether greedy packing under both limits needs at most ``limit`` stages."""
    return _greedy_stops(((cost_prefix, cost), (size_prefix, size)), limit) is not None


def _greedy_stops(limits: Sequence[tuple[list[int], int]], max_count: int) -> list[int] | None:
    """Stops of the packing that makes each stage as long as every (prefix, limit) allows.

    Returns None when more than ``max_count`` stages are needed or one layer alone breaks
    a limit. Each stage costs one bisection per limit.
    """
    n = len(limits[0][0]) - 1
    stops: list[int] = []
    start = 0
    while start < n:
        if len(stops) == max_count:
            return None
        stop = n
        for prefix, limit in limits:
            stop = min(stop, bisect_right(prefix, prefix[start] + limit, start, n + 1) - 1)
        if stop == start:
            return None
        stops.append(stop)
        start = stop
    return stops


def _least_feasible_sum(
    prefix: list[int],
    lower: int,
    upper: int,
    is_feasible: Callable[[int], bool],
    rng: random.Random,
) -> int:
    """Least range sum ``prefix[j] - prefix[i]`` that is feasible (see the module docstring).

    Requires: ``is_feasible`` is monotone, the answer is a range sum, ``lower`` is at most the
    answer and ``upper`` is feasible.
    """
    if is_feasible(lower):
        return lower
    lo, hi = lower, upper  # answer in (lo, hi]
    while True:
        # Row j holds the sums prefix[j] - prefix[i] in (lo, hi), for i in [first, last);
        # lo >= 0 keeps i < j.
        firsts = [bisect_right(prefix, p - hi) for p in prefix]
        lasts = [bisect_left(prefix, p - lo) for p in prefix]
        counts = list(map(sub, lasts, firsts))
        total = sum(counts)
        if total <= _ENUMERATE_PER_LAYER * len(prefix):
            rows = zip(prefix, firsts, lasts, strict=True)
            values = {p - prefix[i] for p, first, last in rows for i in range(first, last)}
            candidates = sorted(values) + [hi]
            return candidates[_first_feasible(candidates, is_feasible)]
        cumulative = list(accumulate(counts))
        picks = set()
        for _ in range(_SAMPLES_PER_ROUND):
            rank = rng.randrange(total)
            row = bisect_right(cumulative, rank)
            offset = rank - (cumulative[row - 1] if row else 0)
            picks.add(prefix[row] - prefix[firsts[row] + offset])
        ordered = sorted(picks)
        index = _first_feasible(ordered, is_feasible)
        if index < len(ordered):
            hi = ordered[index]
        if index > 0:
            lo = ordered[index - 1]


def _first_feasible(values: list[int], is_feasible: Callable[[int], bool]) -> int:
    """Index of the first feasible value in sorted ``values`` (``len(values)`` if none)."""
    lo, hi = 0, len(values)
    while lo < hi:
        mid = (lo + hi) // 2
        if is_feasible(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _require_layers_fit(
    layer_bytes: list[int],
    size_prefix: list[int],
    capacity: int,
    max_stages: int | None,
    names: Sequence[str] | None,
) -> None:
    """Raises InfeasiblePlanError naming the largest layer if it alone exceeds capacity."""
    largest = max(layer_bytes)
    if largest <= capacity:
        return
    index = layer_bytes.index(largest)
    others = sum(1 for b in layer_bytes if b > capacity) - 1
    also = f" ({others} other layers also exceed it)" if others else ""
    needed = _min_capacity(size_prefix, max_stages) if max_stages else largest
    message = (
        f"{_layer(index, names)} alone needs {_bytes(largest)}, more than "
        f"capacity={_bytes(capacity)}{also}; no number of stages can hold it. "
        "Split the layer into smaller named scopes, compress its weights, or shrink the "
        f"microbatch; or raise capacity to at least {needed:,} bytes."
    )
    raise _infeasible(
        message,
        layer_index=index,
        layer_name=names[index] if names else f"layer {index}",
        layer_bytes=largest,
        capacity=capacity,
        max_stages=max_stages,
        min_capacity=needed,
    )


def _too_many_stages(size_prefix: list[int], capacity: int, max_stages: int) -> InfeasiblePlanError:
    """InfeasiblePlanError for layers that fit alone but need more than ``max_stages``."""
    needed_stages = len(_greedy_stops(((size_prefix, capacity),), len(size_prefix)) or ())
    needed_capacity = _min_capacity(size_prefix, max_stages)
    message = (
        f"the layers ({_bytes(size_prefix[-1])} in all) need at least {needed_stages} stages "
        f"of capacity={_bytes(capacity)}, but max_stages={max_stages}. Allow "
        f"{needed_stages} stages (devices), or raise capacity to at least "
        f"{_bytes(needed_capacity)}, the least with which {max_stages} stages suffice; "
        "compressing weights or shrinking the microbatch also lowers the need."
    )
    return _infeasible(
        message,
        capacity=capacity,
        max_stages=max_stages,
        min_stages=needed_stages,
        min_capacity=needed_capacity,
    )


def _infeasible(message: str, **fields: object) -> InfeasiblePlanError:
    """InfeasiblePlanError with every field of ``_INFEASIBLE_FIELDS`` set as an attribute."""
    err = InfeasiblePlanError(message)
    for field in _INFEASIBLE_FIELDS:
        setattr(err, field, fields.get(field))
    return err


def _checked_sequence(values, name: str, example: str) -> Sequence:
    """``values`` itself if it is an ordered sequence with a length (list, tuple, 1-D array);
    ConfigError naming ``name``, what it got and what to pass otherwise (a generator, None,
    a number, a string, a set, a dict, a multi-dimensional array)."""
    if isinstance(values, Sequence) and not isinstance(values, str | bytes):
        return values
    shape = getattr(values, "shape", None)
    if shape is not None and len(shape) == 1:
        return values  # a 1-D numpy or jax array
    if shape is not None:
        got = f"an array of shape {tuple(shape)}"
    elif values is None:
        got = "None"
    else:
        got = (f"{type(values).__name__} {values!r}"
               if isinstance(values, numbers.Number | str | bytes)
               else f"a {type(values).__name__} object")
    hint = (" (a generator or iterator can be read only once: pass list(...) of it)"
            if isinstance(values, Iterator) else "")
    raise ConfigError(f"{name} must be a list, tuple or 1-D array with one entry per layer, "
                      f"e.g. {name}={example}; got {got}{hint}")


def _checked_sizes(sizes: Sequence[int]) -> list[int]:
    """Sizes as a list of non-negative ints; ConfigError naming the bad entry otherwise."""
    sizes = _checked_sequence(sizes, "sizes", "[4096, 4096, 8192]")
    if len(sizes) == 0:
        raise ConfigError("sizes is empty; a model needs at least one layer")
    if all(type(value) is int for value in sizes) and min(sizes) >= 0:
        return list(sizes)  # the common case, checked fast
    layer_bytes = []
    for i, value in enumerate(sizes):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"sizes[{i}] = {value!r} is not a number of bytes")
        if not isinstance(value, numbers.Integral) and not float(value).is_integer():
            raise ConfigError(f"sizes[{i}] = {value!r} is not a whole number of bytes")
        if value < 0:
            raise ConfigError(f"sizes[{i}] = {value!r} is negative; sizes are bytes, >= 0")
        layer_bytes.append(int(value))
    return layer_bytes


def _exact_costs(costs: Sequence[float]) -> tuple[list[int], int]:
    """Costs as integers over one common denominator, so every range sum is exact.

    Example: ``[0.5, 0.25, 3]`` becomes ``([2, 1, 12], 4)``.
    """
    costs = _checked_sequence(costs, "costs", "[1.0, 1.0, 2.5]")
    ratios = [_cost_ratio(value, i) for i, value in enumerate(costs)]
    denominator = math.lcm(*(den for _, den in ratios)) if ratios else 1
    return [num * (denominator // den) for num, den in ratios], denominator


def _cost_ratio(value: float, index: int) -> tuple[int, int]:
    """One cost as an exact (numerator, denominator) pair; ConfigError if it is invalid."""
    if type(value) is float and math.isfinite(value) and value >= 0.0:
        return value.as_integer_ratio()  # the common case, checked fast
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"costs[{index}] = {value!r} is not a real number")
    if isinstance(value, numbers.Integral):
        num, den = int(value), 1
    elif isinstance(value, numbers.Rational):
        num, den = int(value.numerator), int(value.denominator)
    else:
        as_float = float(value)
        if not math.isfinite(as_float):
            raise ConfigError(f"costs[{index}] = {value!r} is not finite; costs are times")
        num, den = as_float.as_integer_ratio()
    if num < 0:
        raise ConfigError(f"costs[{index}] = {value!r} is negative; costs are times, >= 0")
    return num, den


def _checked_positive_int(value: int, name: str) -> int:
    """``value`` as an int if it is a whole number >= 1; ConfigError naming ``name``."""
    is_whole = isinstance(value, numbers.Integral) or (
        isinstance(value, float) and value.is_integer()
    )
    if isinstance(value, bool) or not is_whole or value < 1:
        raise ConfigError(f"{name} = {value!r} must be a positive integer")
    return int(value)


def _checked_names(names: Sequence[str] | None, num_layers: int) -> Sequence[str] | None:
    """``names`` unchanged if it has one entry per layer; ConfigError otherwise."""
    if names is not None:
        names = _checked_sequence(names, "names", "['layers_0', 'layers_1', 'layers_2']")
    if names is not None and len(names) != num_layers:
        raise ConfigError(f"names has {_entries(len(names))} but there are {num_layers} layers; "
                          "give one name per layer")
    return names


def _entries(n: int) -> str:
    """1 -> '1 entry'; 3 -> '3 entries'."""
    return "1 entry" if n == 1 else f"{n} entries"


def _prefix_sums(values: list[int]) -> list[int]:
    """``[0, v0, v0 + v1, ...]``."""
    return [0, *accumulate(values)]


def _largest_step(prefix: list[int]) -> int:
    """Largest single value of the sequence whose prefix sums are ``prefix``."""
    return max(map(sub, prefix[1:], prefix[:-1]))


def _ranges(stops: list[int]) -> tuple[Range, ...]:
    """``[2, 5]`` -> ``((0, 2), (2, 5))``."""
    return tuple(zip([0, *stops[:-1]], stops, strict=True))


def _layer(index: int, names: Sequence[str] | None) -> str:
    """How an error message names layer ``index``."""
    return f"layer {names[index]!r} (index {index})" if names else f"layer {index}"


def _bytes(num_bytes: int) -> str:
    """``52428800`` -> ``'52,428,800 bytes (50.00 MiB)'``."""
    return f"{num_bytes:,} bytes ({num_bytes / _MIB:.2f} MiB)"
