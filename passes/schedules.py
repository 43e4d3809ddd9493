"""Pipeline schedules: the order in which stages run microbatches.

A schedule is a function ``(step, init, *, stage, num_stages, num_microbatches) -> state``
that runs inside ``shard_map`` on every device. It calls ``step(tick_state, microbatch, valid)``
once per tick; ``step`` runs this device's stage on ``microbatch`` when ``valid`` (and idles
otherwise), moves activations to the next stage, and returns the new tick state. New
schedules (1F1B, circular/interleaved) are new functions here with the same signature; the
lowering picks one by name and knows nothing about their tick order.

Example:
    >>> state = SCHEDULES["gpipe"](step, init, stage=s, num_stages=4, num_microbatches=8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Step = Callable[[Any, jax.Array, jax.Array], Any]


def gpipe(step: Step, init, *, stage: jax.Array, num_stages: int, num_microbatches: int):
    """GPipe fill / steady state / drain: at tick t stage s runs microbatch t - s.

    M + S - 1 ticks; stage s idles for the first s ticks (fill) and the last S - 1 - s
    (drain): the bubble fraction is (S - 1) / (M + S - 1).
    """

    def tick(t, state):
        m = t - stage
        valid = (m >= 0) & (m < num_microbatches)
        return step(state, jnp.clip(m, 0, num_microbatches - 1), valid)

    return jax.lax.fori_loop(0, num_microbatches + num_stages - 1, tick, init)


SCHEDULES: dict[str, Callable] = {"gpipe": gpipe}
