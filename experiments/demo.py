"""The README's main job: plan the seed models for 16 x H100, then race layer-wise against
TP=8 x PP=2 on 16 simulated CPU devices.

Steps (each prints as it starts):
1. the seed configurations: parameters and per-layer weight bytes (abstract models);
2. the honest verdict: what lwjax's planner decides for seed_dense / seed_moe on 16 x H100
   (projected) -- ``experiments/verdict.py``;
3. per-layer memory tables, the seed documents' claims beside lwjax's figures --
   ``memory_breakdown.md``;
4. a plan figure (per-device bytes vs the L2 line) for seed_dense at int4-75%, weights
   resident -- ``plan_seed_dense.png``;
5. dense and MoE, layer-wise vs TP=8 x PP=2, measured on this machine (CPU) and projected
   for 16 x H100 -- ``throughput-quick.md`` and ``throughput-quick.png`` (``--full``: the
   full sizes, ``throughput.md`` / ``.png``);
6. generation: layer-wise ring decode vs TP=8 x PP=2 (and one device), TPOT and tokens/s,
   measured and projected, beside the seeds' TPOT claims -- ``decode-quick.md`` /
   ``.png`` (``--full``: ``decode.md`` / ``.png``); the demo prints the summary and Table 1.

The files go to ``experiments/out/``, which git ignores, so the demo leaves the checkout as
it was. ``--write-results`` regenerates the committed copies in ``experiments/results/``
instead.

Run: ``python experiments/demo.py [--full] [--write-results]`` (wall time on a 2-core
host: README, "Two commands for a fresh clone").
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 16)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _common  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models  # noqa: E402
from lwjax.models import configs  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
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


def decode_summary(out: pathlib.Path, full: bool) -> str:
    """Runs ``experiments/decode.py`` (``--quick`` sizes unless ``full``), writes its report
    and figure to ``out`` and returns the short version: the goal's summary and Table 1."""
    sys.modules.setdefault("decode", _load("decode"))  # decode_report imports it by this name
    decode, report = sys.modules["decode"], _load("decode_report")
    measured, projected = decode.run(decode.FULL if full else decode.QUICK)
    suffix = "" if full else "-quick"
    command = "python experiments/decode.py" + ("" if full else " --quick")
    path = _common.write_results(f"decode{suffix}.md",
                                 report.markdown(measured, projected, command, quick=not full),
                                 out)
    report.figure(measured, projected, out / f"decode{suffix}.png")
    return "\n".join([*report.summary_lines(measured, projected), "",
                      report.headline_table(measured), "",
                      f"full report: {path.relative_to(HERE.parent)}"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="throughput at the full sizes")
    ap.add_argument("--write-results", action="store_true",
                    help="regenerate the committed copies in experiments/results/ (default: "
                         "write to experiments/out/, which git ignores)")
    a = ap.parse_args(argv)
    out = _common.output_dir(a.write_results)
    write = ["--write-results"] if a.write_results else []
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    def step(k: int, title: str) -> None:
        print(f"\n[{k}/6] {title}  (t = {time.perf_counter() - start:.0f} s)", flush=True)

    step(1, "Seed configurations (computed from abstract models, no weights allocated)")
    print(seed_table())

    step(2, "The honest verdict: seed_dense and seed_moe on 16 x H100 (projected)")
    print(_load("verdict").verdict())

    step(3, "Per-layer memory tables and the seed documents' claims")
    memory = _load("memory_breakdown")
    path = out / memory.RESULTS_NAME
    path.write_text(memory.report_markdown())
    print(memory.claims_table(memory.claim_rows()))
    print(f"full tables: {path.relative_to(HERE.parent)}")

    step(4, "Plan figure: seed_dense, int4-75%, weights resident (projected)")
    path = out / "plan_seed_dense.png"
    print(plan_figure(path))
    print(f"figure: {path.relative_to(HERE.parent)}")

    step(5, "Throughput: layer-wise vs TP=8 x PP=2 (measured on this CPU, projected for H100)")
    _load("throughput").main(([] if a.full else ["--quick"]) + write)

    step(6, "Decode: layer-wise ring vs TP=8 x PP=2 generating text (measured on this CPU, "
            "projected for H100)")
    print(decode_summary(out, a.full))

    print(f"\ndone in {time.perf_counter() - start:.0f} s; results in "
          f"{out.relative_to(HERE.parent)}/")


if __name__ == "__main__":
    main()
