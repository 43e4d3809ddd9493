"""Failover's new plan: the plan a running model moves to when devices are lost. Pure
functions of plans (they touch no device):

- ``switch_plan``: hot spares take the lost stages' places; the partition is unchanged;
- ``local_repair``: the old partition, repaired where it broke (a lost stage runs on a new
  spare, or its layers join a neighbour), when that is projected no slower than a full
  re-partition;
- ``keep_in_place``: a re-partition's stages permuted over its devices so that as many
  weight bytes as possible stay where they are.

Example:
    >>> planned = old.replan(exclude_devices=[5])
    >>> new = local_repair(old, planned, [5], []) or keep_in_place(planned, old)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from lwjax.passes.planner import stage_footprint
from lwjax.plan import Plan, Stage


def local_repair(old: Plan, planned: Plan, excluded: Sequence[int],
                 spares: Sequence[int]) -> Plan | None:
    """``old``'s partition, repaired where it broke: each lost stage runs on a new spare if
    one is left, else its layers join the faster of its surviving neighbours. Every other
    stage keeps its layers and device, so only the lost layers move. Returns None when a
    stage would not fit or the repair is projected slower than ``planned`` (a full
    re-partition), under the plan's own objective.

    Example:
        >>> repaired = local_repair(old, old.replan(exclude_devices=[5]), [5], [])
        >>> [st.layer_range for st in repaired.stages][4]      # stage 5's layer joined 4
        (4, 6)
    """
    if old.tp != 1 or old.mode == "train":
        return None
    free = [d for d in spares if d not in excluded]
    ranges = [list(st.layer_range) for st in old.stages]
    devs: list[int | None] = [st.devices[0] for st in old.stages]
    for k, d in enumerate(devs):
        if d in excluded:
            devs[k] = free.pop(0) if free else None
    if all(d is None for d in devs):
        return None

    def alive_next_to(k: int) -> list[int]:
        return [n for n in (k - 1, k + 1) if 0 <= n < len(devs) and devs[n] is not None]

    while None in devs:  # a lost stage next to a surviving one joins it
        k = next(k for k, d in enumerate(devs) if d is None and alive_next_to(k))
        alive = alive_next_to(k)
        times = {n: sum(old.numbers.costs_s[ranges[n][0]:ranges[n][1]]) for n in alive}
        n = min(alive, key=lambda m: (times[m], m))
        ranges[n] = [min(ranges[n][0], ranges[k][0]), max(ranges[n][1], ranges[k][1])]
        del ranges[k], devs[k]
    num = len(ranges)
    stages = tuple(
        Stage(index=k, layers=old.numbers.names[a:b], layer_range=(a, b), devices=(d,),
              footprint=stage_footprint(old.numbers, a, b, num),
              est_time_s=sum(old.numbers.costs_s[a:b]))
        for k, ((a, b), d) in enumerate(zip(ranges, devs, strict=True)))
    repaired = dataclasses.replace(planned, stages=stages, notes=(
        *planned.notes, "repaired in place: the lost stages' layers run on spares or join a "
                        "neighbour; every other stage keeps its layers and device"))
    if any(repaired.device_bytes(st) > repaired.capacity_bytes for st in stages):
        return None

    def score(p: Plan) -> float:
        return p.bottleneck.est_time_s if p.objective == "bottleneck" else p.step_time_s

    return repaired if score(repaired) <= score(planned) * (1 + 1e-9) else None


def _new_plan(old: Plan, excluded: Sequence[int], spares: Sequence[int]) -> Plan:
    """The plan to move to: the repaired old partition when it is projected no slower than
    a full re-partition, else that re-partition with devices keeping what they hold."""
    planned = old.replan(exclude_devices=excluded, spare_devices=spares)
    return local_repair(old, planned, excluded, spares) or keep_in_place(planned, old)


def keep_in_place(plan: Plan, old: Plan) -> Plan:
    """``plan`` with its stages' devices permuted so that as many weight bytes as possible
    stay where they are: stage k scores device d by the weight bytes of the layers both it
    and d's old stage run; pairs are taken best first (greedy matching), the rest in pool
    order. The partition, and so the projected step, is unchanged (devices are alike).

    Example:
        >>> keep_in_place(old.replan(exclude_devices=[6], spare_devices=[12]), old)
    """
    if plan.tp != 1:
        return plan
    weights = [f.weights_bytes for f in plan.numbers.footprints]
    held = {st.devices[0]: set(range(*st.layer_range)) for st in old.stages}
    devs = [st.devices[0] for st in plan.stages]
    pairs = sorted(((sum(weights[i] for i in range(*st.layer_range) if i in held.get(d, ())),
                     -k, -n, k, d) for k, st in enumerate(plan.stages)
                    for n, d in enumerate(devs)), reverse=True)
    chosen: dict[int, int] = {}
    for score, _, _, k, d in pairs:
        if score > 0 and k not in chosen and d not in chosen.values():
            chosen[k] = d
    rest = iter(d for d in devs if d not in chosen.values())
    order = [chosen[k] if k in chosen else next(rest) for k in range(len(plan.stages))]
    if order == devs:
        return plan
    return dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(st, devices=(d,)) for st, d in zip(plan.stages, order, strict=True)))


def switch_plan(plan: Plan, replace: Mapping[int, int], excluded: Sequence[int]) -> Plan:
    """The same partition with stage k on device ``replace[k]`` (its hot spare).

    Example:
        >>> switch_plan(plan, {2: 9}, [2]).stages[2].devices     # stage 2 ran on device 2
        (9,)
    """
    stages = tuple(dataclasses.replace(st, devices=(replace[k],)) if k in replace else st
                   for k, st in enumerate(plan.stages))
    pool = tuple(d for d in plan.device_pool if d not in excluded) + tuple(
        d for d in replace.values() if d not in plan.device_pool)
    note = (f"devices {list(excluded)} lost: stage(s) {sorted(replace)} switched to hot "
            f"spare(s) {[replace[k] for k in sorted(replace)]}")
    return dataclasses.replace(plan, stages=stages, device_pool=pool,
                               notes=(*plan.notes, note))
