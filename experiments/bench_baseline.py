"""Times the TP=8 x PP=2 baseline against one device (a script that prints figures, not a test).

Runs on 16 simulated CPU devices, so the figures say how this machine's cores execute the
SPMD program, not how 16 GPUs would: every number is labelled "measured on this machine
(CPU, simulated devices)". The microbatch count follows the seed documents (microbatches of
16 sequences out of 128, M = 8) where the batch allows.

Run from the repository root::

    python experiments/bench_baseline.py
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 16)  # before anything touches a device

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lwjax import baselines, models  # noqa: E402

TP, PP, MICROBATCHES = 8, 2, 8
REPEATS = 7
LABEL = "measured on this machine (CPU, simulated devices)"


def configs() -> dict[str, models.DenseConfig]:
    """tiny_dense/tiny_moe at the seeds' depth and batch; a wider 'small' pair. 8 heads and 8
    experts so that tp=8 divides them."""
    tiny = dict(num_layers=16, num_heads=8, head_dim=8, batch_size=128)
    small = dict(
        num_layers=8,
        hidden_size=256,
        num_heads=8,
        head_dim=32,
        mlp_hidden_size=1024,
        vocab_size=2048,
        batch_size=32,
        seq_len=64,
    )
    return {
        "tiny-dense": dataclasses.replace(models.configs.tiny_dense(), **tiny),
        "tiny-moe": dataclasses.replace(models.configs.tiny_moe(), **tiny, num_experts=8),
        "small-dense": dataclasses.replace(models.configs.tiny_dense(), **small),
        "small-moe": dataclasses.replace(models.configs.tiny_moe(), **small, num_experts=8),
    }


def time_calls(baseline: baselines.Baseline, tokens: jax.Array) -> tuple[float, list[float]]:
    """Seconds of the first call (compile included) and of REPEATS further calls."""
    start = time.perf_counter()
    baseline(tokens).block_until_ready()
    first = time.perf_counter() - start
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        baseline(tokens).block_until_ready()
        times.append(time.perf_counter() - start)
    return first, times


def main() -> None:
    print(f"TP={TP} x PP={PP} baseline vs single device; {LABEL}")
    processor = " ".join(filter(None, (platform.machine(), platform.processor())))
    print(
        f"machine: {processor}, {os.cpu_count()} cores, "
        f"{len(jax.devices())} simulated {jax.devices()[0].platform} devices; "
        f"jax {jax.__version__}; {datetime.date.today().isoformat()}; median of {REPEATS} runs"
    )
    header = (
        f"{'model':<12} {'deployment':<22} {'tokens':>7} {'compile+1st':>11} {'median':>9} "
        f"{'min':>9} {'max':>9} {'tokens/s':>10} {'vs 1 dev':>8} {'max|diff|':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, cfg in configs().items():
        model = models.build(cfg, rngs=nnx.Rngs(0))
        tokens = jax.random.randint(
            jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
        )
        num_tokens = cfg.batch_size * cfg.seq_len
        microbatches = MICROBATCHES if cfg.batch_size % MICROBATCHES == 0 else PP
        deployments = {
            "single_device": baselines.single_device(model, tokens),
            f"tp_pp {TP}x{PP}, M={microbatches}": baselines.tp_pp(
                model, tokens, tp=TP, pp=PP, microbatches=microbatches
            ),
        }
        reference = None
        single_rate = None
        for label, baseline in deployments.items():
            first, times = time_calls(baseline, tokens)
            logits = np.asarray(baseline(tokens))
            reference = logits if reference is None else reference
            median = statistics.median(times)
            rate = num_tokens / median
            single_rate = rate if single_rate is None else single_rate
            print(
                f"{name:<12} {label:<22} {num_tokens:>7} {first:>10.3f}s {median * 1e3:>7.2f}ms "
                f"{min(times) * 1e3:>7.2f}ms {max(times) * 1e3:>7.2f}ms {rate:>10.0f} "
                f"{rate / single_rate:>7.2f}x {np.abs(logits - reference).max():>9.1e}"
            )
    print(
        "\ntokens/s = batch x seq_len / median call time; 'vs 1 dev' = tokens/s over the "
        "single-device tokens/s; max|diff| = largest logit difference from single_device.\n"
        f"All figures {LABEL}: 16 simulated devices share "
        f"{os.cpu_count()} cores, so TP x PP pays for its collectives and GPipe bubble without "
        "gaining parallel hardware. They say nothing about 16 GPUs."
    )


if __name__ == "__main__":
    main()
