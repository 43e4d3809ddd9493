"""Axis groups: which dimensions of a jaxpr's values are split together, and which of them the
program moves data along.

When a weight is split along one dimension, XLA's sharding propagation (forward and backward)
splits every dimension tied to it: the matching dimension of the weight's product, of an
activation contracted with it, of an elementwise partner, and so on. ``axis_groups`` builds
these ties for a whole jaxpr as a union-find over (value, dimension) pairs, one rule per
primitive:

- elementwise, broadcast, transpose, reshape (a dimension kept whole, split into an outer
  factor, or merged as the outer factor), squeeze, reduce (kept dimensions), dot_general
  (batch and free dimensions with the output, contracting dimensions with each other),
  calls (jit, remat, custom_jvp: through the body, per call site): dimensions tied.
- slice / split / concatenate / pad / rev / dynamic_slice / dynamic_update_slice partially
  along a dimension, cumulative ops and windowed reductions along it: the dimension is
  *mixed* -- a device would need its neighbours' pieces, which XLA's partitioner fetches with
  collective-permutes (``passes/collectives.py``: inside a stage's branch they hang).
- sort and top_k along a dimension: *selected* -- split there, XLA all-gathers the whole
  dimension inside the tp group before it selects (an MoE router split over experts costs an
  all-gather for top_k and two all-reduces for the softmax in every layer). That cannot
  hang, so it is a cost, not a ban: ``passes/tp.py`` keeps a small weight whole along it (a
  router [D, E]) and may still split a large one (an LM head under top-k sampling). Their
  other dimensions are tied.
- anything else (gather, scatter, conv, while, cond, ...): the explicit default, no ties
  and no mixing -- the walk ends there; the compiled-program check in ``passes/collectives.py``
  is the safety net for what lies beyond.

Example:
    >>> groups = axis_groups(graph.jaxpr.jaxpr)
    >>> q = graph.param_vars[[p.path for p in graph.params].index("layers/0/attn/q")]
    >>> groups.mixed(q, 2), groups.mixed(q, 1)   # tiny_dense q [D, N, H]: rotary slices H
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from lwjax._compat import Jaxpr, JaxprEqn, Var, jaxprs_in_params

Node = tuple[tuple[int, ...], Var, int]  # (call-site path, value, dimension)
Ties = tuple[list[list[tuple[Var, int]]], list[tuple[Var, int]]]  # (groups, mixed)
Rule = Callable[[JaxprEqn], Ties]


class AxisGroups:
    """Union-find over (value, dimension) pairs of a jaxpr and the pairs that are mixed."""

    def __init__(self):
        self._parent: dict[Node, Node] = {}
        self._marked: dict[str, set[Node]] = {"mixed": set(), "selected": set()}
        self._roots: dict[str, set[Node]] = {}

    def find(self, node: Node) -> Node:
        parent = self._parent.setdefault(node, node)
        while parent != node:
            grand = self._parent[parent]
            self._parent[node] = grand
            node, parent = parent, grand
        return node

    def union(self, nodes: Iterable[Node]) -> None:
        nodes = list(nodes)
        if len(nodes) < 2:
            return
        root = self.find(nodes[0])
        for n in nodes[1:]:
            other = self.find(n)
            if other != root:
                self._parent[other] = root

    def mark(self, node: Node, kind: str = "mixed") -> None:
        self._marked[kind].add(node)

    def mixed(self, var: Var, dim: int, path: tuple[int, ...] = ()) -> bool:
        """Whether ``var``'s dimension ``dim`` is tied to a dimension the program mixes."""
        return self._tied(var, dim, path, "mixed")

    def selected(self, var: Var, dim: int, path: tuple[int, ...] = ()) -> bool:
        """Whether ``var``'s dimension ``dim`` is tied to one that sort or top_k runs along."""
        return self._tied(var, dim, path, "selected")

    def _tied(self, var: Var, dim: int, path: tuple[int, ...], kind: str) -> bool:
        if kind not in self._roots:
            self._roots[kind] = {self.find(n) for n in self._marked[kind]}
        return self.find((path, var, dim)) in self._roots[kind]


def axis_groups(jaxpr: Jaxpr) -> AxisGroups:
    """The ties and the mixed dimensions of ``jaxpr`` (see the module docstring)."""
    groups = AxisGroups()
    _add(groups, jaxpr, ())
    return groups


def _add(groups: AxisGroups, jaxpr: Jaxpr, path: tuple[int, ...]) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in CALLS:
            _add_call(groups, eqn, path)
            continue
        ties, mixed = RULES.get(eqn.primitive.name, _ends)(eqn)
        for group in ties:
            groups.union((path, v, d) for v, d in group if isinstance(v, Var))
        for v, d in mixed:
            if isinstance(v, Var):
                groups.mark((path, v, d))
        if eqn.primitive.name in SELECTS:
            dim = SELECTS[eqn.primitive.name](eqn)
            for v in eqn.invars:
                if isinstance(v, Var) and len(_shape(v)) > dim:
                    groups.mark((path, v, dim), "selected")


def _add_call(groups: AxisGroups, eqn: JaxprEqn, path: tuple[int, ...]) -> None:
    """A call: its body's dimensions, per call site, tied to the call's operands and results."""
    bodies = list(jaxprs_in_params(eqn.params))
    if len(bodies) != 1 or len(bodies[0].invars) != len(eqn.invars) or \
            len(bodies[0].outvars) != len(eqn.outvars):
        return
    body, inner = bodies[0], (*path, id(eqn))
    _add(groups, body, inner)
    pairs = (*zip(eqn.invars, body.invars, strict=True),
             *zip(eqn.outvars, body.outvars, strict=True))
    for outer, var in pairs:
        if isinstance(outer, Var) and isinstance(var, Var):
            for d in range(len(outer.aval.shape)):
                groups.union([(path, outer, d), (inner, var, d)])


CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
                   "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})


# ---- per-primitive rules: (ties, mixed) ------------------------------------------------------

def _shape(v) -> tuple[int, ...]:
    return tuple(getattr(v.aval, "shape", ()))


def _ends(eqn):
    """The explicit default: no ties, nothing mixed (the walk ends at this equation)."""
    return [], []


def _elementwise(eqn):
    out = eqn.outvars[0]
    shape = _shape(out)
    ties = []
    for d, size in enumerate(shape):
        group = [(o, d) for o in eqn.outvars if _shape(o) == shape]
        group += [(v, d) for v in eqn.invars if len(_shape(v)) == len(shape)
                  and _shape(v)[d] == size]
        ties.append(group)
    return ties, []


def _along(mixed_dims: Callable[[JaxprEqn], Iterable[int]], mark: bool = True) -> Rule:
    """Same-rank operands and results tied per dimension, except ``mixed_dims``, which are
    marked mixed (slices, concatenations, scans along them), or with ``mark=False`` left
    untied only (sort, top_k: ``SELECTS`` marks them)."""
    def rule(eqn):
        rank = len(_shape(eqn.outvars[0]))
        mixed = set(mixed_dims(eqn))
        values = [v for v in (*eqn.invars, *eqn.outvars) if len(_shape(v)) == rank]
        ties = [[(v, d) for v in values] for d in range(rank) if d not in mixed]
        return ties, [(v, d) for v in values for d in mixed] if mark else []
    return rule


def _top_k_axis(eqn) -> int:
    return eqn.params.get("axis", len(_shape(eqn.invars[0])) - 1)


def _partial(eqn, sizes: Iterable[int]) -> list[int]:
    """Dimensions where the result is not the whole operand."""
    return [d for d, (a, b) in enumerate(zip(_shape(eqn.invars[0]), sizes, strict=True))
            if a != b]


def _slice(eqn):
    p = eqn.params
    strides = p.get("strides") or (1,) * len(p["start_indices"])
    return [d for d, n in enumerate(_shape(eqn.invars[0]))
            if p["start_indices"][d] != 0 or p["limit_indices"][d] != n or strides[d] != 1]


def _window(eqn):
    p = eqn.params
    return [d for d, w in enumerate(p["window_dimensions"])
            if w != 1 or tuple(p["padding"][d]) != (0, 0)]


def _broadcast(eqn):
    operand, out = eqn.invars[0], eqn.outvars[0]
    dims = eqn.params["broadcast_dimensions"]
    return [[(operand, i), (out, d)] for i, d in enumerate(dims)
            if _shape(operand)[i] == _shape(out)[d]], []


def _transpose(eqn):
    perm = eqn.params["permutation"]
    return [[(eqn.invars[0], perm[j]), (eqn.outvars[0], j)] for j in range(len(perm))], []


def _squeeze(eqn):
    gone = set(eqn.params["dimensions"])
    kept = [d for d in range(len(_shape(eqn.invars[0]))) if d not in gone]
    return [[(eqn.invars[0], d), (eqn.outvars[0], j)] for j, d in enumerate(kept)], []


def _reduce(eqn):
    axes = {int(a) for a in eqn.params["axes"]}
    kept = [d for d in range(len(_shape(eqn.invars[0]))) if d not in axes]
    return [[(eqn.invars[0], d), *((o, j) for o in eqn.outvars)]
            for j, d in enumerate(kept)], []


def _dot(eqn):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs, out = eqn.invars[0], eqn.invars[1], eqn.outvars[0]
    ties = [[(lhs, a), (rhs, b)] for a, b in zip(lc, rc, strict=True)]
    ties += [[(lhs, a), (rhs, b), (out, k)] for k, (a, b) in enumerate(zip(lb, rb, strict=True))]
    k = len(lb)
    for v, skip in ((lhs, (*lc, *lb)), (rhs, (*rc, *rb))):
        for d in range(len(_shape(v))):
            if d not in skip:
                ties.append([(v, d), (out, k)])
                k += 1
    return ties, []


def _reshape(eqn):
    """A dimension stays tied when it is kept whole, split (to its outer factor) or merged
    as the outer factor; otherwise the walk ends."""
    if eqn.params.get("dimensions") is not None:
        return [], []
    shape_in, shape_out = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    starts = {}
    acc = 1
    for j, s in enumerate(shape_out):
        if s != 1:
            starts.setdefault(acc, j)
        acc *= s
    ties = []
    for d, size in enumerate(shape_in):
        j = starts.get(int(np.prod(shape_in[:d], dtype=np.int64)))
        if size != 1 and j is not None and (size % shape_out[j] == 0 or shape_out[j] % size == 0):
            ties.append([(eqn.invars[0], d), (eqn.outvars[0], j)])
    return ties, []


def _dynamic_update_slice(eqn):
    operand, update, out = eqn.invars[0], eqn.invars[1], eqn.outvars[0]
    ties, mixed = [], []
    for d, (a, b) in enumerate(zip(_shape(operand), _shape(update), strict=True)):
        pairs = [(operand, d), (update, d), (out, d)]
        (ties.append(pairs) if a == b else mixed.extend(pairs))
    return ties, mixed


# primitives that select along a dimension of their operands (``AxisGroups.selected``)
SELECTS: dict[str, Callable[[JaxprEqn], int]] = {
    "sort": lambda e: e.params["dimension"],
    "top_k": _top_k_axis,
}


_ELEMENTWISE = (
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh",
    "cbrt", "ceil", "clamp", "conj", "convert_element_type", "copy", "copy_p", "cos", "cosh",
    "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision", "rem", "round",
    "rsqrt", "select_n", "sign", "sin", "sinh", "sqrt", "square", "stop_gradient", "sub", "tan",
    "tanh", "xor",
)

RULES: dict[str, Rule] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _reduce for name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
                                  "reduce_and", "reduce_or", "reduce_xor", "argmax", "argmin")},
    **{name: _along(lambda e: [e.params["axis"]])
       for name in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    **{name: _along(_window) for name in ("reduce_window_sum", "reduce_window_max",
                                          "reduce_window_min")},
    "split": _along(lambda e: [e.params["axis"]]),
    # sort, top_k: the selected dimension untied, marked by ``_add`` (``SELECTS``)
    **{name: _along(lambda e, axis=axis: [axis(e)], mark=False)
       for name, axis in SELECTS.items()},
    "concatenate": _along(lambda e: [e.params["dimension"]]),
    "pad": _along(lambda e: [d for d, c in enumerate(e.params["padding_config"])
                             if tuple(c) != (0, 0, 0)]),
    "rev": _along(lambda e: e.params["dimensions"]),
    "slice": _along(_slice),
    "dynamic_slice": _along(lambda e: _partial(e, e.params["slice_sizes"])),
    "dynamic_update_slice": _dynamic_update_slice,
    "broadcast_in_dim": _broadcast,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reshape": _reshape,
    "dot_general": _dot,
}
