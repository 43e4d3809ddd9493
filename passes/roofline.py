"""FLOPs and bytes of a jaxpr, by ``jax.experimental.roofline``'s per-primitive rules.

FLOPs and bytes of a traced function come from ``jax.experimental.roofline``'s per-primitive
rules, applied by lwjax's own interpreter (``cost_from_jaxpr``), because jax's (0.10.2)
counts a ``scan`` body once instead of ``length`` times and counts ``while`` / ``cond`` as
zero. jax has real rules for ``dot_general``, elementwise unary/binary ops, cumulative ops,
``reduce_sum``, ``select_n``, gather/scatter and the collectives (``ppermute``,
``all_gather``, ``reduce_scatter``, ``all_to_all``, ``psum_invariant``: these need the
enclosing ``shard_map``'s mesh); convolutions have only unfused figures (lwjax counts them as
matmuls). Many primitives have a rule that returns 0 by design -- data movement, but also
``reduce_max``, ``top_k``, ``sort``, ``pow``, ``tanh``, linear algebra -- and are listed in
``JaxprCost.zero_rule``. Primitives with no rule at all (e.g. ``psum`` in some forms, custom
primitives), failing rules (a collective outside ``shard_map``) and ``while`` loops (unknown
trip count; body counted once) are listed in ``JaxprCost.unsupported``, never silently zero.

Example:
    >>> cost_of(lambda a, b: a @ b, jnp.ones((8, 16)), jnp.ones((16, 4))).flops
    1024
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import roofline as jax_roofline

from lwjax._compat import ClosedJaxpr, Jaxpr, jaxprs_in_params, roofline_rules
from lwjax._compat import Literal as JaxLiteral
from lwjax.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= 1


def _is_nonneg(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and math.isfinite(value)
        and value >= 0
    )



@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Work of one layer for one microbatch on one device.

    Attributes:
        flops: matmul FLOPs.
        weight_bytes: bytes of weights the layer reads.
        activation_bytes: bytes of activations read plus written.
    """

    flops: float
    weight_bytes: int
    activation_bytes: int

    def __post_init__(self) -> None:
        for name in ("flops", "weight_bytes", "activation_bytes"):
            value = getattr(self, name)
            _require(_is_nonneg(value), f"LayerCost.{name} must be finite and >= 0, got {value!r}.")

    def __add__(self, other: LayerCost) -> LayerCost:
        return LayerCost(
            self.flops + other.flops,
            self.weight_bytes + other.weight_bytes,
            self.activation_bytes + other.activation_bytes,
        )


# ---- FLOPs and bytes of a jaxpr -------------------------------------------------------------


def _is_zero_rule(rule: Callable) -> bool:
    """jax's register_standard_roofline: the primitive is counted as 0 FLOPs and 0 bytes."""
    return getattr(rule, "__qualname__", "").startswith("register_standard_roofline.")


# jax 0.10.2's conv rule fills only unfused_*; lwjax counts a convolution like a matmul.
_MATMUL_LIKE = frozenset({"dot_general", "conv_general_dilated"})


@dataclasses.dataclass(frozen=True)
class JaxprCost:
    """FLOPs and bytes of a jaxpr by jax.experimental.roofline's rules (see module docstring).

    Attributes:
        flops: matmul / convolution FLOPs (elementwise work assumed fused).
        unfused_flops: FLOPs of every primitive with a rule, elementwise included.
        hbm_bytes: bytes read and written by matmuls (operands + results).
        unfused_hbm_bytes: bytes read and written by every primitive with a rule.
        weight_bytes: size of the weight inputs (``weight_invars``) and closed-over constants.
        weight_read_bytes: the part of ``hbm_bytes`` that reads weights (or values computed
            from weights alone, e.g. a transposed or dequantised weight).
        io_activation_bytes: non-weight inputs plus outputs.
        ici_bytes: bytes collectives inside a ``shard_map`` send over the busiest link, per
            device (jax's ring / torus rules).
        unsupported: primitives whose cost is missing (no rule, or its rule failed), with
            counts; the figures are then lower bounds.
        zero_rule: primitives jax's rules count as 0 by design (reshapes, converts, ...).
        notes: approximations taken (costliest ``cond`` branch, ...).
    """

    flops: int
    unfused_flops: int
    hbm_bytes: int
    unfused_hbm_bytes: int
    weight_bytes: int
    weight_read_bytes: int
    io_activation_bytes: int
    ici_bytes: int = 0
    unsupported: tuple[tuple[str, int], ...] = ()
    zero_rule: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every primitive had a working rule."""
        return not self.unsupported

    @property
    def activation_bytes(self) -> int:
        """Activation traffic: matmul bytes that are not weights, at least inputs + outputs."""
        return max(self.hbm_bytes - self.weight_read_bytes, self.io_activation_bytes)

    def layer_cost(self) -> LayerCost:
        """The roofline inputs: FLOPs, weight bytes and activation bytes."""
        return LayerCost(float(self.flops), self.weight_bytes, self.activation_bytes)

    def summary(self) -> str:
        """One line per figure, and what is missing."""
        lines = [
            f"flops           {self.flops:,} (unfused {self.unfused_flops:,})",
            f"matmul bytes    {self.hbm_bytes:,} (weights read {self.weight_read_bytes:,})",
            f"weight bytes    {self.weight_bytes:,}",
            f"activation bytes {self.activation_bytes:,}",
        ]
        if self.ici_bytes:
            lines.append(f"link bytes      {self.ici_bytes:,} (collectives, busiest link)")
        if self.unsupported:
            missing = ", ".join(f"{name} x{n}" for name, n in self.unsupported)
            lines.append(f"NOT COUNTED     {missing}")
        lines += [f"note            {note}" for note in self.notes]
        return "\n".join(lines)


@dataclasses.dataclass
class _Tally:
    """Mutable accumulator of the interpreter (private; results leave as a JaxprCost)."""

    flops: int = 0
    unfused_flops: int = 0
    hbm_bytes: int = 0
    unfused_hbm_bytes: int = 0
    weight_read_bytes: int = 0
    ici_bytes: int = 0
    unsupported: Counter = dataclasses.field(default_factory=Counter)
    zero_rule: set = dataclasses.field(default_factory=set)
    notes: list = dataclasses.field(default_factory=list)

    def absorb(self, other: _Tally) -> None:
        for name in (
            "flops",
            "unfused_flops",
            "hbm_bytes",
            "unfused_hbm_bytes",
            "weight_read_bytes",
            "ici_bytes",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unsupported.update(other.unsupported)
        self.zero_rule |= other.zero_rule
        self.notes += other.notes


def _nbytes(atom) -> int:
    aval = atom.aval
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def _is_weight(atom, weights: set) -> bool:
    return not isinstance(atom, JaxLiteral) and atom in weights


def _inner_weights(inner_vars: Sequence, outer_atoms: Sequence, weights: set) -> set:
    """Inner variables bound to weight-derived outer atoms (positional binding)."""
    return {v for v, a in zip(inner_vars, outer_atoms, strict=True) if _is_weight(a, weights)}


def _walk(
    jaxpr: Jaxpr, weights: set, times: int, tally: _Tally, rules: dict, mesh: Any = None
) -> None:
    """Adds ``times`` x the cost of ``jaxpr`` to ``tally``; ``weights`` holds weight vars;
    ``mesh`` is the enclosing ``shard_map``'s (collective rules need it)."""
    weights = weights | set(jaxpr.constvars)  # closed-over arrays count as weights
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        params = eqn.params
        if name == "scan":
            # Body inputs: consts, carry, xs. Weight consts and weight slices (stacked layer
            # weights scanned over) stay weights; a carry changes per iteration, so it is not.
            body, n_consts = params["jaxpr"].jaxpr, params["num_consts"]
            carry_end = n_consts + params["num_carry"]
            keep = [*range(n_consts), *range(carry_end, len(body.invars))]
            inner = _inner_weights(
                [body.invars[i] for i in keep], [eqn.invars[i] for i in keep], weights
            )
            _walk(body, inner, times * params["length"], tally, rules, mesh)
        elif name == "cond":
            # Count the costliest branch: a planner must budget for the worst case.
            branches = []
            for branch in params["branches"]:
                sub = _Tally()
                _walk(
                    branch.jaxpr,
                    _inner_weights(branch.jaxpr.invars, eqn.invars[1:], weights),
                    times,
                    sub,
                    rules,
                    mesh,
                )
                branches.append(sub)
            tally.absorb(max(branches, key=lambda t: (t.flops, t.hbm_bytes)))
            if len(branches) > 1:
                tally.notes.append(f"cond: counted the costliest of {len(branches)} branches")
        elif name == "while":
            n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
            carry = eqn.invars[n_cond + n_body :]
            for sub, consts in (
                (params["cond_jaxpr"].jaxpr, eqn.invars[:n_cond]),
                (params["body_jaxpr"].jaxpr, eqn.invars[n_cond : n_cond + n_body]),
            ):
                inner = _inner_weights(sub.invars, [*consts, *carry], weights)
                _walk(sub, inner, times, tally, rules, mesh)
            tally.unsupported["while (trip count unknown; body counted once)"] += times
        elif "jaxpr" in params or "call_jaxpr" in params:
            # jit, remat, custom_jvp_call, custom_vjp_call, closed_call, shard_map: the body
            # runs once per call (the same test jax's own interpreter makes).
            sub = params.get("jaxpr", params.get("call_jaxpr"))
            sub = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
            if len(sub.invars) == len(eqn.invars):
                inner = _inner_weights(sub.invars, eqn.invars, weights)
                _walk(sub, inner, times, tally, rules, params.get("mesh", mesh))
            else:
                tally.unsupported[f"{name} (body inputs do not match the call)"] += times
        elif eqn.primitive in rules or next(jaxprs_in_params(params), None) is None:
            _leaf(eqn, weights, times, tally, rules, mesh)  # scatter-add carries a combiner
        else:
            tally.unsupported[f"{name} (sub-jaxprs not understood)"] += times
        # A value computed from weights alone (transpose, dequantise) is still a weight.
        invars = [v for v in eqn.invars if not isinstance(v, JaxLiteral)]
        if invars and all(v in weights for v in invars):
            weights.update(eqn.outvars)


def _leaf(eqn, weights: set, times: int, tally: _Tally, rules: dict, mesh: Any) -> None:
    name = eqn.primitive.name
    rule = rules.get(eqn.primitive)
    if rule is None:
        tally.unsupported[f"{name} (no roofline rule)"] += times
        return
    if _is_zero_rule(rule):
        tally.zero_rule.add(name)
        return
    try:
        ctx = jax_roofline.RooflineRuleContext(
            name_stack=eqn.source_info.name_stack,
            primitive=eqn.primitive,
            avals_in=[v.aval for v in eqn.invars],
            avals_out=[v.aval for v in eqn.outvars],
            jaxpr_eqn_ctx=eqn.ctx,
            mesh=mesh,
            pin_lhs_in_vmem=False,
            pin_rhs_in_vmem=False,
        )
        shapes = [jax_roofline.RooflineShape.from_aval(v.aval) for v in eqn.invars]
        result = rule(ctx, *shapes, **eqn.params)
    except Exception as e:  # any failing rule is reported, never fatal and never zero
        tally.unsupported[f"{name} (rule failed: {type(e).__name__})"] += times
        return
    flops, hbm = result.flops, result.hbm_bytes
    if name in _MATMUL_LIKE:
        flops, hbm = max(flops, result.unfused_flops), max(hbm, result.unfused_hbm_bytes)
    tally.flops += times * int(flops)
    tally.unfused_flops += times * int(max(result.unfused_flops, flops))
    tally.hbm_bytes += times * int(hbm)
    tally.unfused_hbm_bytes += times * int(max(result.unfused_hbm_bytes, hbm))
    # Per mesh axis; a collective over several axes lists the same bytes under each.
    tally.ici_bytes += times * int(max(result.ici_bytes.values(), default=0))
    if hbm:
        weight_operands = sum(_nbytes(v) for v in eqn.invars if _is_weight(v, weights))
        tally.weight_read_bytes += times * min(int(hbm), weight_operands)


def cost_from_jaxpr(
    closed_jaxpr: ClosedJaxpr | Jaxpr, *, weight_invars: Collection[int] = ()
) -> JaxprCost:
    """FLOPs and bytes of a (closed) jaxpr by jax.experimental.roofline's per-primitive rules.

    Recurses into sub-jaxprs: a ``scan`` body counts ``length`` times, a ``cond`` its costliest
    branch, a ``while`` body once (reported in ``unsupported``: its trip count is unknown).

    Args:
        closed_jaxpr: e.g. ``jax.make_jaxpr(f)(*args)``.
        weight_invars: indices into ``jaxpr.invars`` of the weights (closed-over constants
            count as weights too); the rest are activations.

    Returns:
        A JaxprCost; ``.layer_cost()`` gives the roofline's inputs.

    Example:
        >>> a = jnp.ones((8, 16)); b = jnp.ones((16, 4))
        >>> cost_from_jaxpr(jax.make_jaxpr(jnp.matmul)(a, b)).flops   # 2 * 8 * 16 * 4
        1024
    """
    jaxpr = closed_jaxpr.jaxpr if isinstance(closed_jaxpr, ClosedJaxpr) else closed_jaxpr
    n = len(jaxpr.invars)
    bad = [i for i in weight_invars if not (_is_nonneg(i) and int(i) == i and i < n)]
    _require(not bad, f"weight_invars {bad} are not indices of the jaxpr's {n} inputs.")
    weights = {jaxpr.invars[i] for i in weight_invars}
    tally = _Tally()
    _walk(jaxpr, set(weights), 1, tally, roofline_rules())
    weight_bytes = sum(_nbytes(v) for v in [*weights, *jaxpr.constvars])
    io_bytes = sum(_nbytes(v) for v in jaxpr.invars if v not in weights)
    io_bytes += sum(_nbytes(v) for v in jaxpr.outvars)
    return JaxprCost(
        flops=tally.flops,
        unfused_flops=tally.unfused_flops,
        hbm_bytes=tally.hbm_bytes,
        unfused_hbm_bytes=tally.unfused_hbm_bytes,
        weight_bytes=weight_bytes,
        weight_read_bytes=tally.weight_read_bytes,
        io_activation_bytes=io_bytes,
        ici_bytes=tally.ici_bytes,
        unsupported=tuple(sorted(tally.unsupported.items())),
        zero_rule=tuple(sorted(tally.zero_rule)),
        notes=tuple(dict.fromkeys(tally.notes)),
    )


def cost_of(fn: Callable, *args, weight_argnums: Collection[int] = ()) -> JaxprCost:
    """``cost_from_jaxpr`` of ``fn(*args)``; arguments may be ``jax.ShapeDtypeStruct``.

    Example:
        >>> w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
        >>> x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
        >>> cost_of(lambda w, x: x @ w, w, x, weight_argnums=(0,)).weight_bytes
        16384
    """
    _require(
        all(0 <= i < len(args) for i in weight_argnums),
        f"weight_argnums {tuple(weight_argnums)} out of range for {len(args)} arguments.",
    )
    counts = [len(jax.tree.leaves(a)) for a in args]
    starts = np.cumsum([0, *counts])
    leaves = [j for i in weight_argnums for j in range(starts[i], starts[i] + counts[i])]
    return cost_from_jaxpr(jax.make_jaxpr(fn)(*args), weight_invars=leaves)


