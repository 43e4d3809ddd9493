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
import fnmatch
import hashlib
import itertools
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from lwjax._compat import ClosedJaxpr, JaxprEqn, Var, bind_eqn, name_stack_of
from lwjax._compat import Literal as JaxLiteral
from lwjax.errors import LayerSegmentationError
from lwjax.passes.trace import TracedModel

_INDEXED = re.compile(r"^(?P<base>.*?)(?:[_.]?)(?P<idx>\d+)$")
# calls whose bodies are inlined when they span scopes (remat2: jax.checkpoint / nn.remat)
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint")
# A layer family holding less than this share of both the weights and the matmul FLOPs is
# refused unless named with layers=: a plan on it would mostly place the prologue/epilogue.
_MIN_LAYER_SHARE = 0.10
# More than this share of the weights outside the layers, while a repeated structure sits
# there too, means the wrong family was found: refused unless named with layers=.
_MAX_OUTSIDE_SHARE = 0.5
# A repeated structure outside the layers holding this share of the weights (an encoder beside
# the decoder's layers) is refused too, as are equations between the layers, in no layer's
# scope, reading this share of the weights (blocks whose scopes a transform hid).
_MIN_OUTSIDE_FAMILY = 0.2
_MAX_GLUE_SHARE = 0.25
LayersSpec = str | Callable[[str], "str | None"] | None
HOW_TO_MARK = (
    "Name the layers with layers= (a scope pattern such as layers='transformer/h/*', or a "
    "callable from an equation's name stack to its layer name), or mark each layer by running "
    "it under `with jax.named_scope(f'layers_{i}'):`, keep blocks as numbered linen "
    "submodules (e.g. name=f'h_{i}'), or hold the blocks of an NNX model in an nnx.List."
)


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
        return tuple(_signature(s.eqns, s.inputs) for s in (self.prologue, self.epilogue))

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


# ---- layer families from the structure of the scopes --------------------------------------------

def _components(stack: str) -> list[str]:
    return [c for c in stack.split("/") if c]


def _numbered(comp: str) -> tuple[str, int] | None:
    """('h', 3) for 'h_3', 'h.3', 'h3'; ('', 3) for '3' (transformers' ``h/3``); None for
    unnumbered scopes and jit wrappers."""
    m = _INDEXED.match(comp)
    if m is None or m.group("base") in ("jit", "pjit"):
        return None
    return m.group("base"), int(m.group("idx"))


@dataclasses.dataclass(frozen=True)
class LayerFamily:
    """The layers a segmentation uses: sibling scopes under one parent scope.

    Attributes:
        parent: the parent scope's components ('FlaxGPT2LMHeadModule', 'transformer', 'h').
        members: the layers' names under ``parent``, in program order ('0', '1', ...; 'attn_0+mlp_0'
            for a layer made of several scopes).
        how: "numbered" (siblings differing in a trailing integer: ``h_3``, ``h/3``,
            ``layers.3``, ``block3``; or two numbered kinds that alternate, ``attn_i`` then
            ``mlp_i``: a layer is one of each), "repeated" (unnumbered siblings that compute
            the same thing one after another: ``alpha``, ``beta``), or "override"
            (``layers=``).
        weights_bytes: bytes of the parameters the members read.
        flops: matmul FLOPs of the members' equations.
        contiguous: each member's equations form one run (no interleaving).
        parts: per layer, the child scopes it is made of (one each, unless kinds alternate).
    """

    parent: tuple[str, ...]
    members: tuple[str, ...]
    how: Literal["numbered", "repeated", "override"]
    weights_bytes: int
    flops: int
    contiguous: bool = True
    parts: tuple[tuple[str, ...], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple("/".join((*self.parent, m)) for m in self.members)

    def describe(self, total_weights: int) -> str:
        first, last = self.names[0], self.members[-1]
        span = first if len(self.members) == 1 else f"{first}..{last}"
        share = 100 * self.weights_bytes / total_weights if total_weights else 0.0
        shown = f"{share:.0f}%" if share >= 1 or share == 0 else "<1%"
        return f"{span} ({len(self.members)} {self.how}, {shown} of the weights)"

    @property
    def pattern(self) -> str:
        """A ``layers=`` pattern naming these layers: 'transformer/h/*', 'layers_*'."""
        stem = os.path.commonprefix([p[0] for p in self.parts] or list(self.members))
        return "/".join((*self.parent, f"{stem}*"))


def _matmul_flops(eqn: JaxprEqn) -> int:
    """2 x output elements x contracted size of a dot_general (recursing into sub-jaxprs: a
    scan body counts ``length`` times); a proxy for where a model's work is."""
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        k = int(np.prod([lhs[d] for d in contract], dtype=np.int64))
        return 2 * int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) * k
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    return times * sum(_matmul_flops(e) for sub in jax.extend.core.jaxprs_in_params(eqn.params)
                       for e in sub.eqns)


def _scope_signature(eqns: Sequence[JaxprEqn]) -> str:
    return _signature(eqns, ())


class _Scopes:
    """Every scope of a program: its equations (descendants included), its children in
    program order, and the weights and FLOPs of any set of equations."""

    def __init__(self, eqns: Sequence[JaxprEqn], stacks: Sequence[str], param_bytes: dict):
        self.eqns = eqns
        self.comps = [_components(s) for s in stacks]
        self.of: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self.children: dict[tuple[str, ...], dict[str, None]] = defaultdict(dict)
        for i, c in enumerate(self.comps):
            for d in range(len(c)):
                self.of[tuple(c[:d + 1])].append(i)
                self.children[tuple(c[:d])].setdefault(c[d])
        self.param_bytes = param_bytes
        self.flops = [_matmul_flops(e) for e in eqns]

    def weights(self, idxs) -> int:
        read = {v for i in idxs for v in self.eqns[i].invars
                if isinstance(v, Var) and v in self.param_bytes}
        return sum(self.param_bytes[v] for v in read)

    def first(self, parent, child) -> int:
        return self.of[(*parent, child)][0]

    def family(self, parent, parts, how) -> LayerFamily:
        """A family whose layer j is made of the child scopes ``parts[j]``."""
        parts = [(p,) if isinstance(p, str) else tuple(p) for p in parts]
        idxs = [i for part in parts for m in part for i in self.of[(*parent, m)]]
        spans = [(min(self.of[(*parent, m)][0] for m in part),
                  max(self.of[(*parent, m)][-1] for m in part)) for part in parts]
        contiguous = all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False))
        return LayerFamily(parent=tuple(parent), members=tuple("+".join(p) for p in parts),
                           how=how, weights_bytes=self.weights(idxs),
                           flops=sum(self.flops[i] for i in idxs), contiguous=contiguous,
                           parts=tuple(parts))

    def alternating(self, parent, groups: Sequence[list[str]]) -> list[tuple[str, ...]] | None:
        """Layers made of one member of each group, when the groups' members run in turn
        (attn_0, mlp_0, attn_1, mlp_1, ...), else None."""
        k, n = len(groups), len(groups[0])
        if k < 2 or n < 2 or any(len(g) != n for g in groups):
            return None
        order = sorted((self.first(parent, m), g, j) for g, members in enumerate(groups)
                       for j, m in enumerate(members))
        turn = [g for _, g, _ in order[:k]]
        if any(g != turn[p % k] or j != p // k for p, (_, g, j) in enumerate(order)):
            return None
        return [tuple(groups[g][j] for g in turn) for j in range(n)]

    def candidates(self) -> list[LayerFamily]:
        """Numbered sibling families (any signatures: a model may alternate block kinds) and
        runs of two or more consecutive unnumbered siblings with equal signatures."""
        out = []
        for parent, kids in self.children.items():
            kids = list(kids)
            numbered: dict[str, list[str]] = defaultdict(list)
            for k in kids:
                n = _numbered(k)
                if n is not None:
                    numbered[n[0]].append(k)
            for members in numbered.values():
                out.append(self.family(parent, members, "numbered"))
            groups = [sorted(m, key=lambda c, p=parent: self.first(p, c))
                      for m in numbered.values() if len(m) >= 2]
            pairs = [list(c) for c in itertools.combinations(groups, 2)]
            for combo in ([groups] if len(groups) > 2 else []) + pairs:
                parts = self.alternating(parent, combo)
                if parts:
                    out.append(self.family(parent, parts, "numbered"))
            plain = [k for k in kids if _numbered(k) is None]
            if len(plain) < 2:
                continue
            sigs = [_scope_signature([self.eqns[i] for i in self.of[(*parent, k)]])
                    for k in plain]
            run = [0]
            for j in range(1, len(plain) + 1):
                if j < len(plain) and sigs[j] == sigs[run[0]]:
                    run.append(j)
                    continue
                if len(run) >= 2:
                    out.append(self.family(parent, [plain[r] for r in run], "repeated"))
                run = [j]
        return out


def _best(families: Sequence[LayerFamily]) -> LayerFamily:
    """The family covering the most weights, then the most FLOPs, then the most members."""
    return max(families, key=lambda f: (f.weights_bytes, f.flops, len(f.members),
                                        -len(f.parent)))


def _override_namer(layers: LayersSpec) -> Callable[[str], str | None]:
    """name stack -> layer name (or None) for a ``layers=`` pattern or callable."""
    if callable(layers):
        def named(stack: str) -> str | None:
            try:
                name = layers(stack)
            except Exception as e:  # noqa: BLE001 -- the user's callable, reported as such
                raise LayerSegmentationError(
                    f"the layers= callable raised {type(e).__name__}: {e} on the name stack "
                    f"{stack!r}; it takes one name stack (str) and returns a layer name or "
                    "None.") from e
            if name is not None and not isinstance(name, str):
                raise LayerSegmentationError(
                    f"the layers= callable returned {name!r} for {stack!r}; return a layer "
                    "name (str) or None.")
            return name or None

        return named
    if not isinstance(layers, str) or not _components(layers):
        raise LayerSegmentationError(
            f"layers= must be a scope pattern such as 'transformer/h/*' or a callable "
            f"(name stack -> layer name or None); got {layers!r}.")
    pattern = _components(layers)

    def name_of(stack: str) -> str | None:
        comps = _components(stack)
        for start in range(len(comps) - len(pattern) + 1):
            window = comps[start:start + len(pattern)]
            if all(fnmatch.fnmatchcase(c, p) for c, p in zip(window, pattern, strict=True)):
                return "/".join(comps[:start + len(pattern)])
        return None

    return name_of


def _family_namer(family: LayerFamily) -> Callable[[str], str | None]:
    depth = len(family.parent)
    layer_of = {child: "/".join((*family.parent, member))
                for member, part in zip(family.members, family.parts, strict=True)
                for child in part}

    def name_of(stack: str) -> str | None:
        comps = _components(stack)
        if len(comps) > depth and tuple(comps[:depth]) == family.parent:
            return layer_of.get(comps[depth])
        return None

    return name_of


def _choose(scopes: _Scopes, total_weights: int, kind: str) -> LayerFamily:
    """The best contiguous family; refuses a segmentation that would leave most of the model
    outside the layers while a repeated structure sits there."""
    candidates = scopes.candidates()
    valid = [f for f in candidates if f.contiguous]
    if not valid:
        if candidates:
            bad = _best(candidates)
            raise LayerSegmentationError(
                f"Ambiguous layer boundaries: the equations of {bad.names[0]}..{bad.members[-1]} "
                "interleave (a layer's scope appears again after another's). Each layer's "
                f"work must be contiguous. {HOW_TO_MARK}")
        raise LayerSegmentationError(
            f"No layers found in the {kind} model: none of its {len(scopes.eqns)} equations runs "
            f"under sibling scopes that repeat (numbered like h_0, h/0, block0, or unnumbered "
            f"blocks computing the same thing). {HOW_TO_MARK}")
    # a lone numbered scope ('GPT2', a class name ending in a digit, wrapping everything) is
    # no family of layers while siblings that repeat exist
    several = [f for f in valid if len(f.members) >= 2]
    best = _best(several or valid)
    tangled = [f for f in candidates if not f.contiguous and len(f.members) >= 2
               and f.weights_bytes > best.weights_bytes]
    if tangled:  # the blocks' scopes interleave: a block called twice, or out of order
        bad = _best(tangled)
        raise LayerSegmentationError(
            f"Ambiguous layer boundaries: {bad.describe(total_weights)} hold more weights than "
            f"any family whose equations run in order, but their equations interleave (a "
            f"block called twice, e.g. shared weights, or blocks called out of order). lwjax "
            f"does not plan on the lesser {best.describe(total_weights)}. Each layer's work "
            f"must be contiguous: name the layers with layers= (a callable can give a reused "
            f"block's calls different names).")
    if total_weights and best.weights_bytes < _MIN_LAYER_SHARE * total_weights and \
            best.flops < _MIN_LAYER_SHARE * sum(scopes.flops):
        raise LayerSegmentationError(
            f"The best layer family found, {best.describe(total_weights)}, holds under "
            f"{100 * _MIN_LAYER_SHARE:.0f}% of the model's weights and FLOPs, so a plan on it "
            f"would mostly place the prologue and epilogue. Other candidates: "
            f"{_listing(valid, best, total_weights)}. If these are the layers, confirm with "
            f"layers='{best.pattern}'; otherwise name them with layers= "
            "(a scope pattern or a callable).")
    return best


def _listing(families, skip, total_weights: int, most: int = 4) -> str:
    others = sorted((f for f in families if f is not skip and len(f.members) >= 2),
                    key=lambda f: -f.weights_bytes)[:most]
    return "; ".join(f.describe(total_weights) for f in others) or "none"


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
    comps = [_components(s) for s in _sub_stacks(eqn)]
    return len({c[0] for c in comps if c}) > 1 or any(
        _numbered(x) for c in comps for x in c)


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
    firsts = {(_components(name_stack_of(e)) or [""])[0] for e in eqn.params["jaxpr"].jaxpr.eqns}
    if len(firsts) == 1 and "" not in firsts:
        return firsts.pop()
    comps = _components(name_stack_of(eqn))
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
    outer = "/".join(_components(prefix + "/" + name_stack_of(eqn)))
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

def _signature(eqns, seg_inputs) -> str:
    h = hashlib.sha1()
    names: dict = {}

    def nm(v):
        if isinstance(v, JaxLiteral):
            return f"lit{v.val!r}"
        if v not in names:
            names[v] = f"v{len(names)}"
        return f"{names[v]}:{v.aval.str_short()}"

    for v in seg_inputs:
        h.update(nm(v).encode())
    for e in eqns:
        params = {k: (str(v) if not hasattr(v, "eqns") else "jaxpr") for k, v in e.params.items()
                  if k not in ("name",)}
        h.update(f"{e.primitive.name}({','.join(nm(v) for v in e.invars)})"
                 f"->{','.join(nm(v) for v in e.outvars)}{sorted(params.items())}".encode())
    return h.hexdigest()[:16]


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
    scopes = _Scopes(eqns, stacks, param_bytes)
    if layers is None:
        family = _choose(scopes, total_weights, traced.kind)
        name_of = _family_namer(family)
    else:
        name_of = _override_namer(layers)
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
        _refuse_outside(scopes, family, owner, names, total_weights)

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
            signature=_signature(seg_eqns, inputs) if kind == "layer" else kind,
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


def _merged_pattern(families: Sequence[LayerFamily]) -> str:
    """One layers= pattern naming several families' layers: their parents with differing
    scopes as '*' ('model/*/layers/*' for encoder and decoder), else their common parent."""
    parents = [f.parent for f in families]
    stem = os.path.commonprefix([p[0] for f in families for p in f.parts]) + "*"
    if len({len(p) for p in parents}) == 1:
        scopes = [c[0] if len(set(c)) == 1 else "*" for c in zip(*parents, strict=True)]
        return "/".join((*scopes, stem))
    common = os.path.commonprefix([list(p) for p in parents])
    return "/".join((*common, "*"))


def _refuse_outside(scopes: _Scopes, family: LayerFamily, owner: Sequence[int],
                    names: Sequence[str | None], total_weights: int) -> None:
    """The layers found are not the model's blocks: most weights sit outside them while a
    repeated structure sits there too (numbered sub-modules inside one block were found), a
    large repeated structure sits outside (an encoder beside the decoder's layers), or the
    equations between the layers, in no layer's scope, read much of the weights (blocks
    called through a transform that hides their scopes, e.g. nnx.remat of a lambda)."""
    if not total_weights:
        return
    glue = scopes.weights([i for i, (o, n) in enumerate(zip(owner, names, strict=True))
                           if o >= 0 and n is None])
    if glue > _MAX_GLUE_SHARE * total_weights:
        raise LayerSegmentationError(
            f"The layers found, {family.describe(total_weights)}, are separated by equations "
            f"outside any layer's scope that read {100 * glue / total_weights:.0f}% of the "
            f"weights: blocks called through a transform that hides their scopes (nnx.remat "
            f"or nnx.jit of a lambda, jax.checkpoint). Run each block call under "
            f"`with jax.named_scope(f'layers_{{i}}'):`, or name the layers with layers=.")
    outside = total_weights - family.weights_bytes
    elsewhere = [f for f in scopes.candidates() if f.contiguous and len(f.members) >= 2
                 and all(owner[scopes.first(f.parent, p[0])] < 0 for p in f.parts)]
    inner = {id(f) for f in elsewhere for g in elsewhere if g is not f and any(
        f.parent[:len(g.parent) + 1] == (*g.parent, c) for part in g.parts for c in part)}
    elsewhere = [f for f in elsewhere if id(f) not in inner]  # not those nested in another
    big = [f for f in elsewhere if f.weights_bytes >= _MIN_OUTSIDE_FAMILY * total_weights]
    if elsewhere and (outside > _MAX_OUTSIDE_SHARE * total_weights or big):
        suggestion = _merged_pattern([family, _best(big or elsewhere)])
        raise LayerSegmentationError(
            f"The layers found, {family.describe(total_weights)}, leave "
            f"{100 * outside / total_weights:.0f}% of the weights outside the layers (in the "
            f"prologue and epilogue), where repeated structures sit: "
            f"{_listing(elsewhere, None, total_weights)}. Name the layers with layers= (e.g. "
            f"layers='{suggestion}', a scope pattern, or a callable).")


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
