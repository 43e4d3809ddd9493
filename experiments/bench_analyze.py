"""Times ``lwjax.analyze`` on seed-size dense models (a script that prints figures, not a test).

seed_dense (16 layers) at microbatch 16 with fused attention, then the same model with 32, 64,
128 and 256 layers. Models are abstract (no weights are allocated); only ``lwjax.analyze`` is
timed for the medians. Building the abstract model (``models.abstract``) is timed once per depth
and printed beside them: it is not part of ``analyze`` but a user pays it first. Targets:
seed_dense under 5 s, 256 layers under 30 s.

Run from the repository root::

    python experiments/bench_analyze.py            # add --profile to cProfile the largest model
"""

from __future__ import annotations

import pathlib as _pathlib
import sys as _sys

_sys.path.insert(0, str(_pathlib.Path(__file__).parent))
import cProfile
import dataclasses
import functools
import io
import os
import platform
import pstats
import statistics
import sys
import time

import _common  # noqa: E402
import jax
import jax.numpy as jnp

import lwjax
from lwjax import models
from lwjax.models import configs

REPEATS = 3
MICROBATCH = 16
LAYER_COUNTS = (16, 32, 64, 128, 256)
TARGET_SECONDS = {16: 5.0, 256: 30.0}




@functools.cache
def _setup(num_layers: int):
    """(abstract model, tokens, seconds models.abstract took), built once per depth."""
    cfg = dataclasses.replace(configs.seed_dense(), num_layers=num_layers)
    start = time.perf_counter()
    model = models.abstract(cfg)
    seconds = time.perf_counter() - start
    return model, jax.ShapeDtypeStruct((MICROBATCH, cfg.seq_len), jnp.int32), seconds


def _analyze(model, tokens) -> lwjax.ModelReport:
    return lwjax.analyze(model, tokens, attention="fused")


def time_analyze(num_layers: int, repeats: int = REPEATS) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``lwjax.analyze`` on a dense model of this depth."""
    model, tokens, _ = _setup(num_layers)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        report = _analyze(model, tokens)
        times.append(time.perf_counter() - start)
    if len(report.layers) != num_layers:
        raise RuntimeError(f"expected {num_layers} layers, analyze found {len(report.layers)}")
    return times


def profile(num_layers: int, lines: int = 25) -> str:
    """cProfile of one ``lwjax.analyze`` call, sorted by cumulative time."""
    model, tokens, _ = _setup(num_layers)
    profiler = cProfile.Profile()
    profiler.runcall(_analyze, model, tokens)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def main() -> None:
    print(f"lwjax.analyze, seed_dense dims, microbatch {MICROBATCH}, attention='fused': "
          f"median of {REPEATS} runs")
    print(f"measured on this machine (CPU): {_common.cpu_name()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, JAX {jax.__version__}, {time.strftime('%Y-%m-%d')}")
    _analyze(*_setup(2)[:2])  # warm-up: JAX's first trace pays one-off import and cache costs
    print(f"{'layers':>7} {'median s':>9} {'min s':>7} {'max s':>7} {'s/layer':>8} "
          f"{'growth':>7} {'abstract s':>11}  target")
    medians: dict[int, float] = {}
    for n in LAYER_COUNTS:
        times = time_analyze(n)
        medians[n] = statistics.median(times)
        previous = LAYER_COUNTS[LAYER_COUNTS.index(n) - 1] if n != LAYER_COUNTS[0] else None
        growth = f"{medians[n] / medians[previous]:.2f}x" if previous else "--"
        target = ""
        if n in TARGET_SECONDS:
            ok = "met" if medians[n] < TARGET_SECONDS[n] else "MISSED"
            target = f"< {TARGET_SECONDS[n]:.0f} s: {ok}"
        print(f"{n:>7} {medians[n]:>9.3f} {min(times):>7.3f} {max(times):>7.3f} "
              f"{medians[n] / n * 1e3:>6.1f}ms {growth:>7} {_setup(n)[2]:>11.2f}  {target}")
    first, last = LAYER_COUNTS[0], LAYER_COUNTS[-1]
    print(f"growth ratio per doubling of layers (ideal 2.0x for linear time); "
          f"{last} vs {first} layers: {medians[last] / medians[first]:.1f}x for "
          f"{last // first}x the layers")
    print(f"models.abstract (built once per depth, not in the medians): "
          f"{_setup(last)[2] / _setup(first)[2]:.0f}x from {first} to {last} layers")
    if "--profile" in sys.argv[1:]:
        print(f"\ncProfile of one call at {last} layers (cumulative):")
        print(profile(last))


if __name__ == "__main__":
    main()
