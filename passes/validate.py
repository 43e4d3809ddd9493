"""Checks footprint estimates against XLA's own buffer assignment.

Each distinct layer (one per structural signature) is compiled alone --
``jax.jit(layer).lower(*avals).compile().memory_analysis()`` -- and XLA's total
(arguments + outputs + temporaries - aliased) is set beside the estimate. KV-cache inputs are
donated, so their in-place update aliases as the estimate assumes. The footprints must be
for the backend XLA compiles for here (``footprint(graph, backend="cpu")`` on a CPU).

Compressed footprints (``footprint(graph, "int8", ...)``) are checked on the layer as a stage
runs it: it takes each compressed weight's stored arrays (``ParamCodec.stored_avals``: values,
[indices], [scales]) as arguments and expands them inside (``ParamCodec.decode``), so XLA's
argument bytes are the stored bytes and its temporaries hold what decoding materialises.

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
- Compressed weights: the layer takes the stored arrays and decodes them inside; XLA:CPU
  writes each decoded weight as a fusion of its own (the footprint counts it as a copy).
  int8, int4, int8-2:4 and int4-75% agree within 5% on the tiny models.
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
from lwjax.passes.codec import ParamCodec, build_codecs
from lwjax.passes.footprint import GraphFootprint, value_bytes
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
        weights_bytes: the footprint's weights (stored bytes, after compression).
        input_bytes: the layer's other arguments (activations, KV cache); XLA's argument
            bytes are ``weights_bytes + input_bytes`` when the weights count what it stores.
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
    weights_bytes: int = 0
    input_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.estimate_bytes / self.xla_bytes


def compile_segment(graph: LayerGraph, index: int, compiler_options: dict | None = None,
                    codecs: list[ParamCodec | None] | None = None):
    """Compiles layer ``index`` alone; returns the jax.stages.Compiled.

    ``codecs`` (``build_codecs(graph, policy)``): a compressed weight is passed as its stored
    arrays and decoded inside, as ``passes.storage.SlotStorage.unpack`` does in a stage.

    Example:
        >>> compile_segment(graph, 0, codecs=build_codecs(graph, get("int8")))
    """
    seg = graph.layers[index]
    codecs = codecs if codecs is not None else [None] * len(graph.params)
    stored = [[_aval(graph.param_vars[i])] if codecs[i] is None else codecs[i].stored_avals()
              for i in seg.params]
    n_params = sum(len(arrays) for arrays in stored)
    cache = set(seg.cache_inputs)

    def run(*vals):
        weights, rest = [], list(vals[:n_params])
        for i, arrays in zip(seg.params, stored, strict=True):
            mine, rest = rest[:len(arrays)], rest[len(arrays):]
            weights.append(mine[0] if codecs[i] is None else codecs[i].decode(mine))
        return eval_segment(graph, seg, dict(zip(seg.params, weights, strict=True)),
                            list(vals[n_params:]))

    avals = [a for arrays in stored for a in arrays] + [_aval(v) for v in seg.inputs]
    donate = tuple(n_params + k for k, v in enumerate(seg.inputs) if v in cache and v.aval.shape)
    return jax.jit(run, donate_argnums=donate).lower(*avals).compile(compiler_options)


def _aval(v) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)


# The buffer-assignment dumps of XLA as shipped with jax 0.10.2: "value: <7 name{} @0>
# (size=N,offset=M)" per buffer value, "name{}:start-end" per live range.
_VALUE = re.compile(r"value: <\d+ ([^\s{]+)(\{[^}]*\})? @\d+> \(size=(\d+),")
_RANGE = re.compile(r"(\S+?)(\{[^}]*\}):(\d+)-(\d+)")


def xla_live_peak_bytes(graph: LayerGraph, index: int,
                        codecs: list[ParamCodec | None] | None = None) -> int:
    """XLA's peak of live buffers for layer ``index``: the most bytes of buffers live at one
    point of its schedule (a buffer from its defining instruction through its last use, both
    included), read from the buffer-assignment dump of one compile. Unlike memory_analysis()
    it has no heap-packing gaps; it can exceed it a little where XLA writes an output into a
    dying operand's buffer.

    Example:
        >>> xla_live_peak_bytes(graph, 0)
        8979720
    """
    return _compile_with_peak(graph, index, codecs)[1]


def _compile_with_peak(graph: LayerGraph, index: int, codecs=None):
    """(the Compiled, XLA's peak of live buffers) from one compile that dumps its buffers."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_segment(graph, index, {"xla_dump_to": tmp,
                                                  "xla_dump_hlo_as_text": True}, codecs)
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
    backend -- under the footprints' compression, with stored weights decoded inside;
    ``peak=True`` adds XLA's peak of live buffers (``xla_live_peak_bytes``).

    Raises:
        ConfigError: the footprints are for another backend than the one XLA compiles for.
        CompressionError: the footprints' compression cannot store one of the weights.
    """
    platform = jax.default_backend()
    if fp.backend != platform:
        raise ConfigError(
            f"The footprints count {fp.backend!r} bytes but XLA compiles for {platform!r} "
            f"here; compare like with like: footprint(graph, backend={platform!r}).")
    codecs = build_codecs(graph, fp.compression)
    rows = []
    for indices in graph.distinct_layers().values():
        compiled, xla_peak = _compile_with_peak(graph, indices[0], codecs) if peak else \
            (compile_segment(graph, indices[0], codecs=codecs), None)
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
            weights_bytes=fp.layers[indices[0]].weights_bytes,
            input_bytes=sum(value_bytes(v) for v in graph.layers[indices[0]].inputs),
        ))
    return tuple(rows)
