"""Pipeline schedules: the order in which stages run microbatches.

A schedule runs inside ``shard_map`` on every device. ``run(step, init, *, stage,
num_stages, num_microbatches)`` calls ``step(tick_state, microbatch, valid)`` once per tick;
``step`` runs this device's stage on ``microbatch`` when ``valid`` (and idles otherwise), moves
activations to the next stage, and returns ``(new tick state, this tick's outputs)``. ``run``
returns the final state and the outputs stacked over ticks; ``output_ticks`` names the ticks
at which the last stage finishes microbatches 0..M-1. New schedules (1F1B,
circular/interleaved) are new entries here; the lowering picks one by name and knows nothing
about their tick order.

Example:
    >>> state, ys = SCHEDULES["gpipe"].run(step, init, stage=s, num_stages=4,
    ...                                    num_microbatches=8)
    >>> last_stage_outputs = ys[SCHEDULES["gpipe"].output_ticks(4, 8)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from lwjax.errors import ConfigError

Step = Callable[[Any, jax.Array, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A named tick order: ``run`` drives the ticks, ``output_ticks`` locates the outputs."""

    name: str
    run: Callable
    output_ticks: Callable[[int, int], slice]


def _gpipe_run(step: Step, init, *, stage: jax.Array, num_stages: int, num_microbatches: int):
    """GPipe fill / steady state / drain: at tick t stage s runs microbatch t - s.

    M + S - 1 ticks; stage s idles for the first s ticks (fill) and the last S - 1 - s
    (drain): the bubble fraction is (S - 1) / (M + S - 1). Per-tick outputs are a scan's
    stacked results, written in place.
    """

    def tick(state, t):
        m = t - stage
        valid = (m >= 0) & (m < num_microbatches)
        return step(state, jnp.clip(m, 0, num_microbatches - 1), valid)

    return jax.lax.scan(tick, init, jnp.arange(num_microbatches + num_stages - 1))


GPIPE = Schedule("gpipe", _gpipe_run,
                 lambda num_stages, m: slice(num_stages - 1, num_stages - 1 + m))
SCHEDULES: dict[str, Schedule] = {"gpipe": GPIPE}


def get(name: str) -> Schedule:
    """The schedule called ``name``.

    Raises:
        ConfigError: no such schedule (the message lists the names).

    Example:
        >>> get("gpipe").name
        'gpipe'
    """
    if name not in SCHEDULES:
        raise ConfigError(f"schedule={name!r} is not one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name]
