"""Pass: the roofline cost model -- per-layer time, link time, pipeline throughput.

A pure module: nothing here touches a device. Times are *projected*, never measured.

What the roofline includes:

- Compute: the FLOPs of matrix multiplications (``dot_general``, convolutions), at the
  device's peak for the compute dtype (``HardwareSpec.peak_flops``).
- Memory: the bytes each matmul reads and writes (operands and result), split into weight
  bytes and activation bytes. Bytes held on chip move at ``l2_bandwidth``, the rest at
  ``hbm_bandwidth``; every byte also passes through L2, so memory time is
  ``max(off_chip / hbm_bandwidth, all_bytes / l2_bandwidth)`` (a two-level roofline).
- Layer time is ``max(compute, memory)``: compute and memory traffic overlap perfectly.
- Links: ``latency + bytes / bandwidth`` per transfer; ring all-reduce for tensor
  parallelism; a GPipe schedule of ``M + S - 1`` ticks, each tick the slowest stage then the
  stage-to-stage transfer (not overlapped, as in lwjax's lowering).

What it leaves out: elementwise ops, norms, softmax, gathers and scatters (assumed fused
into the matmuls around them; jax's ``unfused_flops`` / ``unfused_hbm_bytes`` are kept on
``JaxprCost`` for reference), efficiency below peak (no MFU factor), kernel launch and
dispatch overhead, tile quantisation, cache conflicts and eviction (data that "fits" is
assumed to stay), overlap of communication with compute, network topology beyond a ring,
and KV caches / decode.

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
    >>> from lwjax import hardware
    >>> t = layer_time(LayerCost(2e12, 10**9, 10**9), hardware.H100_SXM, weights_on_chip=False)
    >>> t.bound
    'compute'
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.experimental import roofline as jax_roofline

from lwjax._compat import ClosedJaxpr, Jaxpr, jaxprs_in_params, roofline_rules
from lwjax._compat import Literal as JaxLiteral
from lwjax.errors import ConfigError
from lwjax.hardware import ComputeDtype, HardwareSpec
from lwjax.models.configs import DenseConfig, MoEConfig

Bound = Literal["compute", "memory"]
AttentionKernel = Literal["flash", "materialized"]


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


# ---- one layer on one device ---------------------------------------------------------------


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


@dataclasses.dataclass(frozen=True)
class LayerTime:
    """Roofline time of a layer: ``total_s = max(compute_s, memory_s)``."""

    compute_s: float
    memory_s: float
    total_s: float
    bound: Bound


def layer_time(
    cost: LayerCost,
    hw: HardwareSpec,
    *,
    weights_on_chip: bool,
    activations_on_chip: bool = False,
    dtype: ComputeDtype | str | np.dtype = "bfloat16",
) -> LayerTime:
    """Roofline time of one layer on one device.

    Weights come from L2 (``hw.l2_bandwidth``) when ``weights_on_chip`` (the stage fits the
    cache), else from HBM; likewise activations with ``activations_on_chip``. Off-chip bytes
    also pass through L2, so memory time is ``max(off / hbm_bw, (on + off) / l2_bw)``.

    Args:
        cost: FLOPs and bytes of the layer.
        hw: the device.
        weights_on_chip: the layer's stage keeps its weights in L2.
        activations_on_chip: activations stay in L2 too (default: they go through HBM).
        dtype: compute dtype, selecting the peak FLOP/s.

    Returns:
        The compute, memory and total (max) seconds, and which bound dominates.

    Example:
        >>> cost = LayerCost(flops=1e11, weight_bytes=4 * 10**9, activation_bytes=10**9)
        >>> layer_time(cost, hardware.H100_SXM, weights_on_chip=False).bound
        'memory'
    """
    compute_s = cost.flops / hw.peak_flops(dtype)
    on_chip = cost.weight_bytes * weights_on_chip + cost.activation_bytes * activations_on_chip
    off_chip = cost.weight_bytes + cost.activation_bytes - on_chip
    memory_s = max(off_chip / hw.hbm_bandwidth, (on_chip + off_chip) / hw.l2_bandwidth)
    bound: Bound = "compute" if compute_s >= memory_s else "memory"
    return LayerTime(compute_s, memory_s, max(compute_s, memory_s), bound)


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


# ---- links and pipelines --------------------------------------------------------------------


def transfer_time(nbytes: float, hw: HardwareSpec) -> float:
    """Point-to-point send: ``link_latency + nbytes / link_bandwidth`` (0 for 0 bytes).

    Example:
        >>> transfer_time(450e9, hardware.H100_SXM)   # 1 s of NVLink, plus 5 us latency
        1.000005
    """
    _require(_is_nonneg(nbytes), f"nbytes must be finite and >= 0, got {nbytes!r}.")
    return 0.0 if nbytes == 0 else hw.link_latency + nbytes / hw.link_bandwidth


def allreduce_time(nbytes: float, n: int, hw: HardwareSpec) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` devices.

    ``2 (n-1)/n * nbytes / link_bandwidth + 2 (n-1) * link_latency`` (reduce-scatter then
    all-gather, ``n-1`` steps each); 0 for ``n == 1``.

    Example:
        >>> allreduce_time(8e9, 8, hardware.H100_SXM)   # 14e9 bytes / 450e9 + 14 * 5 us
        0.031181...
    """
    _require(_is_nonneg(nbytes), f"nbytes must be finite and >= 0, got {nbytes!r}.")
    _require(_is_count(n), f"n (devices) must be a positive integer, got {n!r}.")
    if n == 1 or nbytes == 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / hw.link_bandwidth + 2 * (n - 1) * hw.link_latency


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe idle fraction ``(S - 1) / (M + S - 1)``.

    Example:
        >>> bubble_fraction(2, 8)
        0.1111111111111111
    """
    _require(_is_count(stages), f"stages must be a positive integer, got {stages!r}.")
    _require(
        _is_count(microbatches), f"microbatches must be a positive integer, got {microbatches!r}."
    )
    return (stages - 1) / (microbatches + stages - 1)


@dataclasses.dataclass(frozen=True)
class Projection:
    """Projected (not measured) throughput of a pipelined forward pass.

    Attributes:
        tps: tokens per second.
        tpot_ms: milliseconds per token at that throughput (``1000 / tps``).
        step_s: seconds for all microbatches (fill + steady state + drain).
        bubble: idle fraction ``(S - 1) / (M + S - 1)``.
        stage_s: seconds per stage per microbatch.
        transfer_s: seconds per stage-to-stage transfer of one microbatch.
        microbatches: M.
        tokens_per_step: tokens processed in ``step_s``.
    """

    tps: float
    tpot_ms: float
    step_s: float
    bubble: float
    stage_s: tuple[float, ...]
    transfer_s: float
    microbatches: int
    tokens_per_step: int

    def summary(self) -> str:
        """A short, labelled report."""
        return (
            f"projected: {self.tps:,.0f} tokens/s, {self.tpot_ms:.6f} ms/token, "
            f"step {self.step_s * 1e3:.3f} ms ({len(self.stage_s)} stages x "
            f"{self.microbatches} microbatches, bubble {self.bubble:.1%}), slowest stage "
            f"{max(self.stage_s) * 1e3:.3f} ms, transfer {self.transfer_s * 1e3:.3f} ms"
        )


def pipeline_throughput(
    stage_times_s: Sequence[float],
    transfer_s: float,
    microbatches: int,
    tokens_per_microbatch: int,
) -> Projection:
    """GPipe over S stages and M microbatches: ``M + S - 1`` ticks, each the slowest stage
    plus one stage-to-stage transfer (none when S == 1).

    Example:
        >>> p = pipeline_throughput([1.0, 1.0], 0.0, microbatches=2, tokens_per_microbatch=10)
        >>> p.step_s, p.tps   # 3 ticks of 1 s for 20 tokens
        (3.0, 6.666666666666667)
    """
    times = tuple(float(t) for t in stage_times_s)
    _require(len(times) > 0, "stage_times_s is empty; give one time per pipeline stage.")
    _require(all(_is_nonneg(t) for t in times), f"stage times must be >= 0, got {times}.")
    _require(_is_nonneg(transfer_s), f"transfer_s must be finite and >= 0, got {transfer_s!r}.")
    _require(
        _is_count(tokens_per_microbatch),
        f"tokens_per_microbatch must be a positive integer, got {tokens_per_microbatch!r}.",
    )
    bubble = bubble_fraction(len(times), microbatches)
    tick = max(times) + (transfer_s if len(times) > 1 else 0.0)
    _require(tick > 0, "every stage time and the transfer time are 0; nothing to project.")
    step_s = (microbatches + len(times) - 1) * tick
    tokens = microbatches * tokens_per_microbatch
    tps = tokens / step_s
    return Projection(
        tps, 1e3 / tps, step_s, bubble, times, float(transfer_s), microbatches, tokens
    )


# ---- closed forms for lwjax's transformer blocks --------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockFlops:
    """Matmul FLOPs of one transformer block on one device (closed form).

    Attributes:
        attention_projections: q, k, v, out: ``4 * 2*B*T*D*(N/tp)*H``.
        attention_scores: ``QK^T`` and ``PV``: ``2 * 2*B*T*T*(N/tp)*H`` over the full T x T
            square (what the XLA attention computes; causal masking does not skip work), or
            ``2 * 2*B*(N/tp)*H * T(T+1)/2`` with ``causal_skip``.
        mlp: dense: ``3 * 2*B*T*D*(F/tp)``. MoE: router ``2*B*T*D*E`` (replicated) plus every
            expert on its capacity ``C`` slots per sequence: ``3 * 2*B*E*C*D*(F/tp)``.
    """

    attention_projections: int
    attention_scores: int
    mlp: int

    @property
    def total(self) -> int:
        return self.attention_projections + self.attention_scores + self.mlp


def _local_dims(cfg: DenseConfig, tp: int) -> tuple[int, int]:
    _require(_is_count(tp), f"tp must be a positive integer, got {tp!r}.")
    for name in ("num_heads", "mlp_hidden_size"):
        _require(
            getattr(cfg, name) % tp == 0,
            f"tp={tp} does not divide {name}={getattr(cfg, name)}; pick a divisor.",
        )
    return cfg.num_heads // tp, cfg.mlp_hidden_size // tp


def _batch_seq(cfg: DenseConfig, batch_size: int | None, seq_len: int | None) -> tuple[int, int]:
    b = cfg.batch_size if batch_size is None else batch_size
    t = cfg.seq_len if seq_len is None else seq_len
    _require(
        _is_count(b) and _is_count(t),
        f"batch_size and seq_len must be positive integers, got {b!r}, {t!r}.",
    )
    return b, t


def block_flops(
    cfg: DenseConfig,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    tp: int = 1,
    causal_skip: bool = False,
) -> BlockFlops:
    """Closed-form matmul FLOPs of one block (see ``BlockFlops``); defaults from ``cfg``.

    Example:
        >>> block_flops(configs.tiny_dense()).total   # B=4 T=16 D=64 N=4 H=16 F=128
        5505024
    """
    b, t = _batch_seq(cfg, batch_size, seq_len)
    n, f = _local_dims(cfg, tp)
    d, h = cfg.hidden_size, cfg.head_dim
    projections = 4 * 2 * b * t * d * n * h
    scores = 2 * 2 * b * n * h * (t * (t + 1) // 2 if causal_skip else t * t)
    if isinstance(cfg, MoEConfig):
        e, c = cfg.num_experts, cfg.capacity(t)
        mlp = 2 * b * t * d * e + 3 * 2 * b * e * c * d * f
    else:
        mlp = 3 * 2 * b * t * d * f
    return BlockFlops(projections, scores, mlp)


def block_cost(
    cfg: DenseConfig,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    tp: int = 1,
    attention: AttentionKernel = "flash",
    causal_skip: bool = False,
) -> LayerCost:
    """Closed-form LayerCost of one block on one of ``tp`` tensor-parallel devices.

    Weights: the device's share of q/k/v/out and MLP (router and norm scales replicated).
    Activations, counted per matmul as ``JaxprCost`` does (s = bytes per element, Nl = N/tp,
    Fl = F/tp): ``s * (7*B*T*D + 8*B*T*Nl*H + 3*B*T*Fl)`` for a dense block; a MoE MLP
    replaces ``3*B*T*D + 3*B*T*Fl`` by ``B*T*D + B*T*E + 3*B*E*C*D + 3*B*E*C*Fl``.
    ``attention="materialized"`` adds the T x T scores the XLA attention writes (float32)
    and reads back (in the model dtype): ``B*Nl*T*T*(4 + s)``; "flash" keeps them on chip.

    Example:
        >>> block_cost(configs.tiny_dense()).weight_bytes == 4 * configs.tiny_dense(
        ...     ).block_param_count()
        True
    """
    b, t = _batch_seq(cfg, batch_size, seq_len)
    n, f = _local_dims(cfg, tp)
    _require(
        attention in ("flash", "materialized"),
        f"attention must be 'flash' or 'materialized', got {attention!r}.",
    )
    d, h, s = cfg.hidden_size, cfg.head_dim, cfg.dtype.itemsize
    attention_weights = 4 * d * n * h
    attention_acts = 4 * b * t * d + 8 * b * t * n * h
    if isinstance(cfg, MoEConfig):
        e, c = cfg.num_experts, cfg.capacity(t)
        mlp_weights = d * e + e * 3 * d * f
        mlp_acts = b * t * d + b * t * e + 3 * b * e * c * d + 3 * b * e * c * f
    else:
        mlp_weights = 3 * d * f
        mlp_acts = 3 * b * t * d + 3 * b * t * f
    activation_bytes = s * (attention_acts + mlp_acts)
    if attention == "materialized":
        activation_bytes += b * n * t * t * (4 + s)
    flops = block_flops(cfg, batch_size=b, seq_len=t, tp=tp, causal_skip=causal_skip).total
    return LayerCost(float(flops), s * (attention_weights + mlp_weights + 2 * d), activation_bytes)


def _project(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    tp: int,
    microbatches: int,
    cache_bytes: int | None,
    attention: AttentionKernel,
) -> Projection:
    _require(
        _is_count(microbatches), f"microbatches must be a positive integer, got {microbatches!r}."
    )
    _require(
        cfg.batch_size % microbatches == 0,
        f"microbatches={microbatches} does not divide batch_size={cfg.batch_size}.",
    )
    _require(
        len(layers_per_stage) > 0 and all(_is_count(n) for n in layers_per_stage),
        f"layers_per_stage must be positive integers, got {tuple(layers_per_stage)}.",
    )
    _require(
        sum(layers_per_stage) == cfg.num_layers,
        f"layers_per_stage {tuple(layers_per_stage)} sums to {sum(layers_per_stage)}, "
        f"not num_layers={cfg.num_layers}.",
    )
    capacity = hw.l2_bytes if cache_bytes is None else cache_bytes
    mb = cfg.batch_size // microbatches
    cost = block_cost(cfg, batch_size=mb, tp=tp, attention=attention)
    activation = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
    sync = 2 * allreduce_time(activation, tp, hw)  # Megatron: after attention and after MLP
    stage_s = []
    for n in layers_per_stage:
        fits = n * cost.weight_bytes <= capacity
        block = layer_time(cost, hw, weights_on_chip=fits, dtype=cfg.dtype.name)
        stage_s.append(n * (block.total_s + sync))
    return pipeline_throughput(
        stage_s, transfer_time(activation, hw), microbatches, mb * cfg.seq_len
    )


def project_tp_pp(
    cfg: DenseConfig,
    hw: HardwareSpec,
    tp: int,
    pp: int,
    microbatches: int,
    *,
    cache_bytes: int | None = None,
    attention: AttentionKernel = "flash",
) -> Projection:
    """Projected forward-pass throughput of the transformer blocks under TP x PP.

    Megatron tensor parallelism over ``tp`` devices (heads and MLP width split; two ring
    all-reduces of the activations per block), GPipe over ``pp`` contiguous stages of
    near-equal layer counts. A stage's weights are read from L2 when the device's share fits
    ``cache_bytes`` (default ``hw.l2_bytes``), else from HBM; activations go through HBM.
    Each TP rank sends the full activation to its peer in the next stage. The embedding and
    LM head are left out (the seed documents state no vocabulary), as in
    ``project_layerwise``, so the two compare block for block.

    Example:
        >>> project_tp_pp(configs.seed_dense(), hardware.H100_SXM, 8, 2, 8).bubble
        0.1111111111111111
    """
    _require(
        _is_count(pp) and pp <= cfg.num_layers,
        f"pp must be a positive integer <= num_layers={cfg.num_layers}, got {pp!r}.",
    )
    base, extra = divmod(cfg.num_layers, pp)
    stages = [base + (i < extra) for i in range(pp)]
    return _project(cfg, hw, stages, tp, microbatches, cache_bytes, attention)


def project_layerwise(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    microbatches: int,
    *,
    cache_bytes: int | None = None,
    attention: AttentionKernel = "flash",
) -> Projection:
    """Projected forward-pass throughput of the blocks as a layer-wise pipeline.

    One device per stage (no tensor parallelism); stage ``i`` runs ``layers_per_stage[i]``
    consecutive blocks, reading weights from L2 when they fit ``cache_bytes`` (default
    ``hw.l2_bytes``), else from HBM. Same assumptions as ``project_tp_pp``.

    Example:
        >>> p = project_layerwise(configs.seed_dense(), hardware.H100_SXM, [1] * 16, 8)
        >>> len(p.stage_s)
        16
    """
    return _project(cfg, hw, tuple(layers_per_stage), 1, microbatches, cache_bytes, attention)
