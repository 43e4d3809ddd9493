"""Replicated-work check: what a split stage's devices each run whole, measured on this host.

A stage split over tp devices (``passes/tp.py``) divides its matmuls, but every device runs
the equations that touch no split axis whole (``passes.tp.replicated_eqns``: norms, residual
adds, an MoE router's softmax, top-k and the scatters that route tokens). On a CPU host the
simulated devices share the cores, so tp copies of that work run one after another. This
script measures it: the dense and MoE models of ``experiments/throughput.py`` (hidden 64,
batch 16 x 32) in one stage split over tp = 4 and 8 at M = 1 and 2 (interleaved medians).
From tp 4 to tp 8, 4 more copies of the replicated equations run at the same microbatch
size, so 4 x their unfused bytes (at the full batch, over the 16 layers, the embedding and
the head: ``passes.planner.eqns_cost``) over the difference in time is the rate at which the
host runs them. The layout search charges a split layer's replicated bytes at one rate
(``passes/cost_calibration.py``, which says which runs it came from); the figures here are
*measured* on this machine.

Run from the repository root::

    python experiments/replicated_check.py [--repeats 9] [--write-results]

It writes ``replicated_check.md`` to ``experiments/out/`` (git-ignored);
``--write-results`` regenerates the committed copy in ``experiments/results/``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(16)  # before anything touches a device; under pytest conftest did

import statistics  # noqa: E402
from collections.abc import Sequence  # noqa: E402

TPS = (4, 8)
MICROBATCHES = (1, 2)


def replicated_totals(model, tokens, tp: int) -> tuple[float, int]:
    """(unfused bytes, equation count) of what one device of a stage split over ``tp`` runs
    whole, over every segment, at the full batch."""
    from lwjax.passes.planner import eqns_cost
    from lwjax.passes.segment import segment
    from lwjax.passes.tp import replicated_eqns
    from lwjax.passes.trace import trace

    graph = segment(trace(model, tokens, microbatch_size=tokens.shape[0]))
    nbytes, count = 0.0, 0
    for seg in (graph.prologue, *graph.layers, graph.epilogue):
        eqns = replicated_eqns(graph, seg, tp)
        if eqns:
            nbytes += eqns_cost(graph, eqns).unfused_hbm_bytes
            count += len(eqns)
    return nbytes, count


def measure(kind: str, repeats: int) -> dict:
    import jax
    import throughput
    from flax import nnx

    from lwjax import models

    cfg = throughput.cpu_config(kind, throughput.QUICK)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0,
                                cfg.vocab_size)
    fns = {}
    for m in MICROBATCHES:
        for tp in TPS:
            _common.step(f"{kind}: building 1 stage x tp {tp}, M={m}")
            fns[tp, m] = _common.lowered(model, tokens, [(0, cfg.num_layers)],
                                         jax.devices()[:tp], m, tp=tp)
    timings = _common.measure_interleaved(
        {f"{tp},{m}": f for (tp, m), f in fns.items()}, repeats=repeats)
    medians = {(tp, m): timings[f"{tp},{m}"].median for tp, m in fns}
    nbytes, count = replicated_totals(model, tokens, TPS[0])
    extra = TPS[1] - TPS[0]
    rates = {m: extra * nbytes / (medians[TPS[1], m] - medians[TPS[0], m])
             if medians[TPS[1], m] > medians[TPS[0], m] else float("inf")
             for m in MICROBATCHES}
    return {"kind": kind, "medians": medians, "timings": timings, "bytes": nbytes,
            "count": count, "rates": rates}


def report(results: Sequence[dict], command: str) -> str:
    from lwjax.passes import cost_calibration as cal

    text = _common.header("Replicated work of split stages (measured)",
                          "experiments/replicated_check.py", command)
    rows = []
    for r in results:
        for (tp, m), median in r["medians"].items():
            t = r["timings"][f"{tp},{m}"]
            rows.append([r["kind"], tp, m, f"{median * 1e3:.1f}",
                         f"{t.min * 1e3:.1f}-{t.max * 1e3:.1f}"])
    text += "\n" + _common.markdown_table(["model", "tp", "M", "median ms", "min-max ms"],
                                          rows, "llrrr") + "\n\n"
    fit = [[r["kind"], r["count"], f"{r['bytes'] / 1e6:.1f}", m,
            f"{(r['medians'][TPS[1], m] - r['medians'][TPS[0], m]) * 1e3:.1f}",
            f"{r['rates'][m] / 1e9:.1f}"] for r in results for m in MICROBATCHES]
    text += _common.markdown_table(
        ["model", "replicated equations (tp 4)", "their unfused MB (batch)", "M",
         f"tp {TPS[1]} - tp {TPS[0]} ms", "GB/s"], fit, "lrrrrr") + "\n\n"
    rates = sorted(rate for r in results for rate in r["rates"].values())
    text += (f"Median rate of this run: {statistics.median(rates) / 1e9:.1f} GB/s. In force "
             f"(`passes/cost_calibration.py`): "
             f"{cal.CPU_REPLICATED_BYTES_PER_S / 1e9:.1f} GB/s.\n")
    return text


def main(argv: Sequence[str] | None = None) -> str:
    args = _common.parse_repeats_args(__doc__, argv)
    results = [measure(kind, args.repeats) for kind in ("moe", "dense")]
    text = report(results, _common.command_line("experiments/replicated_check.py", argv))
    return _common.publish("replicated_check.md", text, args)


if __name__ == "__main__":
    main()
