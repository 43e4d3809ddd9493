"""Whether a traced model treats the examples of its batch independently.

A pipeline splits the batch into microbatches and runs each through the model on its own, so
it gives the model's answers only when no example's result depends on another example: a
reduction over the batch axis (``x - x.mean(0)``), a matmul contracting it, a sort or
cumulative sum along it, or a slice that keeps some examples (``x[0]``) makes the answers
depend on how the batch is cut. ``batch_mixing`` finds the first such equation.

It walks the jaxpr the way ``jax.core.eval_jaxpr`` does, carrying for every value the set of
its dimensions that run over the batch (the leading axis of every batch-shaped argument), one
rule per primitive in ``RULES``, over the equations the outputs depend on (a batch-wide
statistic the model computes and drops changes no answer). An equation whose outputs have
the shape of its non-scalar operands (elementwise) keeps the union of their batch
dimensions. The explicit default for anything else (scatter, custom calls, ...) is to stop
following the batch there: the check can miss a mixing equation beyond such a primitive (it
never invents one), and ``Mixing``'s absence says only that none was found;
``Independence.unfollowed`` names the primitives where the walk stopped.

Example:
    >>> batch_mixing(graph.traced).mixing is None   # tiny_dense: every example on its own
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from lwjax._compat import Jaxpr, JaxprEqn, Var, dead_code_removed, jaxprs_in_params, source_line

Dims = frozenset[int]
NONE: Dims = frozenset()


class _Mixes(Exception):
    """Raised inside a rule: this equation mixes the examples along ``dim`` of ``operand``."""

    def __init__(self, operand: int, dim: int, why: str):
        super().__init__(why)
        self.operand, self.dim, self.why = operand, dim, why


@dataclasses.dataclass(frozen=True)
class Mixing:
    """The first equation that makes one example's result depend on another's.

    Attributes:
        primitive: the equation's primitive ("reduce_sum", "dot_general", ...).
        shape: the shape of its operand that runs over the batch.
        dim: that operand's batch dimension.
        why: what the equation does along it ("pairs": its result, ``shape``, runs over the
            batch in two dimensions, ``dim`` the second).
        where: the model's source line that traced it ("file.py:12 (fn)"), or "".
        scope: its name stack ("blocks/0/..."), or "".
    """

    primitive: str
    shape: tuple[int, ...]
    dim: int
    why: str
    where: str = ""
    scope: str = ""

    def describe(self) -> str:
        at = " at " + self.where if self.where else ""
        scope = f" (in {self.scope})" if self.scope else ""
        if self.why == "pairs":
            return (f"'{self.primitive}' makes a {list(self.shape)} value that runs over the "
                    f"batch twice, pairing the examples (its dimension {self.dim} and an "
                    f"earlier one){scope}{at}")
        return (f"'{self.primitive}' on a {list(self.shape)} value {self.why} along its "
                f"dimension {self.dim}, which runs over the batch{scope}{at}")


@dataclasses.dataclass(frozen=True)
class Independence:
    """What ``batch_mixing`` found.

    Attributes:
        mixing: the first equation that mixes the examples, or None.
        unfollowed: primitives with batch-dependent operands whose rule is unknown: the walk
            stopped following the batch through their results.
    """

    mixing: Mixing | None
    unfollowed: tuple[str, ...] = ()


def batch_mixing(traced) -> Independence:
    """Checks a ``TracedModel`` (``passes/trace.py``): its batch-shaped arguments' leading
    axis, followed through the jaxpr.

    Example:
        >>> batch_mixing(trace(model, x)).mixing.primitive   # x - x.mean(0) in a block
        'reduce_sum'
    """
    jaxpr = dead_code_removed(traced.closed_jaxpr.jaxpr)  # what reaches no output mixes none
    first_arg = len(jaxpr.invars) - len(traced.args)
    env: dict[Var, Dims] = {}
    for v, batched in zip(jaxpr.invars[first_arg:], traced.batch_shaped, strict=True):
        if batched and getattr(v.aval, "shape", ()):
            env[v] = frozenset({0})
    ctx = _Ctx(traced.batch_size)
    try:
        _walk(jaxpr, env, ctx)
    except _Found as found:
        return Independence(found.mixing, tuple(sorted(ctx.unfollowed)))
    return Independence(None, tuple(sorted(ctx.unfollowed)))


@dataclasses.dataclass
class _Ctx:
    """The walk's state beyond the batch dimensions: the batch size, the primitives it
    stopped at, and the values that count the examples (``jnp.arange(B)``, to index rows)."""

    batch: int
    unfollowed: set[str] = dataclasses.field(default_factory=set)
    # value -> {index-vector component (None: the whole value): the dimension it counts along}
    counters: dict = dataclasses.field(default_factory=dict)


class _Found(Exception):
    def __init__(self, mixing: Mixing):
        super().__init__(mixing.describe())
        self.mixing = mixing


def _walk(jaxpr: Jaxpr, env: dict[Var, Dims], ctx: _Ctx) -> list[Dims]:
    """Runs the rules over ``jaxpr``'s equations; returns its outputs' batch dimensions."""
    def read(v) -> Dims:
        return env.get(v, NONE) if isinstance(v, Var) else NONE

    for eqn in jaxpr.eqns:
        _count(eqn, ctx)
        ins = [read(v) for v in eqn.invars]
        if not any(ins):
            continue
        name = eqn.primitive.name
        try:
            outs = _apply(eqn, ins, ctx)
            if len(outs) != len(eqn.outvars):
                raise ValueError(f"{len(outs)} results for {len(eqn.outvars)} outputs")
        except _Mixes as m:
            v = eqn.invars[m.operand]
            raise _Found(Mixing(name, tuple(v.aval.shape), m.dim, m.why, source_line(eqn),
                                str(eqn.source_info.name_stack))) from None
        except _Found as found:  # inside a call or loop: the user's line is the call's
            inner = found.mixing
            scope = "/".join(s for s in (str(eqn.source_info.name_stack), inner.scope) if s)
            raise _Found(dataclasses.replace(inner, where=inner.where or source_line(eqn),
                                             scope=scope)) from None
        except Exception:  # noqa: BLE001 -- a rule this jax's params break: stop following
            ctx.unfollowed.add(name)
            outs = [NONE] * len(eqn.outvars)
        for v, dims in zip(eqn.outvars, outs, strict=True):
            if len(dims) > 1:  # a [B, B] score, a pairwise difference: examples paired up
                raise _Found(Mixing(name, _shape(v), sorted(dims)[1], "pairs", source_line(eqn),
                                    str(eqn.source_info.name_stack)))
            if dims:
                env[v] = dims
    return [read(v) for v in jaxpr.outvars]


def _walk_body(body: Jaxpr, ins: Sequence[Dims], ctx: _Ctx) -> list[Dims]:
    """``_walk`` of a call's or loop's body, its inputs' batch dimensions ``ins``."""
    return _walk(body, {v: d for v, d in zip(body.invars, ins, strict=True) if d}, ctx)


def _apply(eqn: JaxprEqn, ins: list[Dims], ctx: _Ctx) -> list[Dims]:
    name = eqn.primitive.name
    if name == "gather":
        return _gather(eqn, ins, ctx.counters.get(eqn.invars[1], {}))
    if name in RULES:
        return RULES[name](eqn, ins)
    if name in LOOPS:
        return LOOPS[name](eqn, ins, ctx)
    bodies = list(jaxprs_in_params(eqn.params))
    if len(bodies) == 1 and len(bodies[0].invars) == len(eqn.invars) \
            and len(bodies[0].outvars) == len(eqn.outvars):  # a call: pjit, remat, custom_jvp
        return _walk_body(bodies[0], ins, ctx)
    if not eqn.outvars:  # jax.debug.print, a callback: nothing to follow
        return []
    if not bodies and _is_elementwise(eqn):
        out = _shape(eqn.outvars[0])
        union = frozenset(d for v, dims in zip(eqn.invars, ins, strict=True) for d in dims
                          if _shape(v) and _shape(v)[d] == out[d])
        return [union] * len(eqn.outvars)
    ctx.unfollowed.add(name)
    return [NONE] * len(eqn.outvars)


def _count(eqn: JaxprEqn, ctx: _Ctx) -> None:
    """Follows the values that count the examples, ``jnp.arange(B)`` and what jnp's indexing
    makes of it (the wrap of negative indices, a broadcast, the index vector's
    concatenation), so that ``x[jnp.arange(B), i]`` reads as one row per example."""
    name, counters = eqn.primitive.name, ctx.counters

    def whole(v) -> int | None:
        return counters.get(v, {}).get(None) if isinstance(v, Var) else None

    out = eqn.outvars[0] if eqn.outvars else None
    if name == "iota":
        dim = eqn.params["dimension"]
        if eqn.params["shape"][dim] == ctx.batch:
            counters[out] = {None: dim}
    elif name in ("convert_element_type", "copy") and whole(eqn.invars[0]) is not None:
        counters[out] = {None: whole(eqn.invars[0])}
    elif name == "add" and any(whole(v) is not None for v in eqn.invars) and \
            not all(isinstance(v, Var) for v in eqn.invars):
        counters[out] = {"shifted": next(whole(v) for v in eqn.invars if whole(v) is not None)}
    elif name == "select_n" and len(eqn.invars) == 3 and whole(eqn.invars[1]) is not None \
            and counters.get(eqn.invars[2], {}).get("shifted") == whole(eqn.invars[1]):
        counters[out] = {None: whole(eqn.invars[1])}  # jnp's wrap of a negative index: unused
    elif name == "broadcast_in_dim" and whole(eqn.invars[0]) is not None:
        counters[out] = {None: eqn.params["broadcast_dimensions"][whole(eqn.invars[0])]}
    elif name == "concatenate":
        axis, offset, parts = eqn.params["dimension"], 0, {}
        for v in eqn.invars:
            if whole(v) is not None and whole(v) != axis and _shape(v)[axis] == 1:
                parts[offset] = whole(v)
            offset += _shape(v)[axis]
        if parts and axis == len(_shape(out)) - 1:  # the index vector of a gather
            counters[out] = parts


def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _is_elementwise(eqn: JaxprEqn) -> bool:
    """Results of one shape, every operand a scalar or of that shape (size-1 dimensions
    broadcast)."""
    out = _shape(eqn.outvars[0])
    return all(_shape(o) == out for o in eqn.outvars) and all(
        _shape(v) == () or (len(_shape(v)) == len(out)
                            and all(a in (b, 1) for a, b in zip(_shape(v), out, strict=True)))
        for v in eqn.invars)


def _mix_along(ins: Sequence[Dims], axes, why: str, first: int = 0) -> None:
    """Raises ``_Mixes`` when an operand (``ins[k]`` is operand ``first + k``) has a batch
    dimension among ``axes``."""
    for k, dims in enumerate(ins):
        for d in sorted(dims & set(axes)):
            raise _Mixes(first + k, d, why)


# ---- rules: (eqn, batch dims per operand) -> batch dims per result ---------------------------

def _same(eqn, ins):
    return [ins[0]] * len(eqn.outvars)


def _reduce(eqn, ins):
    axes = [int(a) for a in eqn.params["axes"]]
    _mix_along(ins[:1], axes, "reduces")
    kept = [d for d in range(len(_shape(eqn.invars[0]))) if d not in axes]
    return [frozenset(j for j, d in enumerate(kept) if d in ins[0])] * len(eqn.outvars)


def _cumulative(eqn, ins):
    _mix_along(ins, [eqn.params["axis"]], "accumulates")
    return _same(eqn, ins)


def _sort(eqn, ins):
    _mix_along(ins, [eqn.params["dimension"]], "sorts")
    return [frozenset().union(*ins)] * len(eqn.outvars)


def _top_k(eqn, ins):
    axis = eqn.params.get("axis", len(_shape(eqn.invars[0])) - 1)
    _mix_along(ins, [axis], "selects the top k")
    return _same(eqn, ins)


def _rev(eqn, ins):
    _mix_along(ins, eqn.params["dimensions"], "reverses")
    return _same(eqn, ins)


def _slice(eqn, ins):
    p = eqn.params
    strides = p.get("strides") or (1,) * len(p["start_indices"])
    cut = [d for d, n in enumerate(_shape(eqn.invars[0]))
           if p["start_indices"][d] != 0 or p["limit_indices"][d] != n or strides[d] != 1]
    _mix_along(ins[:1], cut, "slices")
    return [ins[0]]


def _dynamic_slice(eqn, ins):
    full, sizes = _shape(eqn.invars[0]), eqn.params["slice_sizes"]
    _mix_along(ins[:1], [d for d in range(len(full)) if sizes[d] != full[d]], "slices")
    return [ins[0]]


def _dynamic_update_slice(eqn, ins):
    operand, update = _shape(eqn.invars[0]), _shape(eqn.invars[1])
    short = [d for d in range(len(operand)) if update[d] != operand[d]]
    _mix_along(ins[:2], short, "writes part of")
    return [ins[0] | ins[1]]


def _pad(eqn, ins):
    padded = [d for d, (lo, hi, inner) in enumerate(eqn.params["padding_config"])
              if (lo, hi, inner) != (0, 0, 0)]
    _mix_along(ins[:1], padded, "pads")
    return [ins[0]]


def _concatenate(eqn, ins):
    _mix_along(ins, [eqn.params["dimension"]], "concatenates")
    return [frozenset().union(*ins)]


def _split(eqn, ins):
    _mix_along(ins, [eqn.params["axis"]], "splits")
    return _same(eqn, ins)


def _stack(eqn, ins):
    axis = eqn.params["axis"]
    return [frozenset(d + (d >= axis) for d in frozenset().union(*ins))]


def _window(eqn, ins):
    p = eqn.params
    windowed = [d for d, w in enumerate(p["window_dimensions"])
                if w != 1 or tuple(p["padding"][d]) != (0, 0)]
    _mix_along(ins, windowed, "runs a window")
    return [frozenset().union(*ins)] * len(eqn.outvars)


def _broadcast(eqn, ins):
    operand, out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    dims = eqn.params["broadcast_dimensions"]
    return [frozenset(dims[i] for i in ins[0] if operand[i] == out[dims[i]])]


def _transpose(eqn, ins):
    perm = eqn.params["permutation"]
    return [frozenset(j for j, d in enumerate(perm) if d in ins[0])]


def _squeeze(eqn, ins):
    gone = set(eqn.params["dimensions"])
    kept = [d for d in range(len(_shape(eqn.invars[0]))) if d not in gone]
    return [frozenset(j for j, d in enumerate(kept) if d in ins[0])]


def _reshape(eqn, ins):
    """A batch dimension kept whole or merged as the outer factor of a result dimension is
    followed ([B, T, D] -> [B*T, D]); one split apart is not."""
    shape_in, shape_out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    out = set()
    for d in ins[0]:
        before = math.prod(shape_in[:d])
        for j in range(len(shape_out)):
            if math.prod(shape_out[:j]) == before and shape_out[j] % shape_in[d] == 0 and \
                    any(math.prod(shape_in[d:e]) == shape_out[j]
                        for e in range(d + 1, len(shape_in) + 1)):
                out.add(j)
                break
    return [frozenset(out)]


def _dot(eqn, ins):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    _mix_along(ins[:1], lc, "contracts")
    _mix_along([NONE, ins[1]], rc, "contracts")
    out = {k for k, (a, b) in enumerate(zip(lb, rb, strict=True)) if a in ins[0] or b in ins[1]}
    k = len(lb)
    for dims, rank, skip in ((ins[0], len(_shape(eqn.invars[0])), (*lc, *lb)),
                             (ins[1], len(_shape(eqn.invars[1])), (*rc, *rb))):
        for d in range(rank):
            if d not in skip:
                if d in dims:
                    out.add(k)
                k += 1
    return [frozenset(out)]


def _gather(eqn, ins, counting: dict | None = None):
    """Index dimensions (all of the indices' but the last) become the result's non-offset
    dimensions, in order; an operand's batch dimension indexed into mixes, unless it is one
    of its operand_batching_dims or its index counts the examples along an index dimension
    (``counting``: index-vector component -> that dimension, ``x[jnp.arange(B), i]``)."""
    dn = eqn.params["dimension_numbers"]
    operand, indices = ins
    rank_out = len(_shape(eqn.outvars[0]))
    offset = list(dn.offset_dims)
    batch_pairs = dict(zip(dn.operand_batching_dims, dn.start_indices_batching_dims,
                           strict=True))
    for position, d in enumerate(dn.start_index_map):
        k = (counting or {}).get(position)
        if d in operand and k is not None and d in dn.collapsed_slice_dims:
            batch_pairs[d] = k  # row b of the operand for index row b: one example's own
    indexed = set(dn.collapsed_slice_dims) | set(dn.start_index_map)
    _mix_along([operand], [d for d in indexed if d not in batch_pairs], "gathers")
    slice_sizes = eqn.params["slice_sizes"]
    full = _shape(eqn.invars[0])
    _mix_along([operand], [d for d in range(len(full)) if slice_sizes[d] != full[d]
                                and d not in indexed and d not in batch_pairs],
               "gathers part of")
    index_dims = [j for j in range(rank_out) if j not in offset]
    out = {index_dims[d] for d in indices if d < len(_shape(eqn.invars[1])) - 1}
    out |= {index_dims[batch_pairs[d]] for d in operand if d in batch_pairs}
    kept = [d for d in range(len(full)) if d not in set(dn.collapsed_slice_dims)
            and d not in dn.operand_batching_dims]
    out |= {offset[i] for i, d in enumerate(kept) if d in operand}
    return [frozenset(out)]


def _conv(eqn, ins):
    dn = eqn.params["dimension_numbers"]
    lhs_batch, out_batch = dn.lhs_spec[0], dn.out_spec[0]
    if eqn.params.get("batch_group_count", 1) != 1:
        _mix_along(ins[:1], [lhs_batch], "groups")
    _mix_along(ins[:1], [d for d in range(len(_shape(eqn.invars[0])))
                             if d != lhs_batch], "convolves")
    _mix_along([NONE, ins[1]], range(len(_shape(eqn.invars[1]))), "convolves")
    return [frozenset({out_batch}) if lhs_batch in ins[0] else NONE]


RULES: dict[str, Callable[[JaxprEqn, list[Dims]], list[Dims]]] = {
    **{p: _reduce for p in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                            "reduce_and", "reduce_or", "reduce_xor", "argmax", "argmin")},
    **{p: _cumulative for p in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    **{p: _window for p in ("reduce_window_sum", "reduce_window_max", "reduce_window_min",
                            "reduce_window")},
    "sort": _sort, "top_k": _top_k, "rev": _rev, "slice": _slice,
    "dynamic_slice": _dynamic_slice, "dynamic_update_slice": _dynamic_update_slice,
    "pad": _pad, "concatenate": _concatenate, "split": _split, "stack": _stack,
    "broadcast_in_dim": _broadcast, "transpose": _transpose, "squeeze": _squeeze,
    "reshape": _reshape, "dot_general": _dot,
    "conv_general_dilated": _conv,
}


# ---- loops: a body runs with its carries' batch dimensions -----------------------------------

def _scan(eqn, ins, ctx):
    body = eqn.params["jaxpr"].jaxpr
    consts, carries = eqn.params["num_consts"], eqn.params["num_carry"]
    over_batch = any(0 in dims for dims in ins[consts + carries:])
    if carries:  # a loop over the examples that carries something from one to the next
        _mix_along(ins[consts + carries:], [0], "scans", consts + carries)
    xs = [frozenset(d - 1 for d in dims if d) for dims in ins[consts + carries:]]
    inner = [*ins[:consts + carries], *xs]
    outs = _walk_body(body, inner, ctx)
    carry_out = [a | b for a, b in zip(ins[consts:consts + carries], outs[:carries],
                                       strict=True)]
    if carry_out != list(ins[consts:consts + carries]):  # a carry picks the batch up
        inner[consts:consts + carries] = carry_out
        outs = _walk_body(body, inner, ctx)
    # without carries, a scan over the examples (lax.map) stacks one result per example
    stacked = frozenset({0}) if over_batch else NONE
    return [*outs[:carries], *(stacked | {d + 1 for d in dims} for dims in outs[carries:])]


def _while(eqn, ins, ctx):
    p = eqn.params
    cond, body = p["cond_jaxpr"].jaxpr, p["body_jaxpr"].jaxpr
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    carry = list(ins[nc + nb:])
    for _ in range(2):  # once more when a carry picks the batch up
        _walk_body(cond, [*ins[:nc], *carry], ctx)
        outs = _walk_body(body, [*ins[nc:nc + nb], *carry], ctx)
        grown = [a | b for a, b in zip(carry, outs, strict=True)]
        if grown == carry:
            break
        carry = grown
    return carry


def _cond(eqn, ins, ctx):
    outs = [NONE] * len(eqn.outvars)
    for branch in eqn.params["branches"]:
        got = _walk_body(branch.jaxpr, ins[1:], ctx)
        outs = [a | b for a, b in zip(outs, got, strict=True)]
    return outs


LOOPS = {"scan": _scan, "while": _while, "cond": _cond}
