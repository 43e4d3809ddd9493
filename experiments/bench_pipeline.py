"""Benchmark: the layer-wise pipeline vs the same model jitted on one device, same batch.

Measured on this machine (CPU, 16 simulated devices sharing its cores). Prints medians of
repeated runs, interleaved (pipeline, single, pipeline, ...) so both see the same machine
load, the pipeline/single ratio for several microbatch counts, and compile times.

Run: ``python experiments/bench_pipeline.py [--repeats 7] [--layers 16] [--hidden 256]``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import jax

jax.config.update("jax_num_cpu_devices", 16)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models  # noqa: E402


def _time(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    a = ap.parse_args(argv)

    cfg = dataclasses.replace(
        models.configs.tiny_dense(), num_layers=a.layers, hidden_size=a.hidden, num_heads=4,
        head_dim=a.hidden // 4, mlp_hidden_size=4 * a.hidden, vocab_size=1024,
        batch_size=a.batch, seq_len=a.seq)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (a.batch, a.seq), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    single = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))

    t0 = time.perf_counter()
    single.lower(state, tokens).compile()
    single_compile = time.perf_counter() - t0
    want = single(state, tokens)

    print(f"measured on this machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {len(jax.devices())} simulated CPU devices, "
          f"jax {jax.__version__}")
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, MLP "
          f"{cfg.mlp_hidden_size}, batch {a.batch} x seq {a.seq}, float32; "
          f"median of {a.repeats} interleaved runs\n")
    print(f"{'objective':>10} {'M':>3} {'stages':>6} {'pipeline ms':>12} {'single ms':>10} "
          f"{'ratio':>7} {'spread pipe':>14} {'compile pipe s':>15} {'compile single s':>17} "
          f"{'max |diff|':>11}")
    runs = [(obj, m) for obj in ("bottleneck", "step") for m in a.microbatches
            if a.batch % m == 0]
    for objective, m in runs:
        sm = lwjax.layerwise_shard(model, tokens, cache_bytes=2**34, microbatches=m,
                                   objective=objective, allow=())
        t0 = time.perf_counter()
        compiled = sm.compile(tokens)
        pipe_compile = time.perf_counter() - t0
        run = lambda t, c=compiled, sm=sm: sm.program.outputs(c(sm.params, t))  # noqa: E731
        diff = float(jnp.max(jnp.abs(run(tokens) - want)))
        single(state, tokens).block_until_ready()
        pipe_t, single_t = [], []
        for _ in range(a.repeats):
            pipe_t.append(_time(run, tokens))
            single_t.append(_time(single, state, tokens))
        pm, smed = statistics.median(pipe_t), statistics.median(single_t)
        print(f"{objective:>10} {m:>3} {len(sm.plan.stages):>6} {pm * 1e3:>12.1f} "
              f"{smed * 1e3:>10.1f} {pm / smed:>7.2f} "
              f"{min(pipe_t) * 1e3:>6.1f}-{max(pipe_t) * 1e3:<7.1f} "
              f"{pipe_compile:>15.2f} {single_compile:>17.2f} {diff:>11.2e}")
    print("\nratio = pipeline / single-device time (lower is better); both measured here.\n"
          "objective 'bottleneck': one layer per device (16 stages); 'step': the planner's\n"
          "stage count for this host (its simulated devices share the cores).")
    np.testing.assert_allclose(np.asarray(run(tokens)), np.asarray(want), atol=1e-4)


if __name__ == "__main__":
    main()
