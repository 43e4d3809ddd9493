"""Pipeline schedules: the order in which stages run microbatches.

A schedule runs inside ``shard_map`` on every device. ``run(step, init, *, stage,
num_stages, num_microbatches, virtual)`` calls ``step(tick_state, microbatch, valid, k)`` once
per tick (k: the virtual stage this device runs);
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
import numpy as np

from lwjax.errors import ConfigError

Step = Callable[[Any, jax.Array, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A named tick order over S devices, each holding ``virtual`` stages (V = S x virtual
    stages in all; virtual stage k runs on device k mod S).

    Attributes:
        name: the registry key.
        run: ``run(step, init, *, stage, num_stages, num_microbatches, virtual)`` drives the
            ticks; ``step(state, microbatch, valid, k)`` runs virtual stage ``k`` (traced)
            on this device.
        output_ticks: ``(S, M, virtual) -> ticks`` at which the last virtual stage (on
            device S - 1) finishes microbatches 0..M-1.
        ring: the carry also travels from device S - 1 to device 0 (a later lap).
        virtual_stages: whether it runs more than one stage per device.
    """

    name: str
    run: Callable
    output_ticks: Callable[[int, int, int], Any]
    ring: bool = False
    virtual_stages: bool = False

    def table(self, num_stages: int, num_microbatches: int, virtual: int = 1
              ) -> list[list[tuple[int, int] | None]]:
        """Per tick, per device, the (virtual stage, microbatch) it runs, or None (idle):
        the tick order the traced ``run`` follows, evaluated on the host.

        Example:
            >>> SCHEDULES["circular"].table(2, 2, 2)[:3]
            [[(0, 0), None], [(0, 1), (1, 0)], [(2, 0), (1, 1)]]
        """
        seen: list = []

        def step(state, mb, valid, k):
            seen.append((int(k), int(mb)) if bool(valid) else None)
            return state, 0

        rows = []
        for s in range(num_stages):
            seen.clear()
            with jax.disable_jit():
                self.run(step, 0, stage=jnp.int32(s), num_stages=num_stages,
                         num_microbatches=num_microbatches, virtual=virtual)
            rows.append(list(seen))
        return [list(tick) for tick in zip(*rows, strict=True)]


def _gpipe_run(step: Step, init, *, stage: jax.Array, num_stages: int, num_microbatches: int,
               virtual: int = 1):
    """GPipe fill / steady state / drain: at tick t stage s runs microbatch t - s.

    M + S - 1 ticks; stage s idles for the first s ticks (fill) and the last S - 1 - s
    (drain): the bubble fraction is (S - 1) / (M + S - 1). Per-tick outputs are a scan's
    stacked results, written in place.
    """

    def tick(state, t):
        m = t - stage
        valid = (m >= 0) & (m < num_microbatches)
        return step(state, jnp.clip(m, 0, num_microbatches - 1), valid, stage)

    return jax.lax.scan(tick, init, jnp.arange(num_microbatches + num_stages - 1))


def _circular_position(u, num_stages: int, virtual: int):
    """(microbatch, lap) of the work a device starts ``u`` ticks after its first: groups of
    S microbatches, each group going round the S devices ``virtual`` times back to back."""
    group, within = u // (num_stages * virtual), u % (num_stages * virtual)
    lap, i = within // num_stages, within % num_stages
    return group * num_stages + i, lap


def _circular_run(step: Step, init, *, stage: jax.Array, num_stages: int,
                  num_microbatches: int, virtual: int = 1):
    """Circular (interleaved) forward: V = S x virtual stages of L / V layers, stage k on
    device k mod S. Microbatches go round the ring in groups of S, each lap one device
    further: device s at tick t runs microbatch g*S + i at lap r (virtual stage r*S + s)
    with t - s = g*S*virtual + r*S + i. The device after S - 1 is 0 (the next lap); a
    group's last lap ends as the next group's first begins, so the only bubble is the
    first fill and last drain: S - 1 ticks of a V-stage tick, (S - 1) / (virtual*M + S - 1)
    of the ticks when S divides M.
    """
    ticks = int(_circular_ticks(num_stages, num_microbatches, virtual)[-1]) + 1

    def tick(state, t):
        u = t - stage
        m, lap = _circular_position(u, num_stages, virtual)
        valid = (u >= 0) & (m < num_microbatches)
        return step(state, jnp.clip(m, 0, num_microbatches - 1), valid, lap * num_stages + stage)

    return jax.lax.scan(tick, init, jnp.arange(ticks))


def _circular_ticks(num_stages: int, m: int, virtual: int) -> np.ndarray:
    """Ticks at which device S - 1 finishes each microbatch's last lap."""
    group, i = np.divmod(np.arange(m), num_stages)
    return group * num_stages * virtual + (virtual - 1) * num_stages + i + num_stages - 1


GPIPE = Schedule("gpipe", _gpipe_run,
                 lambda num_stages, m, virtual=1: slice(num_stages - 1, num_stages - 1 + m))
CIRCULAR = Schedule("circular", _circular_run, _circular_ticks, ring=True,
                    virtual_stages=True)
SCHEDULES: dict[str, Schedule] = {"gpipe": GPIPE, "circular": CIRCULAR}


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


# ---- training: tick tables of forward and backward work -----------------------------------

IDLE, FORWARD, BACKWARD = 0, 1, 2
_OP_LETTER = {IDLE: ".", FORWARD: "F", BACKWARD: "B"}


@dataclasses.dataclass(frozen=True)
class TrainSchedule:
    """A training schedule: per stage, the order of its forward (F) and backward (B) work on
    the M microbatches; ``table`` places each op at the first tick its inputs allow.

    A stage stashes the input of each microbatch it has run forward until that microbatch's
    backward (the backward recomputes the stage's forward from it: rematerialisation), so
    the order fixes the stash: GPipe runs every forward first (M stashed), 1F1B alternates
    after a warm-up of S - 1 - s forwards (at most S - s stashed at stage s).
    """

    name: str
    order: Callable[[int, int, int], list[tuple[int, int]]]

    def table(self, num_stages: int, num_microbatches: int) -> TickTable:
        """The tick table for S stages and M microbatches (``TickTable``)."""
        return _list_schedule(self, num_stages, num_microbatches)


@dataclasses.dataclass(frozen=True)
class TickTable:
    """``op[t, s]`` (IDLE, FORWARD or BACKWARD) and ``mb[t, s]`` (its microbatch) for each
    tick t and stage s. A forward's output reaches stage s + 1 at tick t + 1, a backward's
    input gradient stage s - 1 at tick t + 1; ``stash`` and ``pending`` count the slots a
    stage needs for inputs received and gradients received but not yet used.

    Example:
        >>> print(TRAIN_SCHEDULES["1f1b"].table(2, 3))
        s0: F0 F1 .  B0 F2 B1 .  B2
        s1: .  F0 B0 F1 B1 F2 B2
    """

    op: np.ndarray
    mb: np.ndarray

    @property
    def num_ticks(self) -> int:
        return int(self.op.shape[0])

    def _live(self, stage: int, start_op: int, start_stage: int, end_op: int) -> int:
        """Most microbatches between arriving (``start_op`` at ``start_stage``, one tick
        before) and being used by ``end_op`` at ``stage``."""
        arrive = {int(m): t + 1 for t in range(self.num_ticks)
                  if self.op[t, start_stage] == start_op for m in [self.mb[t, start_stage]]}
        done = {int(self.mb[t, stage]): t for t in range(self.num_ticks)
                if self.op[t, stage] == end_op}
        return max((sum(arrive[m] <= t <= done[m] for m in arrive) for t in range(self.num_ticks)),
                   default=0)

    def stash(self) -> int:
        """Stash slots per stage: the most stage inputs any stage holds at once (stage 0
        recomputes from the call's arguments and holds none)."""
        s_count = self.op.shape[1]
        return max((self._live(s, FORWARD, s - 1, BACKWARD) for s in range(1, s_count)), default=0)

    def pending(self) -> int:
        """Gradient slots per stage: the most received output gradients waiting for their
        backward."""
        s_count = self.op.shape[1]
        return max((self._live(s, BACKWARD, s + 1, BACKWARD) for s in range(s_count - 1)),
                   default=0)

    def __str__(self) -> str:
        rows = []
        for s in range(self.op.shape[1]):
            cells = [f"{_OP_LETTER[int(o)]}{int(m) if o else ''}".ljust(2)
                     for o, m in zip(self.op[:, s], self.mb[:, s], strict=True)]
            while cells and cells[-1].strip() == ".":  # trailing idle ticks are not shown
                cells.pop()
            rows.append(f"s{s}: " + " ".join(cells).rstrip())
        return "\n".join(rows)


def _gpipe_order(stage: int, num_stages: int, m: int) -> list[tuple[int, int]]:
    return [(FORWARD, k) for k in range(m)] + [(BACKWARD, k) for k in range(m)]


def _1f1b_order(stage: int, num_stages: int, m: int) -> list[tuple[int, int]]:
    warm = min(num_stages - 1 - stage, m)
    order = [(FORWARD, k) for k in range(warm)]
    for k in range(m - warm):
        order += [(FORWARD, warm + k), (BACKWARD, k)]
    return order + [(BACKWARD, k) for k in range(m - warm, m)]


def _list_schedule(sched: TrainSchedule, num_stages: int, m: int) -> TickTable:
    """Places each stage's ops in order, each at the first tick after its inputs exist: a
    forward needs the previous stage's forward of its microbatch, a backward the next
    stage's backward (the last stage: its own forward)."""
    orders = [sched.order(s, num_stages, m) for s in range(num_stages)]
    done: dict[tuple[int, int, int], int] = {}  # (op, microbatch, stage) -> tick
    nxt = [0] * num_stages
    ops, mbs = [], []
    t = 0
    while any(n < len(o) for n, o in zip(nxt, orders, strict=True)):
        op_row, mb_row = [IDLE] * num_stages, [0] * num_stages
        for s in range(num_stages):
            if nxt[s] == len(orders[s]):
                continue
            op, k = orders[s][nxt[s]]
            if op == FORWARD:
                need = (FORWARD, k, s - 1) if s > 0 else None
            else:
                need = (BACKWARD, k, s + 1) if s < num_stages - 1 else (FORWARD, k, s)
            if need is None or done.get(need, t) < t:
                op_row[s], mb_row[s] = op, k
        for s in range(num_stages):
            if op_row[s] != IDLE:
                done[op_row[s], mb_row[s], s] = t
                nxt[s] += 1
        ops.append(op_row)
        mbs.append(mb_row)
        t += 1
    return TickTable(np.array(ops, np.int32), np.array(mbs, np.int32))


TRAIN_SCHEDULES: dict[str, TrainSchedule] = {
    "gpipe": TrainSchedule("gpipe", _gpipe_order),
    "1f1b": TrainSchedule("1f1b", _1f1b_order),
}


def get_train(name: str) -> TrainSchedule:
    """The training schedule called ``name``.

    Raises:
        ConfigError: no such schedule (the message lists the names).

    Example:
        >>> get_train("1f1b").table(4, 8).stash()
        4
    """
    if name not in TRAIN_SCHEDULES:
        raise ConfigError(f"training schedule={name!r} is not one of {sorted(TRAIN_SCHEDULES)}.")
    return TRAIN_SCHEDULES[name]
