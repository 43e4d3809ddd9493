"""Measured tuning: ``layerwise_shard(..., tune=k)`` runs the layout search's k best layouts
on the devices and keeps the fastest.

The layout search (``passes/layout.py``) ranks layouts by a projected step. Where the cost
model is least sure -- simulated devices sharing a host's cores, small matmuls whose speed
depends on their shape more than on their FLOPs -- its first choice can measure slower than
its second: on the project's 2-core host, MoE at hidden 256 ranked 16 x tp 1 (M = 8) 3%
ahead of 4 x tp 4 (M = 2), which measured 1.23x faster. Tuning builds each candidate (its
weights placed, its program compiled), calls them in interleaved rounds on the example
arguments and keeps the one with the shortest median; the plan's notes list what was
measured, and ``ShardedModel.tuning`` holds the same as data (``Measured``: each candidate's
rank, layout and median). The candidates' weights are all placed while they are timed (k
copies of the model's weights on the devices, freed afterwards).

Example:
    >>> sm = lwjax.layerwise_shard(model, tokens, tune=4)
    >>> [n for n in sm.plan.notes if n.startswith("tuned")]
"""

from __future__ import annotations

import dataclasses
import operator
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from lwjax.errors import ConfigError, SplitError
from lwjax.passes.layout import Layout

ROUNDS = 3  # interleaved calls of every candidate after its first (compiling) call
MARGIN = 0.03  # another candidate replaces the search's first choice only this much faster
FALLBACK = 4  # layouts tried in order when the search's first choice does not lower


@dataclasses.dataclass(frozen=True)
class Measured:
    """One candidate layout tuning measured (``ShardedModel.tuning``).

    Attributes:
        rank: its place in the layout search's ranking (1: the search's first choice).
        num_stages, tp, microbatches: the layout (num_stages: the device groups S).
        virtual: stages per device group (the circular schedule's laps; 1: GPipe).
        median_s: the median of its interleaved timed calls, in seconds (*measured*).
        kept: the layout tuning kept.
        projected_s: the layout search's projected step for it (``Plan.layout_step_s``;
            None: not known).
    """

    rank: int
    num_stages: int
    tp: int
    microbatches: int
    median_s: float
    kept: bool
    virtual: int = 1
    projected_s: float | None = None


def check_tune(tune, given: bool = False) -> int:
    """``tune`` as a count of candidates (0 or 1: no tuning); bad values raise ConfigError.
    ``given``: a plan is given (nothing is tuned, so any process count is fine)."""
    try:
        count = operator.index(tune) if not isinstance(tune, bool) else -1
    except TypeError:
        count = -1
    if count < 0:
        raise ConfigError(f"tune={tune!r}: give the number of layouts to measure, an int >= 0 "
                          "(0 or 1: take the layout search's first choice unmeasured).")
    if count > 1 and not given and jax.process_count() > 1:
        raise ConfigError(
            f"tune={count} in a run of {jax.process_count()} processes: every process would "
            "time the candidates itself and could pick another program. Tune in a "
            "single-process run, save the plan (Plan.to_json) and pass it as plan=.")
    return count


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


def build_first(plans: Sequence, build: Callable, count: int) -> tuple[list, list]:
    """Builds ``plans`` in order until ``count`` lower: ``(built, refused)`` with ``built``
    as (rank, ShardedModel) and ``refused`` naming each plan the lowering refused
    (``SplitError``: a collective XLA put inside a stage's branch) and why; when none
    lowers, the first error is raised, naming the others."""
    built, refused, errors = [], [], []
    for i, p in enumerate(plans):
        if len(built) == count:
            break
        try:
            built.append((i, build(p)))
        except SplitError as e:
            errors.append(e)
            refused.append(f"{i + 1}. {_layout(p)} ({_first_line(e)})")
    if not built:
        first = errors[0]
        first.args = (f"{first.args[0]} The next {len(errors) - 1} layouts of the layout "
                      f"search were refused too: {'; '.join(refused[1:])}."
                      if len(errors) > 1 else first.args[0],)
        raise first
    return built, refused


def deploy(plans: Sequence, build: Callable, args: Sequence, kwargs: dict, tune: int,
           rounds: int = ROUNDS):
    """The ShardedModel of the layout search's ranked ``plans``: the first that lowers
    (``tune`` <= 1), or the fastest of the first ``tune`` that lower, called on the example
    arguments ``args`` / ``kwargs`` (the model's call arguments, without a linen module's
    variables). Its plan's notes say what was refused and, when tuned, what was measured;
    when no plan lowers, the first one's error is raised, naming the others."""
    built, refused = build_first(plans, build, max(tune, 1))
    skipped = f"refused by the lowering (a split whose collectives XLA puts inside a " \
              f"stage's branch would hang): {'; '.join(refused)}" if refused else ""
    if tune <= 1 or len(built) == 1:
        rank, best = built[0]
        notes = [skipped + f"; running candidate {rank + 1} of the layout search's ranking "
                 "instead"] if refused else []
        if tune > 1:
            notes.append(f"tune={tune}: one layout to run here ({_layout(best.plan)}; the "
                         "layout search ranked no other that lowers): nothing to measure")
    else:
        a, kw = concrete(args, kwargs)
        best, medians = fastest([sm for _, sm in built], lambda sm: sm(*a, **kw), rounds)
        k = next(j for j, (_, sm) in enumerate(built) if sm is best)
        best.tuning = tuple(
            Measured(i + 1, sm.plan.ring, sm.plan.tp, sm.plan.microbatches, m, j == k,
                     sm.plan.virtual, sm.plan.layout_step_s)
            for j, ((i, sm), m) in enumerate(zip(built, medians, strict=True)))
        measured = "; ".join(f"{i + 1}. {_layout(sm.plan)} {m * 1e3:.1f} ms"
                             for (i, sm), m in zip(built, medians, strict=True))
        notes = [f"tuned: measured the layout search's {len(built)} best layouts that lower "
                 f"on these devices (median of {rounds} interleaved calls each): {measured}"
                 + (f"; {skipped}" if skipped else "") + f"; kept candidate {built[k][0] + 1}"
                 + ("" if k == 0 else f", {medians[0] / medians[k]:.2f}x faster than "
                    f"candidate {built[0][0] + 1}")]
    best.plan = dataclasses.replace(best.plan, notes=(*best.plan.notes, *notes))
    return best


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).split('. ')[0]}"


def _layout(plan) -> str:
    return Layout("", plan.ring, plan.tp, plan.microbatches,
                  plan.virtual).describe(family=False)
