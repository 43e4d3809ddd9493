"""A layer-wise pipeline over several processes: one stage per device over every process's
devices, its outputs gathered to every process and checked against the model, its calls
(and optionally training steps) timed. Every figure is *measured* on the machine it runs on.

Run from the repository root::

    lwjax launch -n 2 --cpu-devices 8 -- python experiments/multiprocess.py   # 2 x 8 CPU
    python experiments/multiprocess.py                                        # 1 x 16 CPU

On GPU hosts (README, "Running on GPU hosts") the same script runs one process per host with
``LWJAX_COORDINATOR`` / ``LWJAX_NUM_PROCESSES`` / ``LWJAX_PROCESS_ID`` set, e.g. with
``--hidden 1024 --seq 512``. It prints and writes nothing.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from lwjax import distributed  # noqa: E402

RUN = distributed.initialize()  # first: before anything touches JAX (a no-op unlaunched)

import _common  # noqa: E402

if RUN is None:
    _common.use_cpu_devices(16)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models  # noqa: E402
from lwjax.models import configs  # noqa: E402


def _args(argv: Sequence[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64, help="hidden size (heads of 16)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls after the first")
    ap.add_argument("--train-steps", type=int, default=0, help="adamw steps to time (0: none)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the pipeline; returns process 0's record (every process returns its own)."""
    args = _args(argv)
    me, n = jax.process_index(), jax.process_count()
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=args.layers,
                              hidden_size=args.hidden, num_heads=args.hidden // 16,
                              head_dim=16, mlp_hidden_size=2 * args.hidden,
                              batch_size=args.batch, seq_len=args.seq)
    _common.step(f"process {me} of {n}: {len(jax.local_devices())} of {len(jax.devices())} "
                 f"devices ({jax.devices()[0].platform}); {_common.machine_line()}")
    model = models.build(cfg, rngs=nnx.Rngs(0))  # the same weights on every process
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0,
                                           cfg.vocab_size))
    start = time.perf_counter()
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices(), cache_bytes=2**40,
                               microbatches=args.microbatches, objective="bottleneck")
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    sm(tokens).block_until_ready()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = sm(tokens)
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    mine = sorted(int(sh.device.id) for sh in out.addressable_shards)
    whole = distributed.gather(out)
    diff = float(np.max(np.abs(whole - np.asarray(model(tokens)))))
    record = {"processes": n, "devices": len(jax.devices()), "stages": len(sm.plan.stages),
              "plan_s": plan_s, "first_call_s": first_s,
              "call_s": statistics.median(times) if times else None,
              "max_abs_diff": diff, "output_devices_here": mine}
    if args.train_steps:
        def loss_fn(logits, targets):
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        step = sm.train_step(loss_fn, optax.adamw(1e-3))
        state = step.init()
        losses, step_times = [], []
        for _ in range(args.train_steps):
            start = time.perf_counter()
            state, loss = step(state, tokens, tokens)
            losses.append(float(distributed.gather(loss)))
            step_times.append(time.perf_counter() - start)
        record.update(first_step_s=step_times[0], losses=losses,
                      step_s=statistics.median(step_times[1:]) if len(step_times) > 1 else None)
    _common.step(f"process {me}: holds the output pieces on devices {mine}")
    if me == 0:
        _common.step(f"measured: {n} process(es), {record['stages']} stages over "
                     f"{record['devices']} devices; plan {plan_s:.1f} s, first call "
                     f"(compile) {first_s:.1f} s, call {record['call_s'] or 0:.4f} s (median of "
                     f"{args.repeats}); gathered output vs model: max |diff| {diff:.2e}")
        if args.train_steps:
            _common.step(f"measured: train step {record['step_s'] or 0:.4f} s (median; first "
                         f"{record['first_step_s']:.1f} s); losses {losses}")
    return record


if __name__ == "__main__":
    main()
