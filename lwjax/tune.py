"""Measured tuning: ``layerwise_shard(..., tune=k)`` runs the layout search's k best layouts
on the devices and keeps the fastest.

The layout search (``passes/layout.py``) ranks layouts by a projected step. Where the cost
model is least sure -- simulated devices sharing a host's cores, small matmuls whose speed
depends on their shape more than on their FLOPs -- its first choice can measure slower than
its second: on the project's 2-core host, MoE at hidden 256 ranked 16 x tp 1 (M = 8) 3%
ahead of 4 x tp 4 (M = 2), which measured 1.23x faster. Tuning builds each candidate (its
weights placed, its program compiled), calls them in interleaved rounds on the example
arguments and keeps the one with the shortest median; the plan's notes list what was
measured. The candidates' weights are all placed while they are timed (k copies of the
model's weights on the devices, freed afterwards).

Example:
    >>> sm = lwjax.layerwise_shard(model, tokens, tune=4)
    >>> [n for n in sm.plan.notes if n.startswith("tuned")]
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lwjax.errors import ConfigError, SplitError

ROUNDS = 3  # interleaved calls of every candidate after its first (compiling) call
MARGIN = 0.03  # another candidate replaces the search's first choice only this much faster
FALLBACK = 4  # layouts tried in order when the search's first choice does not lower


def check_tune(tune: int) -> int:
    """``tune`` as a count of candidates (0 or 1: no tuning); bad values raise ConfigError."""
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 0:
        raise ConfigError(f"tune={tune!r}: give the number of layouts to measure, an int >= 0 "
                          "(0 or 1: take the layout search's first choice unmeasured).")
    if tune > 1 and jax.process_count() > 1:
        raise ConfigError(
            f"tune={tune} in a run of {jax.process_count()} processes: every process would "
            "time the candidates itself and could pick another program. Tune in a "
            "single-process run, save the plan (Plan.to_json) and pass it as plan=.")
    return tune


def concrete(args: Sequence, kwargs: dict) -> tuple[tuple, dict]:
    """The example arguments with every ShapeDtypeStruct replaced by zeros of its shape."""
    def fill(x):
        return jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
    return jax.tree.map(fill, tuple(args)), jax.tree.map(fill, dict(kwargs))


def fastest(candidates: Sequence, call: Callable, rounds: int = ROUNDS,
            margin: float = MARGIN):
    """The candidate whose ``call`` has the shortest median over ``rounds`` interleaved
    rounds (after one call each, which compiles), and every candidate's median seconds;
    the first candidate stays unless the fastest is more than ``margin`` faster (closer
    medians are noise on a shared host, and the first is the cost model's choice).

    Example:
        >>> best, medians = fastest([sm_a, sm_b], lambda sm: sm(tokens))
    """
    for c in candidates:
        jax.block_until_ready(call(c))
    times: list[list[float]] = [[] for _ in candidates]
    for _ in range(rounds):
        for i, c in enumerate(candidates):
            start = time.perf_counter()
            jax.block_until_ready(call(c))
            times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    best = medians.index(min(medians))
    if medians[best] > (1 - margin) * medians[0]:
        best = 0
    return candidates[best], medians


def tuned(plans: Sequence, build: Callable, args: Sequence, kwargs: dict,
          rounds: int = ROUNDS):
    """The fastest of ``plans`` (the layout search's order) built by ``build`` (plan ->
    ShardedModel) and called on the example arguments, its plan's notes saying what was
    measured. A candidate whose split stages the lowering refuses (``SplitError``: a
    collective XLA put inside a stage's branch) is left out and named; when none builds, the
    first one's error is raised."""
    built, refused, errors = [], [], []
    for i, p in enumerate(plans):
        try:
            built.append((i, build(p)))
        except SplitError as e:
            errors.append(e)
            refused.append(f"{i + 1}. {_layout(p)} (refused by the lowering: {type(e).__name__})")
    if not built:
        raise errors[0]
    a, kw = concrete(args, kwargs)
    best, medians = fastest([sm for _, sm in built], lambda sm: sm(*a, **kw), rounds)
    k = next(j for j, (_, sm) in enumerate(built) if sm is best)
    measured = "; ".join(
        f"{i + 1}. {_layout(sm.plan)} {m * 1e3:.1f} ms" for (i, sm), m in zip(
            built, medians, strict=True))
    skipped = f"; not run: {', '.join(refused)}" if refused else ""
    rank = built[k][0]
    note = (f"tuned: measured the layout search's {len(plans)} best layouts on these devices "
            f"(median of {rounds} interleaved calls each): {measured}{skipped}; kept candidate "
            f"{rank + 1}" + ("" if k == 0 else f", {medians[0] / medians[k]:.2f}x faster than "
                             f"candidate {built[0][0] + 1}"))
    best.plan = dataclasses.replace(best.plan, notes=(*best.plan.notes, note))
    return best


def first_that_builds(plans: Sequence, build: Callable, refused: SplitError):
    """The first of ``plans`` after the first (which raised ``refused``) that ``build``
    lowers, its notes saying which were refused and why; none: ``refused`` is raised."""
    skipped = [f"1. {_layout(plans[0])} ({_first_line(refused)})"]
    for i, p in enumerate(plans[1:], 2):
        try:
            sm = build(p)
        except SplitError as e:
            skipped.append(f"{i}. {_layout(p)} ({_first_line(e)})")
            continue
        note = ("refused by the lowering (a split whose collectives XLA puts inside a "
                f"stage's branch would hang): {'; '.join(skipped)}; running candidate {i} of "
                "the layout search's ranking instead")
        sm.plan = dataclasses.replace(sm.plan, notes=(*sm.plan.notes, note))
        return sm
    raise refused


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).split('. ')[0]}"


def _layout(plan) -> str:
    return f"{len(plan.stages)} x tp {plan.tp}, M={plan.microbatches}"
