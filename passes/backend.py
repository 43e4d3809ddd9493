"""What an XLA backend does with a model's dtypes: the bytes it holds, and what it cannot run.

Two registries keyed by backend, with an explicit entry for each backend lwjax knows:

- ``DOT_RULES``: how a backend runs a ``dot_general`` -- natively, or through float32 copies of
  its operands and a float32 result. XLA:CPU (jax 0.10.2) multiplies bfloat16 x bfloat16 ->
  float32 as stored (YNNPACK, ``algorithm=dot_bf16_bf16_f32``), except a matrix by a vector,
  and nothing else in 16 bits: every other bfloat16 or float16 dot ``convert``s its operands
  to float32, multiplies in float32 and ``convert``s the result back where it is read. In the
  compiled HLO a weight's float32 copy is a fusion of the parameter alone, scheduled at the
  start of the program; an activation's producer fusion writes it in float32 (the 16-bit value
  is never stored); the float32 result is stored. ``passes/footprint.py`` charges these as
  buffer bytes. GPUs multiply 16-bit operands as stored (no copies).
- ``DOT_ALGORITHMS``: the explicit dot algorithms a backend accepts. jax refuses any other one
  when lowering for CPU (``ValueError: The precision 'F16_F16_F32' is not supported by
  dot_general on CPU``): ``jax.nn.dot_product_attention`` asks for F16_F16_F32 on float16
  queries, so a float16 transformer cannot be compiled for CPU. ``check_runnable`` finds such
  equations before anything is compiled.

Example:
    >>> check_runnable(segment(trace(model, tokens)), "cpu")   # raises for a float16 model
    >>> dot_holding(eqn, "cpu")
    DotHolding(operands_f32=True, result_f32=True)
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator

import numpy as np
from jax import lax

from lwjax._compat import ClosedJaxpr, Jaxpr, JaxprEqn, Var, jaxprs_in_params, name_stack_of
from lwjax.errors import ConfigError, UnsupportedOnBackendError
from lwjax.hardware import HardwareKind

# The backend whose bytes a footprint counts: a HardwareSpec's ``kind``.
Backend = HardwareKind
BACKENDS: tuple[str, ...] = typing.get_args(HardwareKind)
# Footprints count what a GPU holds unless told otherwise: the values in their traced dtypes
# (the design's "bytes in the stored dtypes"). Planning passes its hardware's kind.
DEFAULT_BACKEND: Backend = "gpu"

HALF_DTYPES = frozenset({np.dtype("bfloat16"), np.dtype("float16")})
F32_BYTES = 4


def check_backend(backend: str) -> None:
    """Raises ConfigError unless ``backend`` is one of ``BACKENDS``.

    Example:
        >>> check_backend("cpu")
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS} (the hardware's kind), got "
                          f"{backend!r}.")


# ---- dot_general: native, or through float32 copies ----------------------------------------

@dataclasses.dataclass(frozen=True)
class DotHolding:
    """What a backend holds for one dot_general beyond its traced values.

    Attributes:
        operands_f32: its 16-bit float operands are held as float32 copies.
        result_f32: its 16-bit float result is held in float32 (converted where read).
    """

    operands_f32: bool = False
    result_f32: bool = False


NATIVE = DotHolding()
DotRule = Callable[[JaxprEqn], DotHolding]


def _dtype(v) -> np.dtype | None:
    dtype = getattr(v.aval, "dtype", None)
    return None if dtype is None else np.dtype(dtype)


def _free_sizes(eqn: JaxprEqn) -> tuple[int, int]:
    """Elements of each operand's free (neither batch nor contracting) dimensions."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return tuple(
        int(np.prod([n for d, n in enumerate(v.aval.shape) if d not in (*c, *b)], dtype=np.int64))
        for v, c, b in zip(eqn.invars, (lc, rc), (lb, rb), strict=True))


def _cpu_dot(eqn: JaxprEqn) -> DotHolding:
    ins = {_dtype(v) for v in eqn.invars}
    out = _dtype(eqn.outvars[0])
    if not ins & HALF_DTYPES:
        return NATIVE
    # YNNPACK multiplies bf16 x bf16 -> f32 (the attention scores) as stored, but not a
    # matrix by a vector (decode's one query row), which falls back to float32 copies.
    if ins == {np.dtype("bfloat16")} and out == np.dtype("float32") and \
            min(_free_sizes(eqn)) > 1:
        return NATIVE
    return DotHolding(operands_f32=True, result_f32=out in HALF_DTYPES)


DOT_RULES: dict[str, DotRule] = {
    "cpu": _cpu_dot,
    "gpu": lambda eqn: NATIVE,  # tensor cores take bf16 / f16 operands as stored
}


def dot_holding(eqn: JaxprEqn, backend: Backend) -> DotHolding:
    """How ``backend`` holds a dot_general's operands and result (see ``DOT_RULES``).

    Example:
        >>> dot_holding(eqn, "gpu")
        DotHolding(operands_f32=False, result_f32=False)
    """
    check_backend(backend)
    return DOT_RULES[backend](eqn)


def f32_bytes(v) -> int:
    """Bytes of ``v``'s elements stored as float32."""
    return int(np.prod(v.aval.shape, dtype=np.int64)) * F32_BYTES


# ---- what a platform cannot run ------------------------------------------------------------

# Mirrors the CPU check in jax/_src/lax/lax.py ``_handle_dot_precision`` (jax 0.10.2): any other
# explicit algorithm is refused when lowering for CPU. None: no restriction known to lwjax.
DOT_ALGORITHMS: dict[str, frozenset | None] = {
    "cpu": frozenset({
        lax.DotAlgorithmPreset.DEFAULT, lax.DotAlgorithmPreset.F16_F16_F16,
        lax.DotAlgorithmPreset.F32_F32_F32, lax.DotAlgorithmPreset.F64_F64_F64,
        lax.DotAlgorithmPreset.BF16_BF16_F32, lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
        lax.DotAlgorithmPreset.BF16_BF16_F32_X6,
    }),
    "gpu": None,
    "tpu": None,
}


def _walk(eqns) -> Iterator[JaxprEqn]:
    """``eqns`` and, recursively, the equations of their sub-jaxprs."""
    for e in eqns:
        yield e
        for sub in jaxprs_in_params(e.params):
            yield from _walk((sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub).eqns)


def _units(graph_or_traced) -> Iterator[tuple[str, Iterator[JaxprEqn], dict]]:
    """(segment name, its equations, parameter var -> path) of a LayerGraph or TracedModel."""
    if hasattr(graph_or_traced, "segments"):
        g = graph_or_traced
        paths = {v: p.path for v, p in zip(g.param_vars, g.params, strict=True)}
        for seg in g.segments:
            yield seg.name, _walk(seg.eqns), paths
        return
    jaxpr: Jaxpr = graph_or_traced.closed_jaxpr.jaxpr
    # A TracedModel's invars are its parameter leaves, then its arguments.
    paths = dict(zip(jaxpr.invars, graph_or_traced.param_paths, strict=False))
    yield "model", _walk(jaxpr.eqns), paths


def check_runnable(graph_or_traced, platform: str) -> None:
    """Refuses a model that ``platform`` cannot compile, before anything is compiled.

    Today: dot_generals with an explicit dot algorithm the platform does not accept
    (``DOT_ALGORITHMS``) -- on CPU, the F16_F16_F32 that ``jax.nn.dot_product_attention`` uses
    for float16 queries.

    Args:
        graph_or_traced: a ``LayerGraph`` (``passes.segment``) or a ``TracedModel``
            (``passes.trace``).
        platform: the jax platform the model will run on (``device.platform``: "cpu", "gpu").

    Raises:
        UnsupportedOnBackendError: names the segment, the primitive, its operand dtypes and
            parameter paths, the algorithm, the platform, and what to do.

    Example:
        >>> check_runnable(segment(trace(model_f16, tokens)), "cpu")
        Traceback (most recent call last):
        UnsupportedOnBackendError: layers_0: dot_general ... float16 ...
    """
    allowed = DOT_ALGORITHMS.get(platform)
    if allowed is None:
        return
    for name, eqns, paths in _units(graph_or_traced):
        for e in eqns:
            algorithm = e.params.get("precision") if e.primitive.name == "dot_general" else None
            if not isinstance(algorithm, lax.DotAlgorithm | lax.DotAlgorithmPreset) or \
                    algorithm in allowed:
                continue
            operands = ", ".join(
                (f"{paths[v]} " if isinstance(v, Var) and v in paths else "")
                + f"{_dtype(v).name}{list(v.aval.shape)}" for v in e.invars)
            where = name_stack_of(e)
            why = (" (jax.nn.dot_product_attention asks for it on float16 queries)"
                   if algorithm == lax.DotAlgorithmPreset.F16_F16_F32 else "")
            dtypes = sorted({_dtype(v).name for v in e.invars})
            raise UnsupportedOnBackendError(
                f"{name}: dot_general ({operands}{', at ' + where if where else ''}) asks "
                f"for the dot algorithm {algorithm}{why}, which XLA cannot run on "
                f"{platform!r}: jax would refuse it when compiling. To run on {platform}, "
                f"cast the model from {'/'.join(dtypes)} to float32 or bfloat16 (e.g. "
                f"dataclasses.replace(cfg, dtype=jnp.bfloat16)); to plan for a GPU without "
                f"running here, use lwjax.plan(..., hardware='h100')."
            )
