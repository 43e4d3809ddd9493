"""The README's main job: plan the seed models for 16 x H100, then race layer-wise against
TP=8 x PP=2 on 16 simulated CPU devices.

Steps (each prints as it starts):
1. the seed configurations: parameters and per-layer weight bytes (abstract models);
2. the honest verdict: what lwjax's planner decides for seed_dense / seed_moe on 16 x H100
   (projected) -- ``experiments/verdict.py``;
3. per-layer memory tables, the seed documents' claims beside lwjax's figures --
   ``experiments/results/memory_breakdown.md``;
4. a plan figure (per-device bytes vs the L2 line) for seed_dense at int4-75%, weights
   resident -- ``experiments/results/plan_seed_dense.png``;
5. dense and MoE, layer-wise vs TP=8 x PP=2, measured on this machine (CPU) and projected
   for 16 x H100 -- ``experiments/results/throughput.md`` and ``throughput.png``.

Run: ``python experiments/demo.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 16)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models  # noqa: E402
from lwjax.models import configs  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
MIB = 2**20


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"lwjax_experiments_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _param_bytes(module) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def seed_table() -> str:
    """Parameters and weight bytes of every seed configuration (abstract, nothing allocated)."""
    rows = ["| config | layers | params | dtype | weights / layer (MiB) | all weights (GiB) |",
            "|---|---:|---:|---|---:|---:|"]
    for name in ("seed-dense", "seed-moe", "seed004-dense", "seed004-moe", "seed002-dense"):
        cfg = configs.by_name(name)
        model = models.abstract(cfg)
        rows.append(f"| {name} | {cfg.num_layers} | {cfg.param_count():,} | {cfg.dtype.name} | "
                    f"{_param_bytes(model.layers[0]) / MIB:,.1f} | "
                    f"{_param_bytes(model) / 2**30:,.2f} |")
    return "\n".join(rows)


def plan_figure(path: pathlib.Path) -> str:
    """seed_dense at int4-75%, weights resident, on as many H100s as it needs (projected)."""
    cfg = configs.seed_dense()
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    plan = lwjax.plan(models.abstract(cfg), tokens, num_devices=32, hardware="h100",
                      compression="int4-75%", residency="weights", microbatches=8)
    plan.figure(str(path))
    return plan.summary()


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    full = "--full" in argv
    start = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)

    def step(k: int, title: str) -> None:
        print(f"\n[{k}/5] {title}  (t = {time.perf_counter() - start:.0f} s)", flush=True)

    step(1, "Seed configurations (computed from abstract models, no weights allocated)")
    print(seed_table())

    step(2, "The honest verdict: seed_dense and seed_moe on 16 x H100 (projected)")
    print(_load("verdict").verdict())

    step(3, "Per-layer memory tables and the seed documents' claims")
    memory = _load("memory_breakdown")
    text = memory.report_markdown()
    memory.RESULTS.write_text(text)
    print(memory.claims_table(memory.claim_rows()))
    print(f"full tables: {memory.RESULTS.relative_to(HERE.parent)}")

    step(4, "Plan figure: seed_dense, int4-75%, weights resident (projected)")
    path = RESULTS / "plan_seed_dense.png"
    print(plan_figure(path))
    print(f"figure: {path.relative_to(HERE.parent)}")

    step(5, "Throughput: layer-wise vs TP=8 x PP=2 (measured on this CPU, projected for H100)")
    _load("throughput").main([] if full else ["--quick"])

    print(f"\ndone in {time.perf_counter() - start:.0f} s; results in "
          f"{RESULTS.relative_to(HERE.parent)}/")


if __name__ == "__main__":
    main()
