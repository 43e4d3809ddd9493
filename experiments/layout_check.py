"""Layout check: does the layout search rank layouts as this machine measures them?

The layout search (``passes/layout.py``) orders candidate layouts (stage count x tp x M) by
a *projected* step. Here the same candidates are *measured*: for each model and capacity,
``lwjax.layerwise_shard(..., tune=N)`` builds the search's N best layouts that lower, times
them in interleaved rounds (``lwjax/tune.py``) and records each median
(``ShardedModel.tuning``). The report gives, per configuration:

- every candidate's rank in the search and its measured median and rank;
- Spearman's rank correlation between the two orders (1: the search ranks as measured;
  0: no better than chance; negative: backwards);
- the default's cost: the search's first choice's median over the best measured median
  (1.00x: the default is the fastest of the candidates);
- a reference outside the ranking: one layer per device (16 stages, M = 8, as
  ``experiments/throughput.py`` runs it), timed interleaved with the layout tuning kept,
  so a layout the search ranked below its N best still shows.

Configurations: the dense and MoE models of ``experiments/throughput.py`` (16 layers, 8
heads, float32, hidden 256, batch 32 x 64; ``--quick``: hidden 64, batch 16 x 32) and a
third-party model of the same width, transformers' Flax GPT-2 with 16 blocks and random
weights (it needs the test extra's ``transformers``), at two capacities: the least that
holds one layer per device (the capacity throughput.py plans its default at) and
``GENEROUS`` times it, where more layouts fit.

Run from the repository root::

    python experiments/layout_check.py [--quick] [--candidates 8] [--write-results]

It writes ``layout_check.md`` (``--quick``: ``layout_check-quick.md``) to
``experiments/out/``, which git ignores; ``--write-results`` regenerates the committed copy
in ``experiments/results/`` instead.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(16)  # before anything touches a device; under pytest conftest did

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models, tune  # noqa: E402

SCRIPT = "experiments/layout_check.py"
GENEROUS = 4  # the second capacity: this many times the least that holds one layer/device
CANDIDATES = 8  # layouts measured per configuration (--quick: 4)
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Check:
    """One configuration's candidates, measured (``ShardedModel.tuning``, search order)."""

    model: str
    capacity_bytes: int
    measured: tuple[tune.Measured, ...]
    seconds: float  # the tune= call: every candidate planned, built, compiled and timed
    reference: str = ""  # the reference layout
    reference_over_kept: float = 0.0  # its median over the kept layout's, timed together

    def layouts(self) -> list[str]:
        return [f"{m.num_stages} x tp {m.tp}" + (f" x {m.virtual} laps" if m.virtual > 1
                                                 else "") + f", M={m.microbatches}"
                for m in self.measured]

    def measured_ranks(self) -> list[int]:
        order = np.argsort([m.median_s for m in self.measured], kind="stable")
        ranks = np.empty(len(order), int)
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks.tolist()

    def rho(self) -> float | None:
        """Spearman's rank correlation of the search's order and the measured one (None with
        fewer than 3 candidates)."""
        return spearman(list(range(1, len(self.measured) + 1)), self.measured_ranks())

    def kept(self) -> str:
        return next(layout for m, layout in zip(self.measured, self.layouts(), strict=True)
                    if m.kept)

    def projected_over_measured(self) -> list[float]:
        """Each candidate's projected step (``Plan.layout_step_s``) over its measured median:
        how far the search's absolute figures are off here (its ranking needs only their
        order)."""
        return [m.projected_s / m.median_s if m.projected_s is not None else math.nan
                for m in self.measured]

    def default_cost(self) -> float:
        """The search's first choice's median over the fastest candidate's (>= 1)."""
        return self.measured[0].median_s / min(m.median_s for m in self.measured)


def _span(ratios: Sequence[float]) -> str:
    """'min-maxx' of the known ratios, '--' with none."""
    known = [r for r in ratios if not math.isnan(r)]
    return f"{min(known):.2f}-{max(known):.2f}x" if known else "--"


def spearman(a: Sequence[int], b: Sequence[int]) -> float | None:
    """Spearman's rho of two rankings without ties, ``1 - 6 sum d^2 / (n (n^2 - 1))``.

    Example:
        >>> spearman([1, 2, 3], [3, 2, 1])
        -1.0
    """
    n = len(a)
    if n < 3:
        return None
    d2 = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


def gpt2(scale: throughput.Scale):
    """transformers' Flax GPT-2 at ``scale``: 16 blocks of width ``scale.hidden``, 8 heads,
    random weights (seed 0), and its (batch, seq) tokens; its name for the report."""
    import transformers  # noqa: PLC0415 (the test extra; only this model needs it)

    config = transformers.GPT2Config(n_layer=throughput.NUM_LAYERS, n_embd=scale.hidden,
                                     n_head=8, vocab_size=scale.vocab, n_positions=scale.seq)
    model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (scale.batch, scale.seq), 0,
                                           scale.vocab), np.int32)
    return model, tokens, "transformers FlaxGPT2LMHeadModel (16 blocks)"


def check(kind: str, scale: throughput.Scale, candidates: int) -> list[Check]:
    """Both capacities of one model ("dense", "moe": ``throughput.cpu_config``; "gpt2":
    ``gpt2``): the search's ``candidates`` best layouts, measured."""
    devices = jax.devices()[:throughput.NUM_DEVICES]
    if kind == "gpt2":
        model, tokens, name = gpt2(scale)
    else:
        cfg = throughput.cpu_config(kind, scale)
        model = models.build(cfg, rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0,
                                    cfg.vocab_size)
        name = throughput.model_name(kind, cfg)
    one_layer, _ = _common.layerwise_deploy(model, tokens, devices, throughput.MICROBATCHES,
                                            objective="bottleneck")
    least = one_layer.plan.capacity_bytes
    p = one_layer.plan
    reference = f"{len(p.stages)} x tp {p.tp}, M={p.microbatches}"
    checks = []
    for capacity in (least, GENEROUS * least):
        _common.step(f"{name}: the layout search's {candidates} best layouts at "
                     f"{capacity / MIB:.2f} MiB, measured")
        start = time.perf_counter()
        sm = lwjax.layerwise_shard(model, tokens, devices=devices, cache_bytes=capacity,
                                   tune=candidates)
        seconds = time.perf_counter() - start
        _, (kept_s, reference_s) = tune.fastest([sm, one_layer], lambda m: m(tokens))
        checks.append(Check(name, capacity, sm.tuning, seconds, reference,
                            reference_s / kept_s))
    return checks


def report(checks: Sequence[Check], scale: throughput.Scale, candidates: int,
           command: str) -> str:
    """The results file: one table per configuration, then a summary."""
    lines = [_common.header("Layout check: the layout search's ranking against measurement",
                            SCRIPT, command),
             f"Models: 16 layers (GPT-2: blocks), 8 heads, float32, hidden {scale.hidden}, batch "
             f"{scale.batch} x {scale.seq}; 16 simulated devices on this host's cores. For "
             f"each configuration `lwjax.layerwise_shard(..., tune={candidates})` built the "
             "layout search's best layouts that lower and timed each "
             f"({tune.ROUNDS} interleaved calls after a compiling one; medians, *measured*). "
             "The search's rank is its *projected* order (projected ms: the step it ranked "
             "by). rho: Spearman's rank correlation "
             "of the two orders. Default cost: the search's first choice's median over the "
             "fastest candidate's.", ""]
    for c in checks:
        lines += [f"## {c.model}, capacity {c.capacity_bytes / MIB:.2f} MiB/device", ""]
        rows = [(m.rank, layout, "--" if m.projected_s is None else f"{m.projected_s * 1e3:.1f}",
                 f"{m.median_s * 1e3:.1f}", "--" if math.isnan(ratio) else f"{ratio:.2f}x", r,
                 "kept" if m.kept else "")
                for m, layout, r, ratio in zip(c.measured, c.layouts(), c.measured_ranks(),
                                               c.projected_over_measured(), strict=True)]
        lines += [_common.markdown_table(
            ["search rank (projected)", "layout", "projected ms", "measured ms (median)",
             "projected / measured", "measured rank", "tune kept"], rows, "rlrrrrl"), ""]
    lines += ["## Summary", "", _common.markdown_table(
        ["model", "capacity MiB", "candidates", "rho", "projected / measured",
         "default cost", "fastest measured", "reference / kept", "tune= call s"],
        [(c.model, f"{c.capacity_bytes / MIB:.2f}", len(c.measured),
          "--" if c.rho() is None else f"{c.rho():+.2f}",
          _span(c.projected_over_measured()),
          f"{c.default_cost():.2f}x",
          c.layouts()[c.measured_ranks().index(1)],
          f"{c.reference}: {c.reference_over_kept:.2f}x" + (
              " (the kept layout: noise)" if c.reference == c.kept() else ""),
          f"{c.seconds:.0f}")
         for c in checks],
        "lrrrrrllr"), "",
        "Projected / measured: the search's projected step of each candidate "
        "(`Plan.layout_step_s`, *projected*) over its measured median, the range over the "
        "candidates. The CPU corrections were measured on calibration hosts "
        "(`passes/cost_calibration.py`) and the peak FLOP/s is measured in each process "
        "(`hardware.host_cpu()`), so the absolute figures shift with the host and its load "
        "while the ranking, which is what the search uses, can hold (rho).",
        "Reference / kept: the one-layer-per-device program's median over the kept layout's, "
        f"timed together ({tune.ROUNDS} interleaved calls each); below 1.00x, a layout outside "
        "the search's best beat every candidate. Where the reference is the kept layout, the "
        "two are one program timed twice and the ratio is this run's noise.",
        "A default cost above 1.00x is time the search's first choice leaves on the table "
        "here; `tune=k` measures the k best and keeps the fastest (within tune's "
        f"{tune.MARGIN:.0%} margin of the first choice)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="hidden 64, batch 16 x 32, 4 candidates")
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--models", default="dense,moe,gpt2",
                    help="comma-separated: dense, moe, gpt2 (transformers' Flax GPT-2)")
    _common.add_output_flags(ap)
    args = ap.parse_args(argv)
    _common.step(f"machine: {_common.machine_line()}")
    scale = throughput.QUICK if args.quick else throughput.FULL
    candidates = args.candidates or (4 if args.quick else CANDIDATES)
    checks = [c for kind in args.models.split(",") for c in check(kind, scale, candidates)]
    text = report(checks, scale, candidates, _common.command_line(SCRIPT, argv))
    return _common.publish("layout_check-quick.md" if args.quick else "layout_check.md",
                           text, args)


if __name__ == "__main__":
    main()
