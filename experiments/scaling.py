"""Scaling: 8 to 64 layers (seed 000) and the 2-layer m x n = 16 split (seed 002).

Part A, layers: one layer per device (8, 16, 32, 64 devices, as seed 000's "linear scaling"
describes) against TP=8 x PP=layers/8, both GPipe with M=8. *Measured* on this machine (CPU,
simulated devices sharing its cores, small hidden size) and *projected* for H100 SXM5 at
seed_dense dimensions with ``lwjax.passes.cost``.

Part B, seed 002: the 2-layer dense model with every layer split over 16 devices (m x n = 16,
one stage, ``lwjax.passes.lower.lower(..., tp=16)``) against TP=8 x PP=2; lwjax's lowering of
the baseline's own layout (2 stages x tp=8) is shown too. Measured at CPU scale and projected
at seed002_dense dimensions.

Run from the repository root (asks for 64 simulated devices; wall time on a 2-core host:
README, "Experiment scripts")::

    python experiments/scaling.py [--quick] [--write-results]

It writes ``scaling.md`` and ``scaling.png`` (``--quick``: the same names with a ``-quick``
suffix) to ``experiments/out/``, which git ignores; ``--write-results`` regenerates the
committed copies in ``experiments/results/`` instead.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

MAX_DEVICES = 64
if __name__ == "__main__":  # imported (e.g. by pytest) it keeps the importer's device count
    _common.use_cpu_devices(MAX_DEVICES)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import baselines, hardware, models  # noqa: E402
from lwjax.errors import InfeasiblePlanError  # noqa: E402
from lwjax.models.configs import DenseConfig  # noqa: E402
from lwjax.passes import cost  # noqa: E402

SCRIPT = "experiments/scaling.py"
LAYERS = (8, 16, 32, 64)
TP, MICROBATCHES = 8, 8
ATOL = 1e-4
HW = hardware.H100_SXM
PROJECTED_LABEL = f"projected (cost model, {HW.name})"
# Seed 000, "Extended results" and "Scaling to larger models": the proposed method on one GPU
# per layer; its 16-layer figure is seed 000/004's table. Claims, never results.
CLAIMED_LAYERWISE = {8: 7_680, 16: 15_360, 32: 30_720, 64: 61_440}
CLAIMED_BASELINE = {16: 12_800}
# Seed 002's table: (TPS, "TPOT" -- which seed 002 defines as synchronisation and
# communication overhead per token, not 1000 / TPS).
CLAIMED_002 = {"baseline": (1_200_000, 0.35), "mxn": (1_580_000, 0.22)}


@dataclasses.dataclass(frozen=True)
class Scale:
    hidden: int
    batch: int
    seq: int
    vocab: int
    repeats: int
    layers: tuple[int, ...]


FULL = Scale(hidden=64, batch=16, seq=32, vocab=256, repeats=5, layers=LAYERS)
QUICK = Scale(hidden=32, batch=16, seq=16, vocab=128, repeats=5, layers=(8, 16))


def cpu_config(num_layers: int, scale: Scale, num_heads: int = 8) -> DenseConfig:
    return DenseConfig(num_layers=num_layers, hidden_size=scale.hidden, num_heads=num_heads,
                       head_dim=scale.hidden // num_heads, mlp_hidden_size=4 * scale.hidden,
                       vocab_size=scale.vocab, batch_size=scale.batch, seq_len=scale.seq,
                       dtype=jnp.dtype(jnp.float32))


def _tokens(cfg: DenseConfig) -> jax.Array:
    return jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0,
                              cfg.vocab_size, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Run:
    """One measured comparison: interleaved timings and max |diff| vs ``model(tokens)``."""

    cfg: DenseConfig
    timings: dict[str, _common.Timing]
    max_diff: dict[str, float]
    notes: dict[str, str]

    @property
    def tokens(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def tps(self, name: str) -> float:
        return self.tokens / self.timings[name].median

    def ratio(self, a: str, b: str) -> tuple[float, float, float]:
        """TPS of ``a`` / TPS of ``b``: median, min, max over the interleaved rounds."""
        r = np.array(self.timings[b].times_s) / np.array(self.timings[a].times_s)
        return float(np.median(r)), float(r.min()), float(r.max())


def run_and_check(cfg: DenseConfig, model, tokens, fns: dict, repeats: int,
                  notes: dict[str, str]) -> Run:
    """Calls each deployment once, checks it against ``model(tokens)``, times them interleaved."""
    want = np.asarray(model(tokens))
    diff = {}
    for name, fn in fns.items():
        diff[name] = float(np.max(np.abs(np.asarray(fn()) - want)))
        if not diff[name] <= ATOL:
            raise AssertionError(f"{name}: output differs from model(tokens) by "
                                 f"{diff[name]:.2e} > {ATOL:.0e}.")
    return Run(cfg, _common.measure_interleaved(fns, repeats=repeats), diff, notes)


# ---- part A: layers ---------------------------------------------------------------------------


def measure_layers(num_layers: int, scale: Scale) -> Run:
    """On ``num_layers`` devices: TP=8 x PP=layers/8; layer-wise with one layer per device (as
    seed 000 describes; ``lower`` with those ranges); layer-wise as ``layerwise_shard`` plans
    it against the host's L2 (it may pack several small layers into a stage)."""
    cfg = cpu_config(num_layers, scale)
    devices = jax.devices()[:num_layers]
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg)
    base = baselines.tp_pp(model, tokens, devices=devices, tp=TP, pp=num_layers // TP,
                           microbatches=MICROBATCHES)
    one_per_device = [(i, i + 1) for i in range(num_layers)]
    sm, note = _common.layerwise_deploy(model, tokens, devices, MICROBATCHES)
    single = baselines.single_device(model, tokens, device=devices[0])
    fns = {"baseline": functools.partial(base, tokens),
           "layerwise": _common.lowered(model, tokens, one_per_device, devices, MICROBATCHES, 1),
           "planned": functools.partial(sm, tokens),
           "single": functools.partial(single, tokens)}
    ranges = [s.layer_range for s in sm.plan.stages]
    if [tuple(r) for r in ranges] == one_per_device:
        del fns["planned"]  # the same program: time it once
    run = run_and_check(cfg, model, tokens, fns, scale.repeats,
                        {"plan": f"`layerwise_shard` plans {len(ranges)} stages "
                                 f"({', '.join(f'{a}-{b - 1}' for a, b in ranges)}); {note}"})
    if "planned" not in run.timings:
        run.timings["planned"] = run.timings["layerwise"]
    return run


def measured_layer_rows(runs: Sequence[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        n = r.cfg.num_layers
        ratio, lo, hi = r.ratio("layerwise", "baseline")
        planned = r.ratio("planned", "baseline")[0]
        rows.append([str(n), str(n), f"TP={TP} x PP={n // TP}", _common.tps(r.tps("baseline")),
                     _common.tps(r.tps("layerwise")), f"{ratio:.2f} ({lo:.2f}-{hi:.2f})",
                     f"{_common.tps(r.tps('planned'))} ({planned:.2f}x)",
                     _common.tps(r.tps("single")),
                     f"{max(r.max_diff.values()):.1e}", _common.MEASURED])
    return rows


@dataclasses.dataclass(frozen=True)
class LayerProjection:
    num_layers: int
    baseline: cost.Projection
    layerwise: cost.Projection
    layerwise_m_batch: cost.Projection


def project_layers(layers: Sequence[int] = LAYERS, hw: hardware.HardwareSpec = HW,
                   microbatches: int = MICROBATCHES) -> list[LayerProjection]:
    """seed_dense with ``num_layers`` changed: TP=8 x PP=L/8 and one layer per device at M,
    and layer-wise at M = batch (microbatches of one sequence)."""
    out = []
    for n in layers:
        cfg = dataclasses.replace(models.configs.seed_dense(), num_layers=n)
        out.append(LayerProjection(
            n, cost.project_tp_pp(cfg, hw, TP, n // TP, microbatches),
            cost.project_layerwise(cfg, hw, [1] * n, microbatches),
            cost.project_layerwise(cfg, hw, [1] * n, cfg.batch_size)))
    return out


def projected_layer_table(projections: Sequence[LayerProjection]) -> str:
    rows = []
    for p in projections:
        claim_lw = CLAIMED_LAYERWISE.get(p.num_layers)
        claim_base = CLAIMED_BASELINE.get(p.num_layers)
        rows.append([
            str(p.num_layers), str(p.num_layers), _common.tps(p.baseline.tps),
            _common.tps(p.layerwise.tps), f"{p.layerwise.tps / p.baseline.tps:.2f}",
            _common.tps(p.layerwise_m_batch.tps), _common.PROJECTED,
            _common.tps(claim_base) if claim_base else "--",
            _common.tps(claim_lw) if claim_lw else "--",
            _common.verdict(p.layerwise.tps, claim_lw) if claim_lw else "--",
        ])
    return _common.markdown_table(
        ["layers", "GPUs", f"baseline TP=8 x PP=L/8 TPS (M={MICROBATCHES})",
         f"layer-wise TPS (M={MICROBATCHES})", "layer-wise / baseline",
         "layer-wise TPS (M=128)", "figure", "claimed baseline TPS (seed 000/004)",
         "claimed layer-wise TPS (seed 000)", "agreement (layer-wise, M=8)"],
        rows, "rrrrrrlrrl")


# ---- part B: seed 002 ------------------------------------------------------------------------


def seed002_cpu_config(scale: Scale) -> DenseConfig:
    """2 layers, 16 heads (tp=16 divides heads, MLP width and vocabulary)."""
    return dataclasses.replace(cpu_config(2, scale, num_heads=16),
                               hidden_size=2 * scale.hidden, head_dim=2 * scale.hidden // 16,
                               mlp_hidden_size=8 * scale.hidden)


def measure_seed002(scale: Scale) -> Run:
    """TP=8 x PP=2 (M=8) vs m x n = 16 (one stage, both layers over 16 devices, M=1) vs
    lwjax's 2 stages x tp=8 (M=8), on 16 devices."""
    cfg = seed002_cpu_config(scale)
    devices = jax.devices()[:16]
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg)
    fns = {
        "baseline": functools.partial(
            baselines.tp_pp(model, tokens, devices=devices, tp=8, pp=2,
                            microbatches=MICROBATCHES), tokens),
        "mxn": _common.lowered(model, tokens, ((0, 2),), devices, 1, 16),
        "lw_2x8": _common.lowered(model, tokens, ((0, 1), (1, 2)), devices, MICROBATCHES, 8),
        "single": functools.partial(baselines.single_device(model, tokens, device=devices[0]),
                                    tokens),
    }
    return run_and_check(cfg, model, tokens, fns, scale.repeats, {})


SEED002_METHODS = {
    "baseline": ("Baseline (TP=8, PP=2), M=8", 16),
    "mxn": ("lwjax m x n = 16 (1 stage, tp=16), M=1", 16),
    "lw_2x8": ("lwjax 2 stages x tp=8, M=8", 16),
    "single": ("Single device (reference)", 1),
}


def measured_seed002_rows(r: Run) -> list[list[str]]:
    rows = []
    for name, (label, devices) in SEED002_METHODS.items():
        ratio = r.ratio(name, "baseline")[0]
        rows.append([label, str(devices), _common.tps(r.tps(name)),
                     _common.ms(1e3 / r.tps(name)), r.timings[name].ms(), f"{ratio:.2f}",
                     f"{r.max_diff[name]:.1e}", _common.MEASURED])
    return rows


@dataclasses.dataclass(frozen=True)
class Seed002Projection:
    method: str
    tp: int
    pp: int
    microbatches: int
    projection: cost.Projection
    comm_ms_per_token: float


def comm_per_token_ms(cfg: DenseConfig, hw: hardware.HardwareSpec, tp: int, pp: int,
                      microbatches: int) -> float:
    """Seed 002's "TPOT": synchronisation + communication seconds of one step per token, in
    ms: per tick, two ring all-reduces per layer of the stage plus one stage-to-stage send."""
    mb = cfg.batch_size // microbatches
    act = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
    per_tick = cfg.num_layers // pp * 2 * cost.allreduce_time(act, tp, hw)
    per_tick += cost.transfer_time(act, hw) if pp > 1 else 0.0
    return (microbatches + pp - 1) * per_tick / (cfg.batch_size * cfg.seq_len) * 1e3


def project_seed002(hw: hardware.HardwareSpec = HW) -> list[Seed002Projection]:
    cfg = models.configs.seed002_dense()
    out = []
    for method, tp, pp, m in (("baseline", 8, 2, MICROBATCHES), ("mxn", 16, 1, 1),
                              ("mxn", 16, 1, MICROBATCHES)):
        out.append(Seed002Projection(method, tp, pp, m, cost.project_tp_pp(cfg, hw, tp, pp, m),
                                     comm_per_token_ms(cfg, hw, tp, pp, m)))
    return out


def projected_seed002_table(rows: Sequence[Seed002Projection]) -> str:
    body = []
    for r in rows:
        c_tps, c_tpot = CLAIMED_002[r.method]
        name = "Baseline (TP=8, PP=2)" if r.method == "baseline" else "m x n = 16 (tp=16, 1 stage)"
        body.append([f"{name}, M={r.microbatches}", "16", _common.tps(r.projection.tps),
                     _common.ms(r.projection.tpot_ms), f"{r.comm_ms_per_token:.3g}",
                     _common.PROJECTED, _common.tps(c_tps), _common.ms(c_tpot),
                     f"TPS {_common.verdict(r.projection.tps, c_tps)}; sync/comm "
                     f"{_common.verdict(r.comm_ms_per_token, c_tpot)}"])
    return _common.markdown_table(
        ["Method", "GPUs", "TPS", "TPOT = 1000/TPS (ms)", "sync+comm ms per token",
         "figure", "claimed TPS (seed 002)", "claimed TPOT ms (seed 002)", "agreement"],
        body, "lrrrrlrrl")


def planner_verdict_002(hw: hardware.HardwareSpec = HW) -> str:
    cfg = models.configs.seed002_dense()
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    try:
        p = lwjax.plan(models.abstract(cfg), tokens, num_devices=16, hardware=hw,
                       microbatches=MICROBATCHES)
    except InfeasiblePlanError as e:
        return (f"`lwjax.plan(seed002_dense, 16 x {hw.name})` (split, compress and smaller "
                f"microbatches allowed) finds no plan: {_common.explain_infeasible(e)}.")
    return (f"`lwjax.plan(seed002_dense, 16 x {hw.name})`: {p.strategy}, {len(p.stages)} "
            f"stages x tp={p.tp}, compression {p.compression}, M={p.microbatches}.")


# ---- report ----------------------------------------------------------------------------------


def report(layer_runs: Sequence[Run], seed002_run: Run | None, command: str, skipped: str) -> str:
    label = _common.cpu_label()
    parts = [_common.header("Scaling: 8-64 layers, and seed 002's m x n = 16", SCRIPT, command)]
    parts += ["## Part A: layers (one layer per device vs TP=8 x PP=layers/8)"]
    if layer_runs:
        cfg = layer_runs[0].cfg
        parts += [
            f"### Measured: {label}",
            f"hidden {cfg.hidden_size}, {cfg.num_heads} heads, MLP {cfg.mlp_hidden_size}, vocab "
            f"{cfg.vocab_size}, batch {cfg.batch_size} x seq {cfg.seq_len}, float32, M = "
            f"{MICROBATCHES}; layer-wise on as many devices as layers. Median TPS of "
            f"{len(layer_runs[0].timings['baseline'].times_s)} interleaved runs; the "
            "ratio is the median of per-round ratios (min-max). All devices share the same "
            "cores, so more layers means more work on the same hardware: TPS falls with depth "
            "for every method here." + (f" {skipped}" if skipped else "") + "\n\n"
            + _common.markdown_table(
                ["layers", "devices", "baseline layout", "baseline TPS",
                 "layer-wise TPS, 1 layer/device", "layer-wise / baseline",
                 "layer-wise TPS as lwjax plans it (vs baseline)", "single-device TPS",
                 "max abs diff", "figure"],
                measured_layer_rows(layer_runs), "rrlrrrrrrl"),
            "\n".join(f"- {r.cfg.num_layers} layers: {r.notes['plan']}" for r in layer_runs),
        ]
    parts += [
        f"### {PROJECTED_LABEL}, seed_dense dimensions with L layers",
        "Batch 128, seq 10,000, FP16; GPUs = layers. With a fixed batch of 8 microbatches a "
        "deeper layer-wise pipeline has more fill/drain ticks ((M + L - 1) ticks for M "
        "microbatches' work), so projected TPS falls with depth instead of growing "
        "linearly as seed 000 claims; M = 128 (microbatches of one sequence) is shown for "
        "contrast.\n\n" + projected_layer_table(project_layers()),
        "## Part B: seed 002, 2-layer dense, m x n = 16",
        "lwjax splits a layer by its rule in `passes/tp.py`: q/k/v/out over heads, the MLP "
        "over its width (Megatron's column/row pattern; XLA inserts the all-reduces). With "
        "16 devices and 32 heads that is seed 002's m = 16 across heads, n = 1 across hidden.",
    ]
    if seed002_run is not None:
        cfg = seed002_run.cfg
        parts += [
            f"### Measured: {label}",
            f"2 layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x {cfg.head_dim}, MLP "
            f"{cfg.mlp_hidden_size}, vocab {cfg.vocab_size}, batch {cfg.batch_size} x seq "
            f"{cfg.seq_len}, float32. TPOT = 1000 / TPS. Ratio = TPS / baseline TPS (median of "
            "per-round ratios).\n\n" + _common.markdown_table(
                ["Method", "devices", "TPS", "TPOT (ms)", "forward ms, median (min-max)",
                 "vs baseline", "max abs diff", "figure"],
                measured_seed002_rows(seed002_run), "lrrrrrrl"),
        ]
    parts += [
        f"### {PROJECTED_LABEL}, seed002_dense (batch 128, seq 10,000, FP16)",
        "Seed 002 defines TPOT as synchronisation + communication time per token; lwjax shows "
        "both 1000 / TPS and that overhead (ring all-reduces and sends from the roofline's "
        "link model) and checks each claim against the matching one.\n\n"
        + projected_seed002_table(project_seed002()),
        planner_verdict_002(),
    ]
    return "\n\n".join(parts) + "\n"


def figure(layer_runs: Sequence[Run], seed002_run: Run | None,
           path: pathlib.Path) -> pathlib.Path:
    panels = []
    if layer_runs:
        groups = tuple(f"{r.cfg.num_layers} layers" for r in layer_runs)
        series = {"Baseline TP=8 x PP=L/8": tuple(r.tps("baseline") for r in layer_runs),
                  "Layer-wise, 1 layer/device": tuple(r.tps("layerwise") for r in layer_runs),
                  "Layer-wise, lwjax plan": tuple(r.tps("planned") for r in layer_runs),
                  "Single device": tuple(r.tps("single") for r in layer_runs)}
        panels.append(_common.Panel(_common.cpu_label(), groups, series, "tokens/s (measured)"))
    proj = project_layers()
    panels.append(_common.Panel(
        f"{PROJECTED_LABEL}, seed_dense x L layers", tuple(f"{p.num_layers}" for p in proj),
        {"Baseline (projected)": tuple(p.baseline.tps for p in proj),
         "Layer-wise M=8 (projected)": tuple(p.layerwise.tps for p in proj),
         "Layer-wise M=128 (projected)": tuple(p.layerwise_m_batch.tps for p in proj),
         "Layer-wise: claimed (seed 000)": tuple(CLAIMED_LAYERWISE[p.num_layers] for p in proj)},
        "tokens/s (log)", log=True))
    p002 = project_seed002()[:2]
    panels.append(_common.Panel(
        "seed 002, 2 layers: projected vs claimed", ("Baseline TP=8 x PP=2", "m x n = 16"),
        {"projected": tuple(p.projection.tps for p in p002),
         "claimed (seed 002)": (CLAIMED_002["baseline"][0], CLAIMED_002["mxn"][0])},
        "tokens/s (log)", log=True))
    return _common.bar_panels(path, panels, "Scaling with depth, and seed 002's m x n split")


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 and 16 layers, small sizes")
    _common.add_output_flags(ap)
    a = ap.parse_args(argv)
    scale = QUICK if a.quick else FULL
    available = len(jax.devices())
    _common.step(f"machine: {_common.machine_line()}")
    runs, skipped = [], [n for n in scale.layers if n > available]
    for n in scale.layers:
        if n > available:
            continue
        _common.step(f"{n} layers on {n} devices: building, compiling, timing")
        runs.append(measure_layers(n, scale))
        r = runs[-1]
        _common.step(f"  baseline {r.timings['baseline'].ms()} ms, layer-wise "
                     f"{r.timings['layerwise'].ms()} ms; {r.notes['plan'].split(';')[0]}")
    note = (f"Not measured: {', '.join(map(str, skipped))} layers (only {available} devices in "
            "this process; run the script directly for 64)." if skipped else "")
    _common.step("seed 002: 2 layers, m x n = 16 vs TP=8 x PP=2")
    s002 = measure_seed002(scale)
    _common.step("projecting for H100 and asking the planner")
    text = report(runs, s002, _common.command_line(SCRIPT, argv), note)
    print(text)
    suffix = "-quick" if a.quick else ""  # --quick never overwrites the full results
    if not a.no_write:
        out = _common.output_dir(a.write_results)
        path = _common.write_results(f"scaling{suffix}.md", text, out)
        png = figure(runs, s002, out / f"scaling{suffix}.png")
        _common.step(f"written {path} and {png}")
    return text


if __name__ == "__main__":
    main()
