"""A Plan as JSON and back: ``Plan.to_json`` / ``Plan.from_json``.

Decoding follows the dataclasses' own field types (``typing.get_type_hints``), so a field
added to ``Plan``, ``Stage``, ``LayerNumbers`` or ``Footprint`` is read without a change here.
Text that is not a plan as ``to_json`` writes it raises ``PlanFormatError`` naming the field
(``numbers.footprints[3].weights_bytes``), what it holds and what it should hold.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing

import numpy as np

from lwjax.errors import PlanFormatError

if typing.TYPE_CHECKING:
    from lwjax.plan import Plan


def encode(plan: Plan) -> str:
    """The plan as indented JSON (dataclasses as objects, tuples as lists).

    Example:
        >>> decode(encode(plan)) == plan
        True
    """
    return json.dumps(_plain(plan), indent=1)


def decode(text: str | bytes) -> Plan:
    """The plan ``encode`` wrote.

    Raises:
        PlanFormatError: the text is not JSON, a field is missing, unknown or of the wrong
            type, or the stages do not agree with the per-layer numbers.

    Example:
        >>> decode(plan.to_json()).stages == plan.stages
        True
    """
    from lwjax.plan import Plan

    if not isinstance(text, str | bytes | bytearray):
        raise PlanFormatError(
            f"Plan.from_json takes the JSON text Plan.to_json() returned, got a "
            f"{type(text).__name__}. To load a file: Plan.from_json(pathlib.Path(path)."
            "read_text()).")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        start = text[:40] if isinstance(text, str) else bytes(text[:40])
        raise PlanFormatError(
            f"Plan.from_json: the text is not JSON ({e.msg} at line {e.lineno} column "
            f"{e.colno}; it starts {start!r}). Pass the string Plan.to_json() returned; to "
            "load a file, read it first: Plan.from_json(pathlib.Path(path).read_text()).") from None
    plan = _value(data, Plan, "")
    _check_consistent(plan)
    return plan


# ---- encoding -------------------------------------------------------------------------------

def _plain(x):
    if isinstance(x, np.integer | np.floating):
        return x.item()
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple | list):
        return [_plain(v) for v in x]
    return x


# ---- decoding, by the fields' types ---------------------------------------------------------

def _fail(where: str, message: str) -> PlanFormatError:
    """``where`` (a field path; '' for the whole plan) followed by ``message``."""
    return PlanFormatError(
        f"Plan.from_json: {where or 'the plan'} {message}. The text must be a plan as "
        f"Plan.to_json() writes it: correct {where or 'it'}, or write the plan again with "
        "plan.to_json().")


def _shown(value) -> str:
    text = json.dumps(value)
    return (text if len(text) <= 40 else text[:37] + "...") + f" ({_json_type(value)})"


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "?")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _value(value, hint, where: str):
    """``value`` (parsed JSON) as the Python type ``hint``; PlanFormatError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _dataclass(value, hint, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(value, inner, where)
    if origin is typing.Literal:
        if value not in args:
            raise _fail(where, f"is {_shown(value)}; expected one of "
                               f"{', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _fail(where, f"is {_shown(value)}; expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise _fail(where, f"has {len(value)} entries; expected {len(args)}")
        return tuple(_value(v, a, f"{where}[{i}]") for i, (v, a) in
                     enumerate(zip(value, args, strict=True)))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(where, f"is {_shown(value)}; expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value):
            raise _fail(where, f"is {_shown(value)}; expected a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _fail(where, f"is {_shown(value)}; expected a string")
        return value
    raise TypeError(f"plan_json cannot decode the field type {hint!r} ({where})")  # lwjax bug


def _dataclass(value, cls, where: str):
    if not isinstance(value, dict):
        raise _fail(where, f"is {_shown(value)}; expected an object with the fields of "
                           f"{cls.__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in value]
    if missing:
        raise _fail(where, f"lacks the {cls.__name__} field{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(missing)}")
    unknown = [k for k in value if k not in fields and k not in _DERIVED.get(cls.__name__, ())]
    if unknown:
        raise _fail(where, f"has the unknown field{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))} ({cls.__name__} has "
                           f"{', '.join(fields)})")
    hints = _hints(cls)
    prefix = f"{where}." if where else ""
    return cls(**{n: _value(v, hints[n], prefix + n) for n, v in value.items() if n in fields})


# Keys some writers add beside a dataclass's fields (Footprint.to_dict's total), ignored.
_DERIVED = {"Footprint": ("total_bytes",)}


def _check_consistent(plan: Plan) -> None:
    """The stages cover the layers in order and agree with the per-layer numbers."""
    n = plan.numbers
    count = len(n.names)
    for name in ("footprints", "costs_s"):
        if len(getattr(n, name)) != count:
            raise _fail(f"numbers.{name}", f"has {len(getattr(n, name))} entries but "
                                           f"numbers.names has {count}")
    for name in ("stored", "cached"):  # per segment: the prologue, each layer, the epilogue
        if getattr(n, name) and len(getattr(n, name)) != count + 2:
            raise _fail(f"numbers.{name}", f"has {len(getattr(n, name))} entries; expected "
                                           f"{count + 2} (the prologue, {count} layers, the "
                                           "epilogue) or none")
    for name in ("microbatches", "microbatch_size", "tp", "capacity_bytes", "virtual"):
        if getattr(plan, name) < 1:
            raise _fail(name, f"is {getattr(plan, name)}; expected a positive integer")
    if not plan.stages:
        raise _fail("stages", "is empty; a plan has at least one stage")
    if len(plan.stages) % plan.virtual:
        raise _fail("virtual", f"is {plan.virtual}, which does not divide the "
                               f"{len(plan.stages)} stages (stages per device)")
    if plan.virtual > 1 and (plan.mode != "prefill" or plan.tp != 1):
        raise _fail("virtual", f"is {plan.virtual} with mode={plan.mode!r} and tp={plan.tp}; "
                               "several stages per device run forward (prefill) plans of tp 1")
    stop = 0
    for k, s in enumerate(plan.stages):
        where = f"stages[{k}]"
        a, b = s.layer_range
        if s.index != k:
            raise _fail(f"{where}.index", f"is {s.index}; expected {k} (stages in order)")
        if a != stop or not a < b <= count:
            raise _fail(f"{where}.layer_range", f"is [{a}, {b}]; expected [{stop}, b] with "
                                                f"{stop} < b <= {count} (stages cover the "
                                                "layers in order)")
        if s.layers != n.names[a:b]:
            raise _fail(f"{where}.layers", f"is {list(s.layers)}; numbers.names[{a}:{b}] is "
                                           f"{list(n.names[a:b])}")
        stray = [d for d in s.devices if d not in plan.device_pool]
        if stray or len(s.devices) != plan.tp:
            raise _fail(f"{where}.devices", f"is {list(s.devices)}; expected tp={plan.tp} ids "
                                            f"from device_pool {list(plan.device_pool)}")
        stop = b
    if stop != count:
        raise _fail("stages", f"ends at layer {stop}; numbers.names has {count} layers")
