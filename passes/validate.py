"""Checks footprint estimates against XLA's own buffer assignment.

Each distinct layer (one per structural signature) is compiled alone --
``jax.jit(layer).lower(*avals).compile().memory_analysis()`` -- and XLA's total
(arguments + outputs + temporaries - aliased) is set beside the estimate. KV-cache inputs are
donated, so their in-place update aliases as the estimate assumes.

Remaining gaps, by cause:
- XLA:CPU fuses more than the estimate's rule (e.g. a transpose or broadcast into a dot
  operand) or less (it may materialise an elementwise value read by two fusions): the
  estimate's activations can be off by one intermediate in either direction.
- XLA's temp buffer is one allocation packed by its heap simulator; fragmentation adds a few
  percent over the exact peak.
- Small layers are dominated by weights, so totals agree closely; large-sequence layers are
  dominated by activations, where the two differences above show most.

Example:
    >>> rows = validate(graph, footprint(graph))
    >>> all(0.9 <= r.ratio <= 1.1 for r in rows)
"""

from __future__ import annotations

import dataclasses

import jax

from lwjax.passes.footprint import GraphFootprint
from lwjax.passes.segment import LayerGraph, eval_segment


@dataclasses.dataclass(frozen=True)
class ValidationRow:
    """Estimate vs XLA for one distinct layer (bytes)."""

    layers: tuple[str, ...]
    estimate_bytes: int
    xla_bytes: int
    xla_argument_bytes: int
    xla_output_bytes: int
    xla_temp_bytes: int
    xla_alias_bytes: int

    @property
    def ratio(self) -> float:
        return self.estimate_bytes / self.xla_bytes


def compile_segment(graph: LayerGraph, index: int):
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
    return jax.jit(run, donate_argnums=donate).lower(*avals).compile()


def validate(graph: LayerGraph, fp: GraphFootprint) -> tuple[ValidationRow, ...]:
    """Estimate vs XLA's memory_analysis for each distinct layer."""
    rows = []
    for indices in graph.distinct_layers().values():
        ma = compile_segment(graph, indices[0]).memory_analysis()
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
        ))
    return tuple(rows)
