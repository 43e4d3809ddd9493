"""bf16 footprints on this CPU against XLA: lwjax's estimate of one layer (backend="cpu",
counting XLA:CPU's float32 copies of 16-bit matmuls) over XLA's ``memory_analysis()`` total
and over XLA's peak of live buffers, for lwjax's tiny dense and MoE models. Measured (XLA
compiles each distinct layer here); prints only.

Usage: ``python experiments/backend_bytes.py``.
"""

import dataclasses

import jax
import jax.numpy as jnp

from lwjax import models
from lwjax.passes.footprint import footprint
from lwjax.passes.segment import segment
from lwjax.passes.trace import trace
from lwjax.passes.validate import validate

CASES = (("prefill", 16), ("prefill", 256), ("decode", 1024))


def rows():
    """(model, mode, positions, estimate / memory_analysis, estimate / XLA live peak)."""
    for name in ("tiny_dense", "tiny_moe"):
        cfg = dataclasses.replace(getattr(models.configs, name)(), dtype=jnp.bfloat16)
        model = models.abstract(cfg)
        for mode, positions in CASES:
            if mode == "prefill":
                graph = segment(trace(model, jax.ShapeDtypeStruct((4, positions), jnp.int32)))
            else:
                graph = segment(trace(model, jax.ShapeDtypeStruct((4, 1), jnp.int32),
                                      mode="decode", cache_len=positions))
            r = validate(graph, footprint(graph, backend="cpu"), peak=True)[0]
            yield name, mode, positions, r.ratio, r.estimate_bytes / r.xla_peak_bytes


def main() -> None:
    print(f"bf16, one layer, batch 4, measured on {jax.default_backend()} "
          f"(JAX {jax.__version__})")
    print("| model | mode | positions | estimate / memory_analysis | estimate / XLA live peak |")
    print("|---|---|---:|---:|---:|")
    for name, mode, positions, total, live in rows():
        print(f"| {name} | {mode} | {positions} | {total:.3f} | {live:.3f} |")


if __name__ == "__main__":
    main()
