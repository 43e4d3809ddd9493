"""Times the planner: ``partition_layers``, ``Plan.replan`` and ``lwjax.plan`` on the seeds
(a script that prints figures, not a test). Every figure is *measured on this machine (CPU)*.

Targets: ``replan`` of a 64-layer model under 100 ms (the seed documents claim "<100ms for
dynamic reconfiguration"), ``lwjax.plan`` of seed_dense under 2 s.

Run from the repository root::

    python experiments/bench_plan.py
"""

from __future__ import annotations

import pathlib as _pathlib
import sys as _sys

_sys.path.insert(0, str(_pathlib.Path(__file__).parent))
import dataclasses
import datetime
import platform
import random
import statistics
import time
from collections.abc import Callable

import _common  # noqa: E402
import jax
import jax.numpy as jnp

import lwjax
from lwjax import models
from lwjax.errors import InfeasiblePlanError
from lwjax.models import configs
from lwjax.passes.partition import partition_layers

MIB = 2**20
SEED = 0


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_layers(num_layers: int) -> tuple[list[int], list[float]]:
    """Sizes of 1-64 MiB and lognormal costs around 1 ms, reproducible from SEED."""
    rng = random.Random(SEED)
    sizes = [rng.randint(1 * MIB, 64 * MIB) for _ in range(num_layers)]
    costs = [rng.lognormvariate(0.0, 0.5) * 1e-3 for _ in range(num_layers)]
    return sizes, costs


def bench_partition() -> list[str]:
    rows, medians = [], {}
    for n in (1_000, 10_000, 100_000):
        sizes, costs = random_layers(n)
        capacity = max(max(sizes), 2 * sum(sizes) // 1_024)
        medians[n] = median_s(lambda s=sizes, c=costs, cap=capacity:
                              partition_layers(s, c, cap, 1_024), 5 if n < 100_000 else 3)
        rows.append(f"  partition_layers n={n:>7,} max_stages=1,024: {medians[n] * 1e3:9.1f} ms")
    rows.append(f"  growth: x{medians[10_000] / medians[1_000]:.1f} for 10x layers (1k -> 10k), "
                f"x{medians[100_000] / medians[10_000]:.1f} (10k -> 100k); n log^2 n predicts "
                f"x{10 * (4 / 3) ** 2:.1f} and x{10 * (5 / 4) ** 2:.1f}")
    return rows


def bench_replan() -> list[str]:
    rows, medians = [], {}
    for layers in (16, 64, 256):
        cfg = dataclasses.replace(configs.tiny_dense(), num_layers=layers)
        tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
        plan = lwjax.plan(models.abstract(cfg), tokens, num_devices=layers, hardware="h100",
                          cache_bytes=2**20)
        medians[layers] = median_s(lambda p=plan: p.replan(exclude_devices=[3]), 21)
        rows.append(f"  replan, {layers:>3}-layer model on {layers:>3} devices, one excluded: "
                    f"{medians[layers] * 1e3:7.2f} ms" + ("   (target < 100 ms)" if layers == 64
                                                          else ""))
    rows.append(f"  growth: x{medians[64] / medians[16]:.1f} (16 -> 64 layers), "
                f"x{medians[256] / medians[64]:.1f} (64 -> 256)")
    return rows


def bench_seed_plan() -> list[str]:
    rows = []
    cases = (("seed_dense, 16 devices (infeasible: time to the error)", "seed_dense", 16, {}),
             ("seed_dense, 256 devices, residency='weights'", "seed_dense", 256,
              {"residency": "weights"}),
             ("seed_moe, 256 devices, residency='weights'", "seed_moe", 256,
              {"residency": "weights"}))
    for label, name, devices, kw in cases:
        cfg = getattr(configs, name)()
        model = models.abstract(cfg)
        tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)

        def run(m=model, t=tokens, d=devices, kw=kw):
            try:
                return lwjax.plan(m, t, num_devices=d, hardware="h100", **kw)
            except InfeasiblePlanError as e:
                return e

        start = time.perf_counter()
        outcome = run()
        first = time.perf_counter() - start
        what = (f"{outcome.strategy}, tp={outcome.tp}, {outcome.compression}"
                if isinstance(outcome, lwjax.Plan) else "InfeasiblePlanError")
        seconds = median_s(run, 3)
        rows.append(f"  lwjax.plan {label}: first call {first:5.2f} s, then {seconds:5.2f} s "
                    f"[{what}]   (target < 2 s)")
    medians = {}
    for layers in (4, 16, 64):
        cfg = dataclasses.replace(configs.seed_dense(), num_layers=layers)
        model = models.abstract(cfg)
        tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
        medians[layers] = median_s(lambda m=model, t=tokens, n=layers: lwjax.plan(
            m, t, num_devices=16 * n, hardware="h100", residency="weights"), 3)
        rows.append(f"  lwjax.plan seed_dense at {layers:>2} layers on {16 * layers:>4} devices "
                    f"(weights), median of 3: {medians[layers]:6.2f} s")
    rows.append(f"  growth: x{medians[16] / medians[4]:.1f} (4 -> 16 layers), "
                f"x{medians[64] / medians[16]:.1f} (16 -> 64)")
    return rows




def main() -> None:
    print("lwjax planner benchmarks -- measured on this machine (CPU), medians")
    print(f"  machine: {_common.cpu_name()}, Python "
          f"{platform.python_version()}, JAX {jax.__version__}, {datetime.date.today()}")
    for rows in (bench_partition(), bench_replan(), bench_seed_plan()):
        print("\n".join(rows))


if __name__ == "__main__":
    main()
