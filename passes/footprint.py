"""Pass 3: per-segment on-chip footprint = weights + activations + buffers (+ KV cache).

- **weights**: the parameters the segment reads, stored under a Compression policy.
- **activations**: peak live bytes by last-use liveness over the segment's equations, inputs
  included. XLA fuses elementwise chains, so a value produced by an elementwise/shape
  equation whose every reader is also elementwise (or a reduction) is never materialised: it
  is computed inside its reader, and the values it reads stay live until that reader runs.
  Sub-jaxprs are recursed into (pjit, remat, custom_jvp/vjp, cond: the largest branch;
  scan/while: the body's transient peak once -- iterations run one after another -- with its
  carries and stacked outputs live as the equation's outputs).
- **buffers**: workspace beyond inputs and outputs, from a per-primitive rule registry with an
  explicit default. A primitive without a rule is charged its output bytes (one extra copy)
  and listed in ``Footprint.unknown_primitives``: never silently zero. Copies of dot operands
  (batch dimensions not leading, or float32 on the backend) live where XLA makes them
  (``_operand_copies``): a fused producer writes the dot's layout itself, a dot's result is
  copied and dies, an input or weight is copied as soon as it exists.
- **kv_cache**: decode only, the KV-cache arrays the segment reads (updated in place, as with
  buffer donation).
- **training** (gradients, optimizer state, stashed inputs, the backward's activations): zero
  here; ``passes/train_footprint.py`` fills them in for ``mode="train"`` plans.

Backend: the bytes are those the target backend holds (``backend="gpu"`` by default, or
"cpu"; planning passes its hardware's kind). Where a backend multiplies 16-bit floats through
float32 copies (``passes/backend.py``: XLA:CPU for every bfloat16 / float16 dot_general but
bf16 x bf16 -> f32), the copies are buffer bytes: an operand computed in the segment is stored
in float32 by its producer (twice its traced bytes, from the producer to the dot), an input or
weight gets a float32 copy from the segment's start to the dot, and the result is stored in
float32 until its last reader. ``Footprint.backend`` says which backend the bytes are for.

Compressed weights (``passes/codec.py``) reach their dot decoded: on XLA:CPU (measured, jax
0.10.2) the decode is a loop fusion of its own that writes the dense weight -- in float32 if
the dot takes float32 copies -- which the scheduler hoists to the segment's start, as it does
the float32 copies of weights, so it is a copy from the start to the dot (buffer bytes). A
GPU's bytes leave it out: unmeasured, and XLA:GPU can fuse a dequantising convert into its
gemm (``DECODE_MATERIALISED``).

Attention: with ``implementation="xla"`` (or on CPU) the scores [B, N, T, S] are
materialised by a dot_general between two activations; a fused kernel (cuDNN / Pallas custom
call) keeps them on chip. ``Footprint.attention`` says which the estimate used. Planning for a
GPU from a CPU trace (where cuDNN cannot be traced) may assume ``attention="fused"``: the
values from the score dot up to the probabilities-times-values dot then occupy no memory and
the kernel's log-sum-exp rows (f32, one per query and head) are charged as its workspace.

Example:
    >>> fp = footprint(segment(trace(model, tokens)))
    >>> fp.layers[0].total_bytes > fp.layers[0].weights_bytes
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import numpy as np

from lwjax._compat import ClosedJaxpr, Jaxpr, JaxprEqn, Var, jaxprs_in_params
from lwjax.errors import ConfigError
from lwjax.passes import backend as backend_lib
from lwjax.passes import compression as compression_lib
from lwjax.passes.backend import DEFAULT_BACKEND, Backend
from lwjax.passes.compression import Compression
from lwjax.passes.segment import LayerGraph, Segment

# Backends on which decoding a compressed weight writes the dense weight before its dot.
DECODE_MATERIALISED: dict[str, bool] = {"cpu": True, "gpu": False}

Attention = Literal["materialized", "fused", "none"]
AttentionAssumption = Literal["as_traced", "fused"]
ATTENTION_ASSUMPTIONS: tuple[str, ...] = ("as_traced", "fused")

# Elementwise and layout primitives XLA fuses into their readers.
FUSIBLE = frozenset("""
abs add and atan2 broadcast_in_dim cbrt ceil clamp convert_element_type copy copy_p cos cosh
div eq erf erf_inv erfc exp exp2 expand_dims expm1 floor ge gt imag integer_pow iota
is_finite le log log1p logistic lt max min mul ne neg nextafter not or pow real
reduce_precision rem round rsqrt select_n sign sin sinh sqrt square squeeze stop_gradient
sub tan tanh transpose xor reshape shift_left shift_right_arithmetic shift_right_logical
population_count concatenate split slice dynamic_slice pad
""".split())
# Fusible producers a dynamic_slice reads without their being written first (``_cheap``).
CHEAP_INTO_DYNAMIC_SLICE = frozenset("""
add and broadcast_in_dim convert_element_type copy copy_p eq expand_dims ge gt iota le lt
max min mul ne neg not or reshape select_n squeeze stop_gradient sub transpose xor
dynamic_slice slice
""".split())
REDUCTIONS = frozenset("""
reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin
""".split())
# Primitives whose workspace beyond their outputs is zero, by rule (not by default).
NO_WORKSPACE = FUSIBLE | REDUCTIONS | frozenset("""
dot_general concatenate pad slice dynamic_slice dynamic_update_slice gather scatter
scatter-add scatter_add scatter-mul scatter_mul scatter-min scatter-max select_and_scatter_add
cumsum cumprod cummax cummin cumlogsumexp rev split iota random_bits random_seed random_wrap
random_unwrap threefry2x32 conv_general_dilated reduce_window_sum reduce_window_max clz
bitcast_convert_type pjit jit closed_call core_call custom_jvp_call custom_vjp_call
custom_vjp_call_jaxpr checkpoint remat scan while cond optimization_barrier
sharding_constraint
""".split())
# Primitives that pass a weight on to its matmul as another view of it.
_VIEWS = ("transpose", "reshape", "convert_element_type", "copy")
FUSED_ATTENTION = ("dot_product_attention", "cudnn", "flash", "pallas_call", "mosaic",
                   "custom_call")


def value_bytes(v) -> int:
    """Bytes of a jaxpr value (0 for tokens and other memoryless values)."""
    aval = v.aval
    shape = getattr(aval, "shape", ())
    dtype = getattr(aval, "dtype", None)
    if dtype is None:  # tokens and other abstract effects occupy no memory
        return 0
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# ---- buffer rule registry ---------------------------------------------------------------------

BufferRule = Callable[[JaxprEqn], int]
BUFFER_RULES: dict[str, BufferRule] = {}


def register_buffer_rule(name: str, rule: BufferRule) -> None:
    """Registers the workspace bytes of a primitive (beyond its inputs and outputs).

    Example:
        >>> register_buffer_rule("my_kernel", lambda eqn: 1 << 20)
    """
    BUFFER_RULES[name] = rule


def _operand_bytes(eqn: JaxprEqn) -> int:
    return sum(value_bytes(v) for v in eqn.invars if isinstance(v, Var))


def _dot_layout_copies(eqn: JaxprEqn) -> int:
    """XLA feeds a dot operands laid out [batch..., free/contracting...]: an operand whose batch
    dimensions are not its leading ones is first copied in transposed form."""
    (_, _), (lb, rb) = eqn.params["dimension_numbers"]
    total = 0
    for v, batch in zip(eqn.invars, (lb, rb), strict=True):
        if batch and tuple(batch) != tuple(range(len(batch))) and isinstance(v, Var):
            total += value_bytes(v)
    return total


# Sorting needs a scratch copy of what it sorts; top_k on XLA:CPU/GPU is sort-based.
register_buffer_rule("sort", _operand_bytes)
register_buffer_rule("top_k", _operand_bytes)
for _name in NO_WORKSPACE:
    register_buffer_rule(_name, lambda eqn: 0)
register_buffer_rule("dot_general", _dot_layout_copies)


def _buffer_bytes(eqn: JaxprEqn, unknown: set[str]) -> int:
    name = eqn.primitive.name
    subs = list(jaxprs_in_params(eqn.params))
    inner = max((_buffers_of(sub, unknown) for sub in subs), default=0)
    rule = BUFFER_RULES.get(name)
    if rule is None:
        unknown.add(name)
        return inner + sum(value_bytes(v) for v in eqn.outvars)
    return inner + rule(eqn)


def _buffers_of(jaxpr: Jaxpr, unknown: set[str]) -> int:
    # Workspaces are transient: the largest single one bounds what is live at once.
    return max((_buffer_bytes(e, unknown) for e in jaxpr.eqns), default=0)


# ---- liveness ---------------------------------------------------------------------------------

def _cheap(eqn: JaxprEqn) -> bool:
    """Fusible work XLA:CPU recomputes per element of a dynamic slice rather than writing
    whole (measured with ``memory_analysis``: an iota mask or ``x * 2 + 1`` sliced left no
    temporary, an ``exp`` or ``sin`` sliced left the whole array)."""
    if eqn.primitive.name in ("pjit", "jit", "closed_call"):
        return all(_cheap(e) for sub in jaxprs_in_params(eqn.params) for e in sub.eqns)
    return eqn.primitive.name in CHEAP_INTO_DYNAMIC_SLICE


def _fuses_into(reader: JaxprEqn, producer: JaxprEqn) -> bool:
    """Whether XLA computes ``producer``'s value inside ``reader`` instead of writing it."""
    if reader.primitive.name == "dynamic_slice":
        return _cheap(producer)
    return _fusible(reader) or reader.primitive.name in REDUCTIONS


def _fusible(eqn: JaxprEqn) -> bool:
    """Elementwise/layout work XLA fuses, including small jitted helpers (``jnp.where``) that
    XLA inlines: a call whose body is all fusible."""
    if eqn.primitive.name in FUSIBLE:
        return True
    if eqn.primitive.name in ("pjit", "jit", "closed_call"):
        return all(_fusible(e) or e.primitive.name in REDUCTIONS
                   for sub in jaxprs_in_params(eqn.params) for e in sub.eqns)
    return False


def _materialized(eqns, keep: set) -> set:
    """Values that XLA writes to memory: everything but fused elementwise intermediates. A
    dynamic_slice takes in only a cheap producer (``CHEAP_INTO_DYNAMIC_SLICE``: a mask built
    from iotas, ``x * 2 + 1``); XLA:CPU writes an expensive one (``exp``) whole first."""
    readers: dict = defaultdict(list)
    for e in eqns:
        for v in e.invars:
            if isinstance(v, Var):
                readers[v].append(e)
    out = set()
    for e in eqns:
        for v in e.outvars:
            fused = (_fusible(e) and v not in keep and readers.get(v)
                     and all(_fuses_into(r, e) for r in readers[v]))
            if not fused:
                out.add(v)
    return out


def peak_live_bytes(eqns, inputs, outputs, live_through=(), aliased=(),
                    workspace: Callable[[JaxprEqn], int] | None = None,
                    held: dict | None = None, backend: Backend | None = None) -> int:
    """Peak bytes of materialised values over ``eqns``.

    Args:
        eqns: equations in program order.
        inputs: values live on entry (freed after their last use).
        outputs: values that must survive to the end.
        live_through: inputs that must also survive to the end (read again later).
        aliased: values written in place into an existing buffer (cost no new bytes).
        workspace: bytes of scratch an equation needs while it runs (default none).
        held: bytes a value occupies where the backend stores it wider than traced.
        backend: count sub-jaxprs as this backend runs them (default: as traced).

    Example:
        >>> peak_live_bytes(closed.jaxpr.eqns, closed.jaxpr.invars, closed.jaxpr.outvars)
    """
    eqns = list(eqns)
    aliased = set(aliased)

    held = held or {}

    def size(v) -> int:
        return 0 if v in aliased else held.get(v) or value_bytes(v)

    keep = set(outputs) | set(live_through)
    mat = _materialized(eqns, keep) | set(inputs)
    end = len(eqns)
    # Effective last use: a fused value's reads happen where the fused value is read.
    last: dict = {}
    for i in range(end - 1, -1, -1):
        e = eqns[i]
        use_at = i
        fused_outs = [v for v in e.outvars if v not in mat]
        if fused_outs:
            use_at = max(last.get(v, i) for v in fused_outs)
        for v in e.invars:
            if isinstance(v, Var):
                last[v] = max(last.get(v, -1), use_at)
    for v in keep:
        last[v] = end
    frees: dict[int, list] = defaultdict(list)
    live = 0
    for v in dict.fromkeys(inputs):
        if isinstance(v, Var):
            live += size(v)
            frees[last.get(v, -1)].append(v)
    peak = live
    for v in frees.pop(-1, []):
        live -= size(v)
    for i, e in enumerate(eqns):
        outs = [v for v in e.outvars if v in mat]
        out_bytes = sum(size(v) for v in outs)
        transient = max((_inner_extra(sub, backend) for sub in jaxprs_in_params(e.params)),
                        default=0)
        if workspace is not None:
            transient += workspace(e)
        peak = max(peak, live + out_bytes + transient)
        live += out_bytes
        for v in outs:
            frees[last.get(v, i)].append(v)
        for v in frees.pop(i, []):
            live -= size(v)
    return peak


def _inner_extra(jaxpr: Jaxpr | ClosedJaxpr, backend: Backend | None = None) -> int:
    """A sub-jaxpr's peak beyond its own inputs and outputs (already counted outside), with
    ``backend``'s float32 copies when given."""
    j = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    if backend is None:
        peak = peak_live_bytes(j.eqns, j.invars, j.outvars)
    else:
        # Layout copies inside are the dot_general buffer rule's (``_buffers_of``).
        held, charge = _operand_copies(j.eqns, backend, keep=set(j.outvars), layout=False)
        peak = peak_live_bytes(j.eqns, j.invars, j.outvars, held=held, backend=backend,
                               workspace=lambda e: charge[id(e)])
    edge = sum(value_bytes(v) for v in j.invars) + sum(value_bytes(v) for v in j.outvars if
                                                     isinstance(v, Var))
    return max(0, peak - edge)


def _attention_kind(eqns, param_vars: set) -> Attention:
    names = {e.primitive.name for e in eqns}
    sub_names = {s.primitive.name for e in eqns for sub in jaxprs_in_params(e.params)
                 for s in sub.eqns}
    if any(any(k in n for k in FUSED_ATTENTION) for n in names | sub_names):
        return "fused"
    for e in eqns:
        if e.primitive.name == "dot_general" and len(e.outvars[0].aval.shape) >= 4 and not any(
                v in param_vars for v in e.invars):
            return "materialized"
    return "none"


# ---- the pass ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes a segment needs on chip, per device, per microbatch.

    Attributes:
        weights_bytes: its parameters as stored (after compression).
        activation_bytes: peak live activation bytes (inputs and outputs included).
        buffer_bytes: workspace beyond inputs and outputs.
        kv_cache_bytes: KV cache it reads (decode).
        attention: how attention scores were counted.
        unknown_primitives: primitives charged by the default buffer rule.
        backend: the backend whose bytes these are ("gpu" or "cpu"; see the module docstring).
        grad_bytes: training: gradients of its parameters (``passes/train_footprint.py``).
        optimizer_bytes: training: optimizer state of its parameters.
        stash_bytes: training: stage inputs kept for the backward -- one microbatch's in a
            layer's footprint (``LayerNumbers``), all the stage stashes in a ``Stage``'s.
        backward_bytes: training: what one microbatch's recompute + backward keeps beyond
            the forward peak (the recomputed values the vjp saves, their cotangents); a
            stage's backward differentiates all its layers at once, so these add up.
    """

    weights_bytes: int
    activation_bytes: int
    buffer_bytes: int
    kv_cache_bytes: int = 0
    attention: Attention = "none"
    unknown_primitives: tuple[str, ...] = ()
    backend: Backend = DEFAULT_BACKEND
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    stash_bytes: int = 0
    backward_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.activation_bytes + self.buffer_bytes
                + self.kv_cache_bytes + self.grad_bytes + self.optimizer_bytes
                + self.stash_bytes + self.backward_bytes)

    def __add__(self, other: Footprint) -> Footprint:
        """Footprint of two segments run one after the other on one device: weights, KV
        caches, gradients, optimizer state and the backward's saved values add up;
        activations and buffers are transient (the larger one), and so is the stash (a stage
        stashes its own input: the larger one bounds it)."""
        if self.backend != other.backend:
            raise ConfigError(f"Cannot add a {self.backend!r} footprint to a "
                              f"{other.backend!r} one; compute both for one backend.")
        return Footprint(
            weights_bytes=self.weights_bytes + other.weights_bytes,
            activation_bytes=max(self.activation_bytes, other.activation_bytes),
            buffer_bytes=max(self.buffer_bytes, other.buffer_bytes),
            kv_cache_bytes=self.kv_cache_bytes + other.kv_cache_bytes,
            attention=self.attention if self.attention != "none" else other.attention,
            unknown_primitives=tuple(sorted(set(self.unknown_primitives)
                                            | set(other.unknown_primitives))),
            backend=self.backend,
            grad_bytes=self.grad_bytes + other.grad_bytes,
            optimizer_bytes=self.optimizer_bytes + other.optimizer_bytes,
            stash_bytes=max(self.stash_bytes, other.stash_bytes),
            backward_bytes=self.backward_bytes + other.backward_bytes,
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


@dataclasses.dataclass(frozen=True)
class GraphFootprint:
    """Footprints of every segment of a LayerGraph under one policy, for one backend."""

    prologue: Footprint
    layers: tuple[Footprint, ...]
    epilogue: Footprint
    compression: Compression
    backend: Backend = DEFAULT_BACKEND


def output_channels(graph: LayerGraph) -> dict[int, int]:
    """Param index -> output channels (elements not contracted by the matmul reading it)."""
    param_vars = graph.param_vars
    index = {v: i for i, v in enumerate(param_vars)}
    alias = {}  # values that are a parameter reshaped / transposed / converted
    channels: dict[int, int] = {}
    for e in graph.jaxpr.jaxpr.eqns:
        ins = [alias.get(v, v) if isinstance(v, Var) else v for v in e.invars]
        if e.primitive.name in _VIEWS and \
                isinstance(ins[0], Var) and ins[0] in index:
            alias[e.outvars[0]] = ins[0]
        if e.primitive.name == "dot_general":
            (lc, rc), _ = e.params["dimension_numbers"]
            for operand, contract in ((0, lc), (1, rc)):
                src = ins[operand]
                if isinstance(src, Var) and src in index:
                    shape = e.invars[operand].aval.shape
                    contracted = int(np.prod([shape[d] for d in contract], dtype=np.int64))
                    n = int(np.prod(shape, dtype=np.int64))
                    channels[index[src]] = n // max(contracted, 1)
    return channels


def _score_region(eqns, param_vars: set) -> tuple[set, dict[int, int]]:
    """Values between an attention score dot and the next dot (fused away by flash attention),
    the log-sum-exp workspace charged at each score dot (by equation id), and the q / k / v
    operands the kernel reads in place (no transposed copies)."""
    region: set = set()
    lse: dict[int, int] = {}
    in_place: set = set()  # q, k, v operands: the kernel reads them as laid out
    for e in eqns:
        is_dot = e.primitive.name == "dot_general"
        reads_region = any(isinstance(v, Var) and v in region for v in e.invars)
        if is_dot and len(e.outvars[0].aval.shape) >= 4 and not reads_region and not any(
                v in param_vars for v in e.invars):
            region.update(e.outvars)
            in_place.update(v for v in e.invars if isinstance(v, Var))
            shape = e.outvars[0].aval.shape
            lse[id(e)] = int(np.prod(shape[:-1], dtype=np.int64)) * 4  # one f32 per row
        elif reads_region and not is_dot:
            region.update(e.outvars)
        elif reads_region:
            in_place.update(v for v in e.invars if isinstance(v, Var) and v not in region)
    return region, lse, in_place


def segment_footprint(graph: LayerGraph, seg: Segment, policy: Compression,
                      channels: dict[int, int],
                      attention: AttentionAssumption = "as_traced",
                      backend: Backend = DEFAULT_BACKEND) -> Footprint:
    """The footprint of one segment (see the module docstring)."""
    weights = sum(policy.weight_bytes(graph.params[i].path,
                                      int(np.prod(graph.params[i].shape, dtype=np.int64)),
                                      graph.params[i].dtype.itemsize, channels.get(i))
                  for i in seg.params)
    cache = set(seg.cache_inputs)
    later = _read_later(graph, seg)
    # The KV cache is counted on its own; its in-place updates are not new activations.
    acts_inputs = [v for v in seg.inputs if v not in cache]
    eqns = list(seg.eqns)
    aliased = _cache_updates(eqns, cache)
    kind = _attention_kind(eqns, set(graph.param_vars))
    lse: dict[int, int] = {}
    region: set = set()
    in_place: set = set()
    if attention == "fused" and kind == "materialized":
        region, lse, in_place = _score_region(eqns, set(graph.param_vars))
        aliased |= region
        kind = "fused"
    live = dict(inputs=acts_inputs, outputs=seg.outputs,
                live_through=[v for v in acts_inputs if v in later], aliased=aliased)
    activation = peak_live_bytes(eqns, **live)
    # Buffers: how far workspaces raise the peak, each charged while its equation runs --
    # except the copies of dot operands (layout, and the backend's float32 copies of 16-bit
    # dots), which live where XLA makes them (``_operand_copies``).
    unknown: set[str] = set()
    decoded = _decoded_weights(graph, seg, policy, channels) \
        if DECODE_MATERIALISED[backend] else frozenset()
    held, charge = _workspace_schedule(eqns, unknown, backend, skip=region | in_place,
                                       keep={*live["outputs"], *live["live_through"]},
                                       decoded=decoded)
    for k, v in lse.items():
        charge[k] += v
    with_workspace = peak_live_bytes(eqns, **live, held=held, backend=backend,
                                     workspace=lambda e: charge[id(e)])
    buffers = with_workspace - activation
    return Footprint(
        weights_bytes=weights,
        activation_bytes=activation,
        buffer_bytes=buffers,
        kv_cache_bytes=sum(value_bytes(v) for v in cache),
        attention=kind,
        unknown_primitives=tuple(sorted(unknown)),
        backend=backend,
    )


def _decoded_weights(graph: LayerGraph, seg: Segment, policy: Compression,
                     channels: dict[int, int]) -> frozenset:
    """The segment's weights stored compressed (read by a matmul, and quantised or made
    sparse under ``policy``, as ``passes.codec.build_codecs`` picks them)."""
    out = set()
    for i in seg.params:
        path = graph.params[i].path
        sparse = policy.sparsity is not None and re.search(policy.sparse_params, path)
        if i in channels and (policy.weight_bits is not None or sparse):
            out.add(graph.param_vars[i])
    return frozenset(out)


def _operand_copies(eqns, backend: Backend, skip=frozenset(), keep=frozenset(),
                    layout: bool = True, decoded=frozenset()) -> tuple[dict, dict[int, int]]:
    """The copies of dot operands a backend makes: bytes of the values it stores other than
    as traced (``held``), and the copy bytes charged at each equation (by id).

    An operand is copied when the dot reads it in another layout (batch dimensions not
    leading; ``layout=False`` leaves these to the ``dot_general`` buffer rule) or in float32
    (``backend.dot_holding``; the copy is then float32, layout change included). Where the copy
    lives depends on who made the operand:

    - a fusible equation of the segment: its fusion writes the operand as the dot reads it
      (float32, transposed) -- no copy, the value itself is stored that way -- when the dot
      is its only reader, or the copy is only a float32 one;
    - a dot of the segment (or another non-fusible equation): the copy is made right after
      it; when the dot is the operand's only reader the operand dies there, so the copy adds
      bytes only while it is made;
    - otherwise (a segment input, a weight, an operand read elsewhere too): the copy is made
      as soon as the operand exists and lives until the dot (XLA:CPU hoists the float32 copies
      of weights to the start of the program).

    ``keep``: values that outlive the equations (outputs), so never only a dot's operand.
    ``decoded``: weights stored compressed; their decode writes the dense weight (the dot's
    float32 copy where it takes one), so they are copied even when the dot could read them.
    A dot whose 16-bit result the backend keeps in float32 holds that result at float32 size.
    """
    held: dict = {}
    charge = {id(e): 0 for e in eqns}
    defined = {v: i for i, e in enumerate(eqns) for v in e.outvars}
    decoded = set(decoded)
    for e in eqns:  # a decoded weight reshaped / transposed / converted is decoded too
        if e.primitive.name in _VIEWS and isinstance(e.invars[0], Var) and \
                e.invars[0] in decoded:
            decoded.update(e.outvars)
    readers: dict = defaultdict(int)
    for e in eqns:
        for v in e.invars:
            if isinstance(v, Var):
                readers[v] += 1

    def hold(v, nbytes: int) -> None:
        held[v] = max(held.get(v, 0), value_bytes(v), nbytes)

    copies: dict = {}  # operand -> (copy bytes, last dot reading the copy); one copy each
    for i, e in enumerate(eqns):
        if e.primitive.name != "dot_general":
            continue
        how = backend_lib.dot_holding(e, backend)
        if how.result_f32:
            for v in e.outvars:
                hold(v, backend_lib.f32_bytes(v))
        (_, _), (lb, rb) = e.params["dimension_numbers"]
        for v, batch in zip(e.invars, (lb, rb), strict=True):
            if not isinstance(v, Var) or v in skip:
                continue
            f32 = how.operands_f32 and np.dtype(v.aval.dtype) in backend_lib.HALF_DTYPES
            moved = layout and bool(batch) and tuple(batch) != tuple(range(len(batch)))
            if not (f32 or moved or v in decoded):
                continue
            copy = backend_lib.f32_bytes(v) if f32 else value_bytes(v)
            src = eqns[defined[v]] if v in defined else None
            only = readers[v] == 1 and v not in keep
            if src is not None and (_fusible(src) or not moved) and (only or not moved):
                hold(v, copy)  # written by its producer as the dot reads it
            elif src is not None and only:
                hold(v, copy)  # the copy replaces the operand; both live while it is made
                charge[id(eqns[min(defined[v] + 1, i)])] += copy
            else:
                copies[v] = (max(copy, copies.get(v, (0, i))[0]), i)
    for v, (copy, last) in copies.items():
        for j in range(defined.get(v, -1) + 1, last + 1):
            charge[id(eqns[j])] += copy
    return held, charge


def _workspace_schedule(eqns, unknown: set[str], backend: Backend, skip=frozenset(),
                        keep=frozenset(), decoded=frozenset()) -> tuple[dict, dict[int, int]]:
    """Workspace bytes charged at each equation (by id) -- buffer rules, and the operand
    copies of dots (``_operand_copies``) -- with the bytes of values held other than as
    traced."""
    held, charge = _operand_copies(eqns, backend, skip, keep, decoded=decoded)
    for e in eqns:
        if e.primitive.name != "dot_general":
            charge[id(e)] += _buffer_bytes(e, unknown)
    return held, charge


def _cache_updates(eqns, cache: set) -> set:
    """Values that are a KV-cache input updated in place (dynamic_update_slice of it)."""
    return {e.outvars[0] for e in eqns
            if e.primitive.name == "dynamic_update_slice" and e.invars[0] in cache}


def _read_later(graph: LayerGraph, seg: Segment) -> set:
    segs = graph.segments
    after = segs[[s.name for s in segs].index(seg.name) + 1:]
    return {v for s in after for v in s.inputs} | set(graph.jaxpr.jaxpr.outvars)


def footprint(graph: LayerGraph, compression: str | Compression | None = None,
              attention: AttentionAssumption = "as_traced",
              backend: Backend = DEFAULT_BACKEND) -> GraphFootprint:
    """Footprints of the prologue, every layer and the epilogue.

    Args:
        graph: the segmented model.
        compression: None, a preset name or a Compression policy for the weights.
        attention: "as_traced", or "fused" to assume a flash-attention kernel.
        backend: whose bytes to count: "gpu" (the traced dtypes) or "cpu" (with XLA:CPU's
            float32 copies of 16-bit dots); planning passes its hardware's kind.

    Example:
        >>> fp = footprint(graph, compression="int8", backend="cpu")
        >>> fp.compression.name, fp.backend
        ('int8', 'cpu')
    """
    if attention not in ATTENTION_ASSUMPTIONS:
        raise ConfigError(f"attention must be one of {ATTENTION_ASSUMPTIONS}, got "
                          f"{attention!r}.")
    backend_lib.check_backend(backend)
    policy = compression_lib.get(compression)
    channels = output_channels(graph)
    memo: dict[tuple, Footprint] = {}
    layers = []
    for layer in graph.layers:
        # Identical layers differ only in which weights they read; their sizes are equal
        # when their parameter shapes are, so compute once per (signature, param shapes).
        later = _read_later(graph, layer)
        key = (layer.signature, tuple(graph.params[i].shape for i in layer.params),
               tuple(v in later for v in layer.inputs))
        if key not in memo:
            memo[key] = segment_footprint(graph, layer, policy, channels, attention, backend)
        layers.append(memo[key])
    return GraphFootprint(
        prologue=segment_footprint(graph, graph.prologue, policy, channels, attention, backend),
        layers=tuple(layers),
        epilogue=segment_footprint(graph, graph.epilogue, policy, channels, attention, backend),
        compression=policy,
        backend=backend,
    )
