"""Tests of the layer partitioner against brute force, a DP oracle and hand-worked examples."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwjax.errors import ConfigError, InfeasiblePlanError
from lwjax.passes.partition import bottleneck, min_capacity, min_stages, partition_layers

MIB = 2**20


# ----------------------------------------------------------------------------- oracles


def all_partitions(n):
    """Every way to cut ``n`` layers into contiguous non-empty ranges (2**(n-1) of them)."""
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), n]
        yield tuple(zip(bounds[:-1], bounds[1:], strict=True))


def plan_key(ranges, sizes, costs, total=sum):
    """What the optimal method minimises, lexicographically: (bottleneck, stages, max size)."""
    return (
        max(total(costs[a:b]) for a, b in ranges),
        len(ranges),
        max(sum(sizes[a:b]) for a, b in ranges),
    )


def fits(ranges, sizes, capacity):
    return all(sum(sizes[a:b]) <= capacity for a, b in ranges)


def brute_force(sizes, costs, capacity, max_stages, total=sum):
    """Best plan_key over all feasible partitions (None if none), and the fewest stages that fit
    capacity ignoring max_stages (None if no partition fits)."""
    best, fewest = None, None
    for ranges in all_partitions(len(sizes)):
        if not fits(ranges, sizes, capacity):
            continue
        fewest = len(ranges) if fewest is None else min(fewest, len(ranges))
        if len(ranges) <= max_stages:
            key = plan_key(ranges, sizes, costs, total)
            best = key if best is None or key < best else best
    return best, fewest


def dp_plan_key(sizes, costs, capacity, max_stages):
    """Independent O(n^2 k) oracle for plan_key, in three exact DPs (for n too big to brute force).

    best[s][j]: least largest `weight` over cuttings of layers [0, j) into exactly s ranges whose
    (cost, size) sums respect (cost_cap, size_cap)."""
    n = len(sizes)

    def least_max(weights, stages, cost_cap, size_cap):
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(stages + 1)]
        best[0][0] = 0
        for s in range(1, stages + 1):
            for j in range(1, n + 1):
                for i in range(j):
                    if sum(costs[i:j]) <= cost_cap and sum(sizes[i:j]) <= size_cap:
                        best[s][j] = min(best[s][j], max(best[s - 1][i], sum(weights[i:j])))
        return best

    by_cost = least_max(costs, max_stages, math.inf, capacity)
    best_cost = min(by_cost[s][n] for s in range(1, max_stages + 1))
    if best_cost == math.inf:
        return None
    by_size = least_max(sizes, max_stages, best_cost, capacity)
    num_stages = min(s for s in range(1, max_stages + 1) if by_size[s][n] < math.inf)
    return best_cost, num_stages, by_size[num_stages][n]


def first_fit(sizes, capacity):
    """The source documents' fallback, written out: new stage when the next layer overflows."""
    ranges, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        if used + size > capacity:
            ranges.append((start, i))
            start, used = i, 0
        used += size
    ranges.append((start, len(sizes)))
    return tuple(ranges)


def assert_valid_plan(ranges, sizes, capacity, max_stages):
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    assert all(a < b for a, b in ranges)
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))
    assert len(ranges) <= max_stages
    assert fits(ranges, sizes, capacity)


# ----------------------------------------------------------------------------- strategies


@st.composite
def instances(draw, max_layers=10, cost=None):
    """Random (sizes, costs, capacity, max_stages), infeasible ones included."""
    n = draw(st.integers(1, max_layers))
    sizes = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    cost = st.integers(0, 30) if cost is None else cost
    costs = draw(st.lists(cost, min_size=n, max_size=n))
    capacity = draw(st.integers(1, 60))
    max_stages = draw(st.integers(1, n + 1))
    return sizes, costs, capacity, max_stages


fraction_costs = st.builds(Fraction, st.integers(0, 40), st.integers(1, 12))
float_costs = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def check_against_brute_force(sizes, costs, capacity, max_stages, total=sum):
    best, fewest = brute_force(sizes, costs, capacity, max_stages, total)
    if best is None:
        with pytest.raises(InfeasiblePlanError) as excinfo:
            partition_layers(sizes, costs, capacity, max_stages)
        assert excinfo.value.min_stages == (None if max(sizes) > capacity else fewest)
        return None
    ranges = partition_layers(sizes, costs, capacity, max_stages)
    assert_valid_plan(ranges, sizes, capacity, max_stages)
    assert partition_layers(sizes, costs, capacity, max_stages) == ranges  # deterministic
    return ranges, best


# ----------------------------------------------------------------------------- properties


@settings(max_examples=400, deadline=None)
@given(instances())
def test_optimal_matches_brute_force_integer_costs(instance):
    result = check_against_brute_force(*instance)
    if result is not None:
        ranges, best = result
        sizes, costs, _, _ = instance
        assert plan_key(ranges, sizes, costs) == best  # bottleneck, then stages, then max size
        assert bottleneck(ranges, costs) == best[0]


@settings(max_examples=200, deadline=None)
@given(instances(cost=fraction_costs))
def test_optimal_matches_brute_force_fraction_costs(instance):
    result = check_against_brute_force(*instance)
    if result is not None:
        ranges, best = result
        sizes, costs, _, _ = instance
        assert plan_key(ranges, sizes, costs) == best
        assert bottleneck(ranges, costs) == float(best[0])


@settings(max_examples=200, deadline=None)
@given(instances(cost=float_costs))
def test_optimal_matches_brute_force_float_costs(instance):
    result = check_against_brute_force(*instance, total=math.fsum)
    if result is not None:
        ranges, best = result
        assert bottleneck(ranges, instance[1]) == pytest.approx(best[0], rel=1e-12, abs=0.0)


@settings(max_examples=60, deadline=None)
@given(instances(max_layers=40))
def test_optimal_matches_dp_oracle_on_larger_instances(instance):
    # 40 layers have up to 820 range sums, enough to exercise the sampled search rounds.
    sizes, costs, capacity, max_stages = instance
    expected = dp_plan_key(sizes, costs, capacity, max_stages)
    if expected is None:
        with pytest.raises(InfeasiblePlanError):
            partition_layers(sizes, costs, capacity, max_stages)
        return
    ranges = partition_layers(sizes, costs, capacity, max_stages)
    assert_valid_plan(ranges, sizes, capacity, max_stages)
    assert plan_key(ranges, sizes, costs) == expected


@settings(max_examples=300, deadline=None)
@given(instances())
def test_greedy_is_first_fit_and_feasible_when_optimal_is(instance):
    sizes, costs, capacity, max_stages = instance
    try:
        partition_layers(sizes, costs, capacity, max_stages)
    except InfeasiblePlanError:
        with pytest.raises(InfeasiblePlanError):
            partition_layers(sizes, costs, capacity, max_stages, method="greedy")
        return
    ranges = partition_layers(sizes, costs, capacity, max_stages, method="greedy")
    assert ranges == first_fit(sizes, capacity)
    assert_valid_plan(ranges, sizes, capacity, max_stages)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=10), st.integers(1, 11))
def test_min_capacity_and_min_stages_match_brute_force(sizes, num_stages):
    partitions = list(all_partitions(len(sizes)))
    expected_capacity = min(
        max(sum(sizes[a:b]) for a, b in ranges)
        for ranges in partitions
        if len(ranges) <= num_stages
    )
    assert min_capacity(sizes, num_stages) == expected_capacity
    capacity = max(1, expected_capacity)
    expected_stages = min(len(r) for r in partitions if fits(r, sizes, capacity))
    assert min_stages(sizes, capacity) == expected_stages
    assert expected_stages <= num_stages


# ----------------------------------------------------------------------------- hand examples


@pytest.mark.parametrize(
    ("max_stages", "expected"),
    [
        # 16 layers of cost 1: 16 stages -> bottleneck 1, one layer each.
        (16, tuple((i, i + 1) for i in range(16))),
        # 8 stages -> bottleneck 16 / 8 = 2, two layers each.
        (8, tuple((i, i + 2) for i in range(0, 16, 2))),
        # 5 stages -> bottleneck ceil(16 / 5) = 4; at 4 only 16 / 4 = 4 stages are needed and
        # fewer stages win the tie, so four stages of four layers.
        (5, ((0, 4), (4, 8), (8, 12), (12, 16))),
    ],
)
def test_sixteen_equal_layers(max_stages, expected):
    ranges = partition_layers([10] * 16, [1.0] * 16, capacity=1000, max_stages=max_stages)
    assert ranges == expected


def test_heavy_first_and_last_layer():
    # Costs 10,1,1,1,1,1,1,10 on 3 stages: the bottleneck is at least 10 (one layer); at 10 the
    # first and last layers stand alone (10 + 1 > 10) and the middle six (cost 6) fill stage 2.
    ranges = partition_layers([1] * 8, [10, 1, 1, 1, 1, 1, 1, 10], capacity=100, max_stages=3)
    assert ranges == ((0, 1), (1, 7), (7, 8))
    assert bottleneck(ranges, [10, 1, 1, 1, 1, 1, 1, 10]) == 10.0


def test_capacity_forces_more_stages_than_cost():
    # Sizes 5 each, capacity 10: at most two layers per stage, so 3 stages for 6 layers even
    # though cost alone (all zero) would allow one stage.
    ranges = partition_layers([5] * 6, [0] * 6, capacity=10, max_stages=4)
    assert ranges == ((0, 2), (2, 4), (4, 6))


def test_tie_break_prefers_smaller_largest_stage_size():
    # Costs 1,1,1 on 2 stages: bottleneck 2 either way, as (0,1),(1,3) or (0,2),(2,3).
    # Sizes 5,1,1 give largest stage sizes max(5, 2) = 5 and max(6, 1) = 6: the first wins,
    # although leftmost greedy packing by cost alone would pick the second.
    assert partition_layers([5, 1, 1], [1, 1, 1], capacity=100, max_stages=2) == ((0, 1), (1, 3))


def test_stage_costs_are_summed_exactly():
    # Costs 2**53, 1, 1 on 2 stages: (0,1),(1,3) has bottleneck 2**53, (0,2),(2,3) has exactly
    # 2**53 + 1, which float addition rounds back to 2**53. Rounded sums would call it a tie and
    # let sizes 1,1,5 decide (largest stage 5 < 6) for the second; exact sums pick the first.
    costs = [2.0**53, 1.0, 1.0]
    ranges = partition_layers([1, 1, 5], costs, capacity=100, max_stages=2)
    assert ranges == ((0, 1), (1, 3))
    assert bottleneck(ranges, costs) == 2.0**53


def test_greedy_hand_example():
    # Capacity 8: 5+3 = 8 fits; 4+1 = 5, +6 = 11 overflows; 6 alone.
    ranges = partition_layers([5, 3, 4, 1, 6], [9, 0, 0, 0, 9], 8, 5, method="greedy")
    assert ranges == ((0, 2), (2, 4), (4, 5))


def test_helpers_hand_examples():
    assert min_stages([6] * 5, 12) == 3  # 6+6 | 6+6 | 6
    assert min_capacity([6] * 5, 2) == 18  # 6+6+6 | 6+6
    assert min_capacity([3, 0, 0, 4], 4) == 4  # the largest layer
    assert bottleneck(((0, 1), (1, 3)), [2, 1.5, 0.5]) == 2.0


# ----------------------------------------------------------------------------- errors


def test_layer_larger_than_capacity_is_named_with_numbers_and_advice():
    names = ["embed", "block0", "head"]
    sizes = [10, 200 * MIB, 10]
    with pytest.raises(InfeasiblePlanError) as excinfo:
        partition_layers(sizes, [1, 1, 1], 100 * MIB, 4, names=names)
    message, err = str(excinfo.value), excinfo.value
    for text in ("'block0'", "index 1", f"{200 * MIB:,} bytes", "200.00 MiB", f"{100 * MIB:,}"):
        assert text in message
    for advice in ("no number of stages", "Split the layer", "compress", "microbatch"):
        assert advice in message
    assert (err.layer_index, err.layer_name, err.layer_bytes) == (1, "block0", 200 * MIB)
    assert (err.capacity, err.max_stages, err.min_stages) == (100 * MIB, 4, None)
    assert err.min_capacity == 200 * MIB
    with pytest.raises(InfeasiblePlanError, match="layer 1"):
        partition_layers(sizes, [1, 1, 1], 100 * MIB, 4, method="greedy")
    with pytest.raises(InfeasiblePlanError, match="'block0'"):
        min_stages(sizes, 100 * MIB, names=names)


def test_too_many_stages_reports_fewest_stages_and_least_capacity():
    # Ten layers of 6 bytes, capacity 12: two per stage, so 5 stages; with 2 stages the least
    # capacity is 5 layers * 6 = 30 bytes.
    with pytest.raises(InfeasiblePlanError) as excinfo:
        partition_layers([6] * 10, [1] * 10, capacity=12, max_stages=2)
    message, err = str(excinfo.value), excinfo.value
    for text in ("at least 5 stages", "max_stages=2", "30 bytes", "capacity=12 bytes"):
        assert text in message
    assert (err.min_stages, err.min_capacity, err.max_stages, err.capacity) == (5, 30, 2, 12)
    assert err.layer_index is None
    assert partition_layers([6] * 10, [1] * 10, capacity=30, max_stages=2) == ((0, 5), (5, 10))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sizes": [1, 2], "costs": [1]}, "costs has 1 entry but sizes has 2 entries"),
        ({"sizes": []}, "sizes is empty"),
        ({"sizes": [1, -3]}, "sizes[1] = -3 is negative"),
        ({"sizes": [1, 2.5]}, "sizes[1] = 2.5"),
        ({"sizes": [1, "2"]}, "sizes[1] = '2'"),
        ({"costs": [1, -0.5]}, "costs[1] = -0.5 is negative"),
        ({"costs": [float("nan"), 1]}, "costs[0] = nan"),
        ({"costs": [1, float("inf")]}, "costs[1] = inf"),
        ({"capacity": 0}, "capacity = 0"),
        ({"capacity": -4}, "capacity = -4"),
        ({"max_stages": 0}, "max_stages = 0"),
        ({"method": "fastest"}, "method = 'fastest'"),
        ({"names": ["only_one"]}, "names has 1 entry but there are 2 layers"),
        # not a sequence: named, with what was passed and what to pass instead
        ({"sizes": None}, "sizes must be a list, tuple or 1-D array with one entry per layer, "
                          "e.g. sizes=[4096, 4096, 8192]; got None"),
        ({"sizes": (s for s in [1, 2])}, "sizes must be a list, tuple or 1-D array"),
        ({"sizes": (s for s in [1, 2])}, "got a generator object (a generator or iterator can "
                                         "be read only once: pass list(...) of it)"),
        ({"sizes": 12}, "sizes must be a list, tuple or 1-D array with one entry per layer, "
                        "e.g. sizes=[4096, 4096, 8192]; got int 12"),
        ({"sizes": "12"}, "got str '12'"),
        ({"sizes": {1, 2}}, "got a set object"),
        ({"sizes": np.ones((2, 1), np.int64)}, "got an array of shape (2, 1)"),
        ({"costs": None}, "costs must be a list, tuple or 1-D array with one entry per layer, "
                          "e.g. costs=[1.0, 1.0, 2.5]; got None"),
        ({"costs": iter([1.0, 1.0])}, "costs must be a list, tuple or 1-D array"),
        ({"names": (n for n in "ab")}, "names must be a list, tuple or 1-D array"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs, fragment):
    arguments = {"sizes": [1, 2], "costs": [1, 1], "capacity": 4, "max_stages": 2} | kwargs
    with pytest.raises(ConfigError) as excinfo:
        partition_layers(**arguments)
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: min_capacity([1, 2], 0), "num_stages = 0"),
        (lambda: min_stages([1, 2], 0), "capacity = 0"),
        (lambda: bottleneck((), [1]), "ranges is empty"),
        (lambda: bottleneck(((0, 2),), [1]), "range (0, 2)"),
        (lambda: bottleneck(((0, 1),), [float("nan")]), "costs[0] = nan"),
        (lambda: min_stages(None, 4), "sizes must be a list, tuple or 1-D array"),
        (lambda: min_capacity((s for s in [1, 2]), 2), "got a generator object"),
        (lambda: bottleneck(((0, 1),), None), "costs must be a list, tuple or 1-D array"),
    ],
)
def test_helpers_validate_arguments(call, fragment):
    with pytest.raises(ConfigError) as excinfo:
        call()
    assert fragment in str(excinfo.value)


def test_sequences_of_every_kind_are_accepted():
    expected = ((0, 1), (1, 2))
    for sizes, costs in (([3, 3], [1.0, 1.0]), ((3, 3), (1, 1)),
                         (np.array([3, 3]), np.array([1.0, 1.0])), (range(3, 5), [1, 1])):
        assert partition_layers(sizes, costs, capacity=4, max_stages=2) == expected
