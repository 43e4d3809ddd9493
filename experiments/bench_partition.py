"""Times ``partition_layers`` on random layers (a script that prints figures, not a test).

Run from the repository root::

    PYTHONPATH=. python experiments/bench_partition.py
"""

from __future__ import annotations

import pathlib as _pathlib
import sys as _sys

_sys.path.insert(0, str(_pathlib.Path(__file__).parent))
import platform
import random
import statistics
import time

import _common  # noqa: E402

from lwjax.passes.partition import bottleneck, min_stages, partition_layers

SEED = 0
REPEATS = 7
CASES = (  # (num_layers, max_stages)
    (100, 16),
    (1_000, 64),
    (1_000, 1_024),
    (10_000, 64),
    (10_000, 1_024),
)
MIB = 2**20


def random_layers(num_layers: int, seed: int) -> tuple[list[int], list[float]]:
    """Sizes of 1-64 MiB and float costs (lognormal around 1 ms), reproducible from ``seed``."""
    rng = random.Random(seed)
    sizes = [rng.randint(1 * MIB, 64 * MIB) for _ in range(num_layers)]
    costs = [rng.lognormvariate(0.0, 0.5) * 1e-3 for _ in range(num_layers)]
    return sizes, costs


def median_seconds(num_layers: int, max_stages: int) -> tuple[float, str]:
    """Median wall time of ``REPEATS`` runs, and a one-line description of the plan."""
    sizes, costs = random_layers(num_layers, SEED)
    # Capacity such that max_stages is enough but binding for the smaller stage limits.
    capacity = max(max(sizes), 2 * sum(sizes) // max_stages)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        ranges = partition_layers(sizes, costs, capacity, max_stages)
        times.append(time.perf_counter() - start)
    plan = (
        f"stages={len(ranges):>5}  fewest_by_size={min_stages(sizes, capacity):>5}  "
        f"bottleneck={bottleneck(ranges, costs) * 1e3:.4f} ms"
    )
    return statistics.median(times), plan




def main() -> None:
    print(f"partition_layers(method='optimal'): median of {REPEATS} runs, seed={SEED}")
    print(f"measured on this machine (CPU): {_common.cpu_name()}, "
          f"Python {platform.python_version()}")
    print(f"{'layers':>7} {'max_stages':>10} {'median':>10}  plan")
    medians = {}
    for num_layers, max_stages in CASES:
        seconds, plan = median_seconds(num_layers, max_stages)
        medians[num_layers, max_stages] = seconds
        print(f"{num_layers:>7} {max_stages:>10} {seconds * 1e3:>8.2f}ms  {plan}")
    for max_stages in (64, 1_024):
        ratio = medians[10_000, max_stages] / medians[1_000, max_stages]
        print(f"growth ratio, 10,000 vs 1,000 layers at max_stages={max_stages:,}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
