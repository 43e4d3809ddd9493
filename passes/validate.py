"""Checks footprint estimates against XLA's own buffer assignment.

Each distinct layer (one per structural signature) is compiled alone --
``jax.jit(layer).lower(*avals).compile().memory_analysis()`` -- and XLA's total
(arguments + outputs + temporaries - aliased) is set beside the estimate. KV-cache inputs are
donated, so their in-place update aliases as the estimate assumes. The footprints must be
for the backend XLA compiles for here (``footprint(graph, backend="cpu")`` on a CPU).

Remaining gaps, by cause:
- XLA:CPU fuses more than the estimate's rule (e.g. a transpose or broadcast into a dot
  operand) or less (it may materialise an elementwise value read by two fusions): the
  estimate's activations can be off by one intermediate in either direction.
- XLA's temp buffer is one allocation packed by its heap simulator; packing leaves gaps over
  the exact peak. In float32 they are a few percent; in bfloat16 prefill on XLA:CPU (jax
  0.10.2) they reach 20-50% once the attention scores dominate (S >= 32 for the tiny
  models): four score-sized float32 buffers live two at a time are placed in three slots.
  ``peak=True`` also reads XLA's peak of live buffers (``xla_live_peak_bytes``), which has
  no packing gaps; the estimate follows that one within a few percent.
- Small layers are dominated by weights, so totals agree closely; large-sequence layers are
  dominated by activations, where the differences above show most.

Example:
    >>> rows = validate(graph, footprint(graph, backend="cpu"), peak=True)
    >>> all(0.9 <= r.estimate_bytes / r.xla_peak_bytes <= 1.1 for r in rows)
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tempfile

import jax

from lwjax.errors import ConfigError, LwjaxError
from lwjax.passes.footprint import GraphFootprint
from lwjax.passes.segment import LayerGraph, eval_segment


@dataclasses.dataclass(frozen=True)
class ValidationRow:
    """Estimate vs XLA for one distinct layer (bytes).

    Attributes:
        layers: the layers with this structure.
        estimate_bytes: the footprint's total.
        xla_bytes: memory_analysis(): arguments + outputs + temporaries - aliased.
        xla_argument_bytes, xla_output_bytes, xla_temp_bytes, xla_alias_bytes: its parts.
        backend: the platform XLA compiled for (the footprint's backend).
        xla_peak_bytes: XLA's peak of live buffers (``xla_live_peak_bytes``), when asked for.
    """

    layers: tuple[str, ...]
    estimate_bytes: int
    xla_bytes: int
    xla_argument_bytes: int
    xla_output_bytes: int
    xla_temp_bytes: int
    xla_alias_bytes: int
    backend: str = "cpu"
    xla_peak_bytes: int | None = None

    @property
    def ratio(self) -> float:
        return self.estimate_bytes / self.xla_bytes


def compile_segment(graph: LayerGraph, index: int, compiler_options: dict | None = None):
    """Compiles layer ``index`` alone; returns the jax.stages.Compiled."""
    seg = graph.layers[index]
    n_params = len(seg.params)
    cache = set(seg.cache_inputs)

    def run(*vals):
        return eval_segment(graph, seg, dict(zip(seg.params, vals[:n_params], strict=True)),
                            list(vals[n_params:]))

    avals = [jax.ShapeDtypeStruct(graph.param_vars[i].aval.shape, graph.param_vars[i].aval.dtype)
             for i in seg.params]
    avals += [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in seg.inputs]
    donate = tuple(n_params + k for k, v in enumerate(seg.inputs) if v in cache and v.aval.shape)
    return jax.jit(run, donate_argnums=donate).lower(*avals).compile(compiler_options)


# The buffer-assignment dumps of XLA as shipped with jax 0.10.2: "value: <7 name{} @0>
# (size=N,offset=M)" per buffer value, "name{}:start-end" per live range.
_VALUE = re.compile(r"value: <\d+ ([^\s{]+)(\{[^}]*\})? @\d+> \(size=(\d+),")
_RANGE = re.compile(r"(\S+?)(\{[^}]*\}):(\d+)-(\d+)")


def xla_live_peak_bytes(graph: LayerGraph, index: int) -> int:
    """XLA's peak of live buffers for layer ``index``: the most bytes of buffers live at one
    point of its schedule (a buffer from its defining instruction through its last use, both
    included), read from the buffer-assignment dump of one compile. Unlike memory_analysis()
    it has no heap-packing gaps; it can exceed it a little where XLA writes an output into a
    dying operand's buffer.

    Example:
        >>> xla_live_peak_bytes(graph, 0)
        8979720
    """
    return _compile_with_peak(graph, index)[1]


def _compile_with_peak(graph: LayerGraph, index: int):
    """(the Compiled, XLA's peak of live buffers) from one compile that dumps its buffers."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_segment(graph, index, {"xla_dump_to": tmp,
                                                  "xla_dump_hlo_as_text": True})
        texts = [next((p.read_text() for p in pathlib.Path(tmp).glob(
            f"*after_optimizations-{suffix}")), "")
            for suffix in ("buffer-assignment.txt", "live-range.txt")]
    sizes: dict = {}
    for m in _VALUE.finditer(texts[0]):
        key = (m.group(1), m.group(2) or "{}")
        sizes[key] = max(sizes.get(key, 0), int(m.group(3)))
    ranges = texts[1].partition("BufferLiveRange:")[2].partition("Live ranges at")[0]
    spans = [((m.group(1), m.group(2)), int(m.group(3)), int(m.group(4)))
             for m in _RANGE.finditer(ranges)]
    if not sizes or not spans or any(k not in sizes for k, _, _ in spans):
        raise LwjaxError("XLA's buffer-assignment dump no longer reads as lwjax expects "
                         "(passes/validate.py, written for jax 0.10.2); update the parser.")
    end = max(e for _, _, e in spans)
    return compiled, max(sum(sizes[k] for k, a, b in spans if a <= t <= b)
                         for t in range(end + 1))


def validate(graph: LayerGraph, fp: GraphFootprint, *, peak: bool = False
             ) -> tuple[ValidationRow, ...]:
    """Estimate vs XLA's memory_analysis for each distinct layer, compiled for jax's default
    backend; ``peak=True`` adds XLA's peak of live buffers (``xla_live_peak_bytes``).

    Raises:
        ConfigError: the footprints are for another backend than the one XLA compiles for.
    """
    platform = jax.default_backend()
    if fp.backend != platform:
        raise ConfigError(
            f"The footprints count {fp.backend!r} bytes but XLA compiles for {platform!r} "
            f"here; compare like with like: footprint(graph, backend={platform!r}).")
    rows = []
    for indices in graph.distinct_layers().values():
        compiled, xla_peak = _compile_with_peak(graph, indices[0]) if peak else \
            (compile_segment(graph, indices[0]), None)
        ma = compiled.memory_analysis()
        xla = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)
        rows.append(ValidationRow(
            layers=tuple(graph.layers[i].name for i in indices),
            estimate_bytes=fp.layers[indices[0]].total_bytes,
            xla_bytes=xla,
            xla_argument_bytes=ma.argument_size_in_bytes,
            xla_output_bytes=ma.output_size_in_bytes,
            xla_temp_bytes=ma.temp_size_in_bytes,
            xla_alias_bytes=ma.alias_size_in_bytes,
            backend=platform,
            xla_peak_bytes=xla_peak,
        ))
    return tuple(rows)
