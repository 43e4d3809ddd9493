"""Layer families: which sibling scopes of a traced program are the model's blocks.

``passes/segment.py`` asks this module which family its layers are; the rules are in its
docstring. Here: the scope tree (``Scopes``), the candidate families (numbered siblings in any
naming, unnumbered ones that repeat, numbered kinds that alternate), the choice among them,
the ``layers=`` override, and the refusals of a segmentation that would leave most of the
model outside the layers.

Example:
    >>> scopes = Scopes(eqns, [name_stack_of(e) for e in eqns], param_bytes)
    >>> choose(scopes, total_weights, "linen").names[:2]
    ('Model/h_0', 'Model/h_1')
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import itertools
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np

from lwjax._compat import JaxprEqn, Var
from lwjax._compat import Literal as JaxLiteral
from lwjax.errors import LayerSegmentationError

_INDEXED = re.compile(r"^(?P<base>.*?)(?:[_.]?)(?P<idx>\d+)$")
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
# Weights of another numbered kind read between the layers, above this share: the two kinds
# interleave without pairing up (the layers would be lopsided).
_MIN_UNPAIRED_SHARE = 0.05
LayersSpec = str | Callable[[str], "str | None"] | None
HOW_TO_MARK = (
    "Name the layers with layers= (a scope pattern such as layers='transformer/h/*', or a "
    "callable from an equation's name stack to its layer name), or mark each layer by running "
    "it under `with jax.named_scope(f'layers_{i}'):`, keep blocks as numbered linen "
    "submodules (e.g. name=f'h_{i}'), or hold the blocks of an NNX model in an nnx.List."
)



def signature(eqns, seg_inputs, memo: dict | None = None) -> str:
    """A structural hash of equations: primitives, parameters, shapes and dtypes, with
    variables numbered by first use (two layers computing the same thing hash equal).
    ``memo``: a dict the caller keeps while it hashes overlapping sets of one program's
    equations (discovery hashes every scope), so each equation's parameters, each
    variable's type and each literal value print once (printing dominated planning)."""
    h = hashlib.sha1()
    names: dict = {}
    memo = {} if memo is None else memo

    def nm(v):
        if isinstance(v, JaxLiteral):
            val = v.val
            if not isinstance(val, np.ndarray):
                return f"lit{val!r}"
            # an array's repr is slow (np.array2string); equal values print equally
            key = ("literal", type(val), val.dtype.str, getattr(val, "weak_type", None),
                   val.shape, val.tobytes())
            if key not in memo:
                memo[key] = f"lit{val!r}"
            return memo[key]
        if v not in names:
            if v not in memo:
                memo[v] = f":{_short(v.aval)}"
            names[v] = f"v{len(names)}{memo[v]}"
        return names[v]

    for v in seg_inputs:
        h.update(nm(v).encode())
    for e in eqns:
        if e not in memo:
            params = {k: (str(v) if not hasattr(v, "eqns") else "jaxpr")
                      for k, v in e.params.items() if k not in ("name",)}
            memo[e] = str(sorted(params.items()))
        h.update(f"{e.primitive.name}({','.join(nm(v) for v in e.invars)})"
                 f"->{','.join(nm(v) for v in e.outvars)}{memo[e]}".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _short(aval) -> str:
    """``aval.str_short()``, once per distinct aval (a program has few)."""
    return aval.str_short()



# ---- layer families from the structure of the scopes --------------------------------------------

def components(stack: str) -> list[str]:
    return [c for c in stack.split("/") if c]


def numbered(comp: str) -> tuple[str, int] | None:
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
        flops: matmul and convolution FLOPs of the members' equations.
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
    """2 x output elements x contracted size of a dot_general or a convolution (recursing
    into sub-jaxprs: a scan body counts ``length`` times); a proxy for where a model's work
    is."""
    out = int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64)) if eqn.outvars else 0
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        k = int(np.prod([lhs[d] for d in contract], dtype=np.int64))
        return 2 * out * k
    if eqn.primitive.name == "conv_general_dilated":  # per output: the kernel's window x
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # its input features
        kernel = eqn.invars[1].aval.shape
        k = int(np.prod([kernel[d] for d in rhs_spec[1:]], dtype=np.int64))
        return 2 * out * k
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    return times * sum(_matmul_flops(e) for sub in jax.extend.core.jaxprs_in_params(eqn.params)
                       for e in sub.eqns)




class Scopes:
    """Every scope of a program: its equations (descendants included), its children in
    program order, and the weights and FLOPs of any set of equations."""

    def __init__(self, eqns: Sequence[JaxprEqn], stacks: Sequence[str], param_bytes: dict):
        self.eqns = eqns
        self.comps = [components(s) for s in stacks]
        self.of: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self.children: dict[tuple[str, ...], dict[str, None]] = defaultdict(dict)
        for i, c in enumerate(self.comps):
            for d in range(len(c)):
                self.of[tuple(c[:d + 1])].append(i)
                self.children[tuple(c[:d])].setdefault(c[d])
        self.param_bytes = param_bytes
        self.flops = [_matmul_flops(e) for e in eqns]
        self.printed: dict = {}  # signature()'s memo: parameters, types, literals, printed

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

    @functools.cached_property
    def families(self) -> tuple[LayerFamily, ...]:
        """``candidates()``, computed once (the choice and each refusal read them)."""
        return tuple(self.candidates())

    def candidates(self) -> list[LayerFamily]:
        """Numbered sibling families (any signatures: a model may alternate block kinds) and
        runs of two or more consecutive unnumbered siblings with equal signatures."""
        out = []
        for parent, kids in self.children.items():
            kids = list(kids)
            by_base: dict[str, list[str]] = defaultdict(list)
            for k in kids:
                n = numbered(k)
                if n is not None:
                    by_base[n[0]].append(k)
            for members in by_base.values():
                out.append(self.family(parent, members, "numbered"))
            groups = [sorted(m, key=lambda c, p=parent: self.first(p, c))
                      for m in by_base.values() if len(m) >= 2]
            pairs = [list(c) for c in itertools.combinations(groups, 2)]
            for combo in ([groups] if len(groups) > 2 else []) + pairs:
                parts = self.alternating(parent, combo)
                if parts:
                    out.append(self.family(parent, parts, "numbered"))
            plain = [k for k in kids if numbered(k) is None]
            if len(plain) < 2:
                continue
            sigs = [signature([self.eqns[i] for i in self.of[(*parent, k)]], (), self.printed)
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


def override_namer(layers: LayersSpec) -> Callable[[str], str | None]:
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
    if not isinstance(layers, str) or not components(layers):
        raise LayerSegmentationError(
            f"layers= must be a scope pattern such as 'transformer/h/*' or a callable "
            f"(name stack -> layer name or None); got {layers!r}.")
    pattern = components(layers)

    def name_of(stack: str) -> str | None:
        comps = components(stack)
        for start in range(len(comps) - len(pattern) + 1):
            window = comps[start:start + len(pattern)]
            if all(fnmatch.fnmatchcase(c, p) for c, p in zip(window, pattern, strict=True)):
                return "/".join(comps[:start + len(pattern)])
        return None

    return name_of


def family_namer(family: LayerFamily) -> Callable[[str], str | None]:
    depth = len(family.parent)
    layer_of = {child: "/".join((*family.parent, member))
                for member, part in zip(family.members, family.parts, strict=True)
                for child in part}

    def name_of(stack: str) -> str | None:
        comps = components(stack)
        if len(comps) > depth and tuple(comps[:depth]) == family.parent:
            return layer_of.get(comps[depth])
        return None

    return name_of


def choose(scopes: Scopes, total_weights: int, kind: str) -> LayerFamily:
    """The best contiguous family; refuses a segmentation that would leave most of the model
    outside the layers while a repeated structure sits there."""
    candidates = scopes.families
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
            f"blocks computing the same thing). Blocks called through nnx.remat or nnx.jit of a "
            f"function run on a copy of the module that lwjax's scopes do not reach: run "
            f"each such call under jax.named_scope. {HOW_TO_MARK}")
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



def _same_kind(f: LayerFamily, family: LayerFamily) -> bool:
    """A one-member numbered family at the chosen family's depth with the same numbering
    ('decoder/layers/0' beside 'encoder/layers/0..2'): a stack of one layer."""
    if f.how != "numbered" or family.how != "numbered" or len(f.parent) != len(family.parent):
        return False
    mine, theirs = numbered(family.parts[0][0]), numbered(f.parts[0][0])
    return mine is not None and theirs is not None and mine[0] == theirs[0]


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


def refuse_outside(scopes: Scopes, family: LayerFamily, owner: Sequence[int],
                    names: Sequence[str | None], total_weights: int) -> None:
    """The layers found are not the model's blocks: most weights sit outside them while a
    repeated structure sits there too (numbered sub-modules inside one block were found), a
    large repeated structure sits outside (an encoder beside the decoder's layers), or the
    equations between the layers, in no layer's scope, read much of the weights (blocks
    called through a transform that hides their scopes, e.g. nnx.remat of a lambda)."""
    if not total_weights:
        return
    glue_eqns = [i for i, (o, n) in enumerate(zip(owner, names, strict=True))
                 if o >= 0 and n is None]
    glue = scopes.weights(glue_eqns)
    # glue under another numbered kind beside the layers: the kinds interleave but do not
    # pair up (4 attns and 3 mlps, or two attns per mlp), so the layers would be lopsided
    others = [f for f in scopes.families if f.how == "numbered" and len(f.parts) >= 2
              and f.parent == family.parent and f.members != family.members
              and any(set(scopes.of[(*f.parent, p[0])]) & set(glue_eqns) for p in f.parts)]
    if others and glue > _MIN_UNPAIRED_SHARE * total_weights:
        other = _best(others)
        raise LayerSegmentationError(
            f"The layers found, {family.describe(total_weights)}, interleave with "
            f"{other.describe(total_weights)}, but the two do not pair up one to one in turn "
            f"(unequal counts, a changing order, or two of one kind per layer), so lwjax "
            f"cannot tell which belong together. Name the layers with a layers= callable "
            f"mapping each name stack to its layer (e.g. returning 'block_3' for the "
            f"{family.parts[0][0]}-style and {other.parts[0][0]}-style scopes of block 3).")
    if glue > _MAX_GLUE_SHARE * total_weights:
        raise LayerSegmentationError(
            f"The layers found, {family.describe(total_weights)}, are separated by equations "
            f"outside any layer's scope that read {100 * glue / total_weights:.0f}% of the "
            f"weights: blocks called through a transform that hides their scopes (nnx.remat "
            f"or nnx.jit of a lambda, jax.checkpoint). Run each block call under "
            f"`with jax.named_scope(f'layers_{{i}}'):`, or name the layers with layers=.")
    outside = total_weights - family.weights_bytes
    # tables looked up, not blocks computed (a BERT's word and position embeddings of one
    # shape, when the vocabulary is as long as the positions) are no layers: no matmul or
    # convolution FLOPs
    elsewhere = [f for f in scopes.families if f.contiguous and f.flops > 0
                 and (len(f.members) >= 2 or _same_kind(f, family))
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
