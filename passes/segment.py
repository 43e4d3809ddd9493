"""Pass 2: ClosedJaxpr -> LayerGraph (prologue, ordered layers, epilogue).

Layer boundaries come from equations' name stacks (linen puts module names there; lwjax's
trace scopes an NNX model's submodule calls by their attribute names), read as a tree of
scopes. A *layer family* is a set of sibling scopes under one parent that are the model's
blocks:

- **numbered** siblings, in any naming: ``layers_3`` (lwjax's models), ``Model/h_3`` (linen),
  ``transformer/h/3`` (transformers' Flax models), ``layers.3``, ``block3``; their
  computations may differ (a model may alternate block kinds);
- **repeated** unnumbered siblings that compute the same thing one after another (equal
  structural signatures): ``alpha, beta, gamma``, or NNX attributes ``first, second``.

Of the families whose members' equations do not interleave, the one covering the most weight
bytes (then matmul FLOPs, then members) wins, not the one with the most members at a depth:
numbered sub-modules inside one block (``h/0/ln_1``, ``h/0/ln_2``) lose to the blocks. A
segmentation is refused (``LayerSegmentationError``, naming the candidates and the
``layers=`` override) when its layers hold under 10% of both the weights and the FLOPs, or
leave over half the weights outside the layers while a repeated structure sits there. The
user may name the layers instead: ``layers="transformer/h/*"`` (a pattern of scopes, ``*``
matching one, starting at any depth) or a callable from a name stack to a layer name.

- Before grouping, the jaxpr is normalised by re-tracing it through an interpreter:
  ``pjit``/``closed_call`` equations whose bodies span scopes are inlined (a model jitted as
  a whole), and a ``scan`` over stacked parameters (``nn.scan`` / ``nnx.scan`` layer stacks)
  is unrolled into one layer per iteration, its stacked parameters split into per-iteration
  parameters ``path[i]``.
- Equations before the first layer form the prologue, after the last the epilogue; unscoped
  equations between layers belong to the layer before them.

Each layer records its equations, the parameters it reads (a parameter read by several
segments, e.g. tied embeddings, lists all of them as users), its activation inputs and
outputs, and a structural signature: layers with equal signatures are the same computation on
different weights, so per-layer work (compiling for validation) is done once per signature.

Example:
    >>> g = segment(trace(model, tokens))
    >>> [l.name for l in g.layers][:2]
    ['layers_0', 'layers_1']
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lwjax._compat import ClosedJaxpr, JaxprEqn, Var, bind_eqn, name_stack_of
from lwjax._compat import Literal as JaxLiteral
from lwjax.errors import LayerSegmentationError
from lwjax.passes.discovery import (
    HOW_TO_MARK,
    LayerFamily,
    LayersSpec,
    Scopes,
    choose,
    components,
    family_namer,
    numbered,
    override_namer,
    refuse_outside,
    signature,
)
from lwjax.passes.trace import TracedModel

# calls whose bodies are inlined when they span scopes (remat2: jax.checkpoint / nn.remat)
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint")
@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter leaf as the normalised program sees it.

    Attributes:
        path: the parameter's path; an unrolled scan's slice is ``path[i]``.
        shape: its shape.
        dtype: its stored dtype.
        source: index into ``TracedModel.params``.
        slice_index: for a slice of a stacked (scanned) parameter, the index on axis 0.
        users: names of the segments that read it (more than one for tied weights).
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source: int
    slice_index: int | None
    users: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Segment:
    """A contiguous run of equations: the prologue, one layer, or the epilogue.

    Attributes:
        name: scope name ('layers_3', 'h_0', 'prologue', 'epilogue').
        kind: 'prologue', 'layer' or 'epilogue'.
        eqns: its equations in program order.
        params: indices into ``LayerGraph.params`` of the parameters it reads.
        inputs: activation inputs (program arguments or earlier segments' values), in order.
        outputs: values it defines that later segments or the program's outputs read.
        cache_inputs: program arguments it reads that are KV-cache leaves (decode).
        signature: structural hash (equal for layers that compute the same thing).
    """

    name: str
    kind: Literal["prologue", "layer", "epilogue"]
    eqns: tuple[JaxprEqn, ...]
    params: tuple[int, ...]
    inputs: tuple[Var, ...]
    outputs: tuple[Var, ...]
    cache_inputs: tuple[Var, ...]
    signature: str


@dataclasses.dataclass(frozen=True)
class LayerGraph:
    """The segmented program.

    Attributes:
        jaxpr: the normalised ClosedJaxpr; invars are ``params`` then the traced arguments.
        params: one ParamInfo per parameter invar.
        prologue: equations before the first layer (embedding).
        layers: the layers in order.
        epilogue: equations after the last layer (final norm, LM head).
        traced: the TracedModel this came from.
        family: the layer family the layers are (how they were found).
        total_weights_bytes: bytes of all parameters.
    """

    jaxpr: ClosedJaxpr
    params: tuple[ParamInfo, ...]
    prologue: Segment
    layers: tuple[Segment, ...]
    epilogue: Segment
    traced: TracedModel
    family: LayerFamily | None = None
    total_weights_bytes: int = 0

    @property
    def outside_weights_share(self) -> float:
        """Share of the parameter bytes that no layer reads (prologue / epilogue only)."""
        inside = {i for seg in self.layers for i in seg.params}
        total = sum(p.nbytes for p in self.params)
        outside = sum(p.nbytes for i, p in enumerate(self.params) if i not in inside)
        return outside / total if total else 0.0

    @property
    def shared_weights_share(self) -> float:
        """Share of the parameter bytes the layers read but their family's scopes do not hold
        (a block or table every layer reuses); 0 without a family."""
        total = self.total_weights_bytes
        if not total or self.family is None:
            return 0.0
        inside = (1 - self.outside_weights_share) * total
        return max(inside - self.family.weights_bytes, 0) / total

    @property
    def segments(self) -> tuple[Segment, ...]:
        return (self.prologue, *self.layers, self.epilogue)

    @property
    def param_vars(self) -> tuple[Var, ...]:
        return tuple(self.jaxpr.jaxpr.invars[: len(self.params)])

    @property
    def arg_vars(self) -> tuple[Var, ...]:
        return tuple(self.jaxpr.jaxpr.invars[len(self.params):])

    @property
    def outer_signatures(self) -> tuple[str, str]:
        """Structural hashes of the prologue and the epilogue (embedding and head shapes,
        dtypes of the inputs), so a plan can tell a model whose ends differ."""
        return tuple(signature(s.eqns, s.inputs) for s in (self.prologue, self.epilogue))

    def distinct_layers(self) -> dict[str, tuple[int, ...]]:
        """Signature -> indices of the layers that share it, in first-seen order."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, layer in enumerate(self.layers):
            groups[layer.signature].append(i)
        return {k: tuple(v) for k, v in groups.items()}

    def summary(self) -> str:
        lines = [f"{'segment':<16} {'eqns':>6} {'params':>7} {'in':>4} {'out':>4}"]
        for s in self.segments:
            lines.append(f"{s.name:<16} {len(s.eqns):>6} {len(s.params):>7} "
                         f"{len(s.inputs):>4} {len(s.outputs):>4}")
        return "\n".join(lines)


# ---- normalisation: inline calls spanning layers, unroll scanned layer stacks --------------------

def _sub_stacks(eqn: JaxprEqn) -> list[str]:
    out = []
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        for e in sub.eqns:
            out.append(name_stack_of(e))
            out.extend(_sub_stacks(e))
    return out


def _spans_layers(eqn: JaxprEqn) -> bool:
    """A call (a model jitted as a whole) whose body holds several scopes or a numbered one:
    inlined so that layers can be found inside it."""
    if eqn.primitive.name not in _CALLS:
        return False
    comps = [components(s) for s in _sub_stacks(eqn)]
    return len({c[0] for c in comps if c}) > 1 or any(
        numbered(x) for c in comps for x in c)


def _stacked_param_operands(eqn: JaxprEqn, param_vars: set) -> list[int]:
    """Operand positions of a scan's scanned inputs (xs) that are program parameters."""
    if eqn.primitive.name != "scan" or eqn.params["length"] < 1:
        return []
    n_fixed = eqn.params["num_consts"] + eqn.params["num_carry"]
    return [i for i, v in enumerate(eqn.invars)
            if i >= n_fixed and isinstance(v, Var) and v in param_vars]


def _scan_base(eqn: JaxprEqn) -> str:
    """Name for a scanned stack's iterations: the scope its body runs under (``nn.scan``'s
    module name), else the scan's own innermost scope, else 'layers'."""
    firsts = {(components(name_stack_of(e)) or [""])[0] for e in eqn.params["jaxpr"].jaxpr.eqns}
    if len(firsts) == 1 and "" not in firsts:
        return firsts.pop()
    comps = components(name_stack_of(eqn))
    return comps[-1] if comps else "layers"


def normalize(traced: TracedModel) -> tuple[ClosedJaxpr, tuple[tuple[int, int | None], ...]]:
    """Re-traces the program with layer-spanning calls inlined and scanned stacks unrolled.

    Returns the new ClosedJaxpr and, per new parameter invar, (source leaf, slice index).
    """
    closed = traced.closed_jaxpr
    jaxpr = closed.jaxpr
    n_params = traced.num_params
    param_vars = list(jaxpr.invars[:n_params])
    param_set = set(param_vars)
    stacked: dict[Var, int] = {}  # stacked param var -> scan length
    for eqn in jaxpr.eqns:
        for i in _stacked_param_operands(eqn, param_set):
            stacked[eqn.invars[i]] = eqn.params["length"]
    needs_inline = any(_spans_layers(e) for e in jaxpr.eqns)
    if not stacked and not needs_inline:
        return closed, tuple((i, None) for i in range(n_params))

    sources: list[tuple[int, int | None]] = []
    new_avals = []
    for i, v in enumerate(param_vars):
        if v in stacked:
            for j in range(stacked[v]):
                sources.append((i, j))
                new_avals.append(jax.ShapeDtypeStruct(v.aval.shape[1:], v.aval.dtype))
        else:
            sources.append((i, None))
            new_avals.append(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype))
    arg_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars[n_params:]]

    def run(*leaves):
        env: dict = {}
        pos = 0
        for v in param_vars:
            if v in stacked:
                env[v] = ("slices", list(leaves[pos:pos + stacked[v]]))
                pos += stacked[v]
            else:
                env[v] = leaves[pos]
                pos += 1
        for v, x in zip(jaxpr.invars[n_params:], leaves[pos:], strict=True):
            env[v] = x
        for v, c in zip(jaxpr.constvars, closed.consts, strict=True):
            env[v] = c
        _eval_eqns(jaxpr.eqns, env, "")
        return [_read(env, v) for v in jaxpr.outvars]

    new = jax.make_jaxpr(run)(*new_avals, *arg_avals)
    return new, tuple(sources)


def _read(env, v):
    if isinstance(v, JaxLiteral):
        return v.val
    x = env[v]
    if isinstance(x, tuple) and x and x[0] == "slices":
        return jnp.stack(x[1])  # a stacked parameter read whole (outside its scan)
    return x


def _eval_eqns(eqns, env, prefix: str):
    for eqn in eqns:
        if _spans_layers(eqn):
            inner = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
            inner_closed = inner if isinstance(inner, ClosedJaxpr) else ClosedJaxpr(inner, ())
            sub_env = dict(zip(inner_closed.jaxpr.invars, [_raw(env, v) for v in eqn.invars],
                               strict=True))
            for v, c in zip(inner_closed.jaxpr.constvars, inner_closed.consts, strict=True):
                sub_env[v] = c
            stack = "/".join(p for p in (prefix, name_stack_of(eqn)) if p)
            _eval_eqns(inner_closed.jaxpr.eqns, sub_env, stack)
            outs = [_read(sub_env, v) for v in inner_closed.jaxpr.outvars]
        elif eqn.primitive.name == "scan" and any(
                isinstance(v, Var) and isinstance(env.get(v), tuple) for v in eqn.invars):
            outs = _unroll_scan(eqn, env, prefix)
        else:
            outs = bind_eqn(eqn, [_read(env, v) for v in eqn.invars], prefix)
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x


def _raw(env, v):
    return v.val if isinstance(v, JaxLiteral) else env[v]


def _unroll_scan(eqn, env, prefix):
    p = eqn.params
    body: ClosedJaxpr = p["jaxpr"]
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    ins = [_raw(env, v) for v in eqn.invars]
    consts = [_read(env, v) if not isinstance(x, tuple) else x
              for v, x in zip(eqn.invars[:n_consts], ins[:n_consts], strict=True)]
    carry = [_read(env, v) for v in eqn.invars[n_consts:n_consts + n_carry]]
    xs = ins[n_consts + n_carry:]
    base = _scan_base(eqn)
    outer = "/".join(components(prefix + "/" + name_stack_of(eqn)))
    ys_steps = []
    order = range(length - 1, -1, -1) if p.get("reverse") else range(length)
    for i in order:
        x_i = [x[1][i] if isinstance(x, tuple) else x[i] for x in xs]
        sub_env = dict(zip(body.jaxpr.invars, [*consts, *carry, *x_i], strict=True))
        for v, c in zip(body.jaxpr.constvars, body.consts, strict=True):
            sub_env[v] = c
        stack = "/".join(c for c in (outer, f"{base}_{i}") if c)
        _eval_eqns(body.jaxpr.eqns, sub_env, stack)
        outs = [_read(sub_env, v) for v in body.jaxpr.outvars]
        carry, ys = outs[:n_carry], outs[n_carry:]
        ys_steps.append(ys)
    if p.get("reverse"):
        ys_steps.reverse()
    stacked_ys = [jnp.stack(col) for col in zip(*ys_steps, strict=True)] if ys_steps and \
        ys_steps[0] else [jnp.zeros((0,))] * 0
    return [*carry, *stacked_ys]


# ---- the pass ---------------------------------------------------------------------------------

def segment(traced: TracedModel, layers: LayersSpec = None) -> LayerGraph:
    """Splits a traced model into prologue, layers and epilogue (see the module docstring).

    Args:
        traced: the traced model.
        layers: None (find the layer family from the scopes' structure), a scope pattern
            ('transformer/h/*': '*' matches one scope; the pattern may start at any depth),
            or a callable from an equation's name stack to its layer's name (None: not in a
            layer).

    Raises:
        LayerSegmentationError: no layers, interleaved layers, or a segmentation that would
            leave most of the model outside the layers (the message names the candidates).

    Example:
        >>> g = segment(trace(model, tokens))
        >>> len(g.layers) == cfg.num_layers
        True
    """
    closed, sources = normalize(traced)
    jaxpr = closed.jaxpr
    eqns = list(jaxpr.eqns)
    stacks = [name_stack_of(e) for e in eqns]
    param_vars_all = jaxpr.invars[:len(sources)]
    param_bytes = {v: int(np.prod(v.aval.shape, dtype=np.int64)) * np.dtype(v.aval.dtype).itemsize
                   for v in param_vars_all}
    total_weights = sum(param_bytes.values())
    scopes = Scopes(eqns, stacks, param_bytes)
    if layers is None:
        family = choose(scopes, total_weights, traced.kind)
        name_of = family_namer(family)
    else:
        name_of = override_namer(layers)
        family = None
    names = [name_of(s) for s in stacks]
    hits = [i for i, n in enumerate(names) if n is not None]
    if not hits:
        tops = sorted({"/".join(c[:3]) for c in scopes.comps if c})[:8]
        raise LayerSegmentationError(
            f"layers={layers!r} matches no equation's scope; the model's scopes begin "
            f"{tops}. {HOW_TO_MARK}")
    first_layer_eqn, last_layer_eqn = hits[0], hits[-1]
    # Assign every equation to a segment: -1 prologue, layer ordinal, or -2 epilogue.
    order: list[str] = []  # layer names in order of appearance
    owner: list[int] = []
    current = None
    for i, name in enumerate(names):
        if i < first_layer_eqn:
            owner.append(-1)
            continue
        if i > last_layer_eqn:
            owner.append(-2)
            continue
        if name is not None and name != current:
            if name in order:
                raise LayerSegmentationError(
                    f"Ambiguous layer boundaries: equations of {name} appear again after "
                    f"{current} (equation {i}, {eqns[i].primitive.name}). Each layer's work "
                    f"must be contiguous. {HOW_TO_MARK}"
                )
            order.append(name)
            current = name
        owner.append(order.index(current))
    if family is None:
        family = LayerFamily(parent=(), members=tuple(order), how="override",
                             weights_bytes=scopes.weights(
                                 [i for i, o in enumerate(owner) if o >= 0]),
                             flops=sum(f for f, o in zip(scopes.flops, owner, strict=True)
                                       if o >= 0))
    else:
        refuse_outside(scopes, family, owner, names, total_weights)

    n_params = len(sources)
    param_vars = jaxpr.invars[:n_params]
    param_index = {v: i for i, v in enumerate(param_vars)}
    arg_vars = jaxpr.invars[n_params:]
    cache_vars = {v for v, c in zip(arg_vars, traced.cache_args, strict=True) if c}

    groups: list[tuple[str, str, list[int]]] = [("prologue", "prologue", [])]
    groups += [("layer", name, []) for name in order]
    groups.append(("epilogue", "epilogue", []))
    for i, o in enumerate(owner):
        groups[0 if o == -1 else len(groups) - 1 if o == -2 else o + 1][2].append(i)

    # Where each value is defined and last read, by segment.
    defined_in: dict = {}
    for g, (_, _, idxs) in enumerate(groups):
        for i in idxs:
            for v in eqns[i].outvars:
                defined_in[v] = g
    read_by: dict = defaultdict(set)
    for g, (_, _, idxs) in enumerate(groups):
        for i in idxs:
            for v in eqns[i].invars:
                if isinstance(v, Var):
                    read_by[v].add(g)
    program_out = {v for v in jaxpr.outvars if isinstance(v, Var)}

    segments = []
    users: dict[int, list[str]] = defaultdict(list)
    for g, (kind, name, idxs) in enumerate(groups):
        seg_eqns = tuple(eqns[i] for i in idxs)
        seen, inputs, params, cache_in = set(), [], [], []
        for e in seg_eqns:
            for v in e.invars:
                if not isinstance(v, Var) or v in seen or defined_in.get(v) == g:
                    continue
                seen.add(v)
                if v in param_index:
                    params.append(param_index[v])
                    users[param_index[v]].append(name)
                elif v in cache_vars:
                    cache_in.append(v)
                    inputs.append(v)
                else:
                    inputs.append(v)
        outputs = []
        for e in seg_eqns:
            for v in e.outvars:
                if any(r > g for r in read_by.get(v, ())) or v in program_out:
                    outputs.append(v)
        segments.append(Segment(
            name=name, kind=kind, eqns=seg_eqns, params=tuple(params), inputs=tuple(inputs),
            outputs=tuple(outputs), cache_inputs=tuple(cache_in),
            signature=(signature(seg_eqns, inputs, scopes.printed) if kind == "layer"
                       else kind),
        ))

    params_info = tuple(
        ParamInfo(
            path=traced.param_paths[src] + (f"[{sl}]" if sl is not None else ""),
            shape=tuple(param_vars[i].aval.shape),
            dtype=np.dtype(param_vars[i].aval.dtype),
            source=src,
            slice_index=sl,
            users=tuple(dict.fromkeys(users[i])),
        )
        for i, (src, sl) in enumerate(sources)
    )
    return LayerGraph(jaxpr=closed, params=params_info, prologue=segments[0],
                      layers=tuple(segments[1:-1]), epilogue=segments[-1], traced=traced,
                      family=family, total_weights_bytes=total_weights)


def eval_segment(graph: LayerGraph, seg: Segment, params: dict, inputs: list,
                 consts: dict | None = None) -> list:
    """Evaluates one segment's equations (the ``jax.core.eval_jaxpr`` loop, on a slice).

    Args:
        graph: the LayerGraph.
        seg: the segment to run.
        params: param index -> value, for (at least) ``seg.params``.
        inputs: values for ``seg.inputs``, in order.
        consts: constvar -> value overrides (defaults to the jaxpr's consts).

    Returns:
        values of ``seg.outputs``, in order.

    Example:
        >>> outs = eval_segment(g, g.layers[0], {i: p[i] for i in g.layers[0].params}, [x, pos])
    """
    env: dict = dict(zip(graph.jaxpr.jaxpr.constvars, graph.jaxpr.consts, strict=True))
    if consts:
        env.update(consts)
    pvars = graph.param_vars
    for i in seg.params:
        env[pvars[i]] = params[i]
    env.update(zip(seg.inputs, inputs, strict=True))
    for eqn in seg.eqns:
        outs = bind_eqn(eqn, [_raw(env, v) for v in eqn.invars])
        env.update(zip(eqn.outvars, outs, strict=True))
    return [_raw(env, v) for v in seg.outputs]
