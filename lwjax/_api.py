"""The public entry points: each reads as a short chain of passes."""

from __future__ import annotations

from lwjax.passes import footprint as footprint_lib
from lwjax.passes.compression import Compression
from lwjax.passes.footprint import AttentionAssumption
from lwjax.passes.segment import LayerGraph, segment
from lwjax.passes.trace import Mode, trace
from lwjax.report import LayerReport, ModelReport


def _report(graph: LayerGraph, fp: footprint_lib.GraphFootprint, attention: str,
            cache_len: int | None) -> ModelReport:
    def row(seg, f):
        return LayerReport(name=seg.name, kind=seg.kind, footprint=f, signature=seg.signature,
                           num_params=len(seg.params))

    return ModelReport(
        layers=tuple(row(s, f) for s, f in zip(graph.layers, fp.layers, strict=True)),
        prologue=row(graph.prologue, fp.prologue),
        epilogue=row(graph.epilogue, fp.epilogue),
        mode=graph.traced.mode,
        microbatch_size=graph.traced.batch_size,
        compression=fp.compression.name,
        attention=attention,
        cache_len=cache_len,
    )


def analyze(
    model,
    *args,
    mode: Mode = "prefill",
    cache_len: int | None = None,
    microbatch_size: int | None = None,
    compression: str | Compression | None = None,
    attention: AttentionAssumption = "as_traced",
    **kwargs,
) -> ModelReport:
    """Per-layer on-chip footprints of a model: trace -> segment -> footprint.

    Args:
        model: a Flax NNX module (real or ``models.abstract``), or a linen module followed
            by its variables in ``args``.
        *args: example call arguments (arrays or ``jax.ShapeDtypeStruct``).
        mode: "prefill" (forward over the sequence) or "decode" (one step, KV cache).
        cache_len: decode: KV-cache positions (default: the config's seq_len).
        microbatch_size: footprints for this batch (default: the arguments' batch).
        compression: None, a preset name ("int8", "int8-2:4", "int4", "int4-2:4",
            "int4-75%") or an ``lwjax.Compression``.
        attention: "as_traced", or "fused" to assume a flash-attention kernel (planning for
            a GPU from a CPU trace).
        **kwargs: further call arguments.

    Returns:
        ModelReport.

    Example:
        >>> report = lwjax.analyze(models.abstract(models.configs.seed_dense()),
        ...                        jax.ShapeDtypeStruct((16, 10000), jnp.int32),
        ...                        compression="int8", attention="fused")
        >>> report.layers[0].footprint.weights_bytes
        268558336
    """
    traced = trace(model, *args, mode=mode, cache_len=cache_len,
                   microbatch_size=microbatch_size, **kwargs)
    graph = segment(traced)
    fp = footprint_lib.footprint(graph, compression, attention=attention)
    if mode == "decode" and cache_len is None:
        cache_len = graph.traced.args[1].shape[1] if len(graph.traced.args) > 1 else None
    return _report(graph, fp, attention, cache_len)
