"""Checks that a given Plan (replanned, or loaded with ``Plan.from_json``) fits the model and
the call it is asked to run, before anything is lowered.

A plan carries its layers' names and structural signatures (``LayerNumbers.signatures``: a
hash of each layer's equations, shapes and dtypes), so a plan made for another model, another
sequence length or another dtype is refused with what differs.

Example:
    >>> check_plan(plan, graph_at(check_plan_batch(plan, batch)), device_ids)
"""

from __future__ import annotations

from collections.abc import Sequence

from lwjax.errors import ConfigError, DeviceError, InputError
from lwjax.passes.segment import LayerGraph
from lwjax.plan import Plan


def check_plan_batch(plan: Plan, batch: int) -> int:
    """The plan's microbatch size, after checking it divides the call's batch as planned.

    Raises:
        ConfigError: ``plan`` is not a Plan.
        InputError: the batch differs from the plan's M x microbatch size.

    Example:
        >>> check_plan_batch(plan, 8)   # a plan of 4 microbatches of 2
        2
    """
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan= must be an lwjax.Plan (from lwjax.plan, Plan.replan or "
                          f"Plan.from_json); got a {type(plan).__name__}.")
    for field in ("microbatches", "microbatch_size", "tp"):
        value = getattr(plan, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"the plan's {field}={value!r} is not a positive integer (an "
                              "edited plan?); plan again or correct it.")
    planned = plan.microbatches * plan.microbatch_size
    if planned != batch:
        raise InputError(
            f"the plan runs {plan.microbatches} microbatches of {plan.microbatch_size} "
            f"(batch {planned}), but the call's batch is {batch}. Call with a batch of "
            f"{planned}, or plan again for this batch.")
    return plan.microbatch_size


def _names_differ(planned: Sequence[str], found: Sequence[str]) -> str:
    if len(planned) != len(found):
        return (f"the plan has {len(planned)} layers ({_span(planned)}), the model "
                f"{len(found)} ({_span(found)})")
    i = next(i for i, (a, b) in enumerate(zip(planned, found, strict=True)) if a != b)
    return f"layer {i} is {planned[i]!r} in the plan and {found[i]!r} in the model"


def _span(names: Sequence[str]) -> str:
    return "none" if not names else names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"


def check_plan(plan: Plan, graph: LayerGraph, device_ids: Sequence[int],
               mode: str = "prefill") -> None:
    """Refuses a plan that was not made for this model and these devices.

    Args:
        plan: the plan to run.
        graph: the model segmented at the plan's microbatch size.
        device_ids: ids of the devices available to run it.
        mode: what will run it: "prefill" (``layerwise_shard``, which also runs training
            plans: their stages run the forward pass too) or "decode"
            (``layerwise_generate``).

    Raises:
        ConfigError: the plan is for another mode; its layers, shapes or
            dtypes differ from the model's; its stages do not cover the layers in order.
        DeviceError: a device of the plan is not among ``device_ids``, or is used twice.

    Example:
        >>> check_plan(Plan.from_json(saved), graph, [d.id for d in jax.devices()])
    """
    if plan.mode != mode and not (plan.mode == "train" and mode == "prefill"):
        runner = "layerwise_shard runs the forward pass" if mode == "prefill" else \
            "layerwise_generate decodes"
        raise ConfigError(f"the plan was made for mode={plan.mode!r}; {runner} ({mode}). "
                          f"Plan with mode={mode!r}.")
    found = tuple(layer.name for layer in graph.layers)
    if tuple(plan.numbers.names) != found:
        differ = _names_differ(plan.numbers.names, found)
        raise ConfigError(f"the plan was made for another model: {differ}. Plan this model "
                          "again (lwjax.plan, or layerwise_shard without plan=).")
    signatures = tuple(plan.numbers.signatures)
    if len(signatures) != len(found) or len(plan.numbers.outer_signatures) != 2:
        raise ConfigError(
            "the plan carries no structural signatures of its layers (made by an older lwjax, "
            "or edited), so lwjax cannot check that it was made for this model. Plan again "
            "(lwjax.plan, or layerwise_shard without plan=) and save that plan.")
    mine = tuple(layer.signature for layer in graph.layers)
    differ = [name for name, a, b in zip(found, signatures, mine, strict=True) if a != b]
    outer = [name for name, a, b in zip(("prologue (embedding)", "epilogue (head)"),
                                        plan.numbers.outer_signatures,
                                        graph.outer_signatures, strict=True) if a != b]
    if differ or outer:
        what = " and ".join(filter(None, [
            f"{len(differ)} of {len(found)} layers ({_span(differ)})" if differ else "",
            *outer]))
        raise ConfigError(
            f"the plan was made for a model of other shapes or dtypes; what differs in its "
            f"computation: {what} (a different sequence length, hidden size, vocabulary, input "
            f"dtype or microbatch size). Plan this model again.")
    start = 0
    for s in plan.stages:
        a, b = s.layer_range
        if a != start or b <= a or tuple(s.layers) != found[a:b]:
            raise ConfigError(
                f"stage {s.index} of the plan runs layers {s.layer_range} "
                f"({_span(s.layers)}), which does not continue the previous stage at layer "
                f"{start}; the stages must cover the layers 0..{len(found)} in order.")
        if len(s.devices) != plan.tp:
            raise ConfigError(f"stage {s.index} has {len(s.devices)} devices but the plan's "
                              f"tp is {plan.tp}; every stage must have tp devices.")
        start = b
    if start != len(found):
        raise ConfigError(f"the plan's stages end at layer {start} of {len(found)}; they must "
                          "cover every layer.")
    ring = _ring(plan)
    used = [d for s in plan.stages[:ring] for d in s.devices]
    missing = [d for d in used if d not in set(device_ids)]
    if missing:
        raise DeviceError(f"the plan runs on devices {missing}, which are not in devices= "
                          f"(ids {list(device_ids)}); pass devices that include them, or "
                          "replan with Plan.replan(exclude_devices=...).")
    twice = sorted({d for d in used if used.count(d) > 1})
    if twice:
        raise DeviceError(f"the plan uses devices {twice} in more than one stage; each "
                          "device runs one stage (circular plans: one stage per lap).")


def _ring(plan: Plan) -> int:
    """The plan's device groups S; a circular plan's stage k must run on stage k mod S's
    devices."""
    if plan.virtual > 1 and (plan.mode != "prefill" or plan.tp != 1):
        raise ConfigError(f"the plan runs {plan.virtual} stages per device (circular) with "
                          f"mode={plan.mode!r}, tp={plan.tp}: only forward (prefill) plans of "
                          "one device per stage run several stages per device. Plan again.")
    if plan.virtual < 1 or len(plan.stages) % plan.virtual:
        raise ConfigError(f"the plan runs {len(plan.stages)} stages as virtual="
                          f"{plan.virtual} per device; the stage count must be a multiple of "
                          "it. Plan again, or correct virtual.")
    ring = plan.ring
    for s in plan.stages[ring:]:
        if s.devices != plan.stages[s.index % ring].devices:
            raise DeviceError(
                f"stage {s.index} of a circular plan ({plan.virtual} stages per device) runs "
                f"on devices {list(s.devices)}, but stage {s.index % ring}'s devices "
                f"{list(plan.stages[s.index % ring].devices)} hold it: stage k runs on stage "
                f"k mod {ring}'s. Plan again, or correct its devices.")
    return ring
