"""Throughput: layer-wise pipeline vs the TP=8 x PP=2 baseline, measured here and projected.

Table 1 (*measured* on this machine: CPU, 16 simulated devices sharing its cores): a dense and
a MoE transformer (16 layers, 8 heads, 8 experts) run as ``lwjax.baselines.tp_pp`` (TP=8 x
PP=2, GPipe with M=8 microbatches, as the seed documents) and as ``lwjax.layerwise_shard``
(one layer per device, the same M; and, where the host's L2 admits a plan, as the planner's
default objective lays it out), timed interleaved after all are compiled, outputs checked
against ``model(tokens)``. Table 1b repeats this at a size whose layers fit the host's L2. A
breakdown says where the time goes.

Table 2 (*projected* by ``lwjax.passes.cost`` for 16 x H100 SXM5 at the seed dimensions):
``project_tp_pp`` and ``project_layerwise`` with the cache hit rate and memory efficiency
their roofline implies, beside the seed documents' claimed figures.

Run from the repository root (``--quick``: small sizes; wall times on a 2-core host:
README, "Experiment scripts")::

    python experiments/throughput.py [--quick] [--repeats 7] [--write-results]

It writes ``throughput.md`` and ``throughput.png`` (``--quick``: the same names with a
``-quick`` suffix) to ``experiments/out/``, which git ignores; ``--write-results`` regenerates
the committed copies in ``experiments/results/`` instead.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(16)  # before anything touches a device; under pytest conftest did

import dataclasses  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import baselines, hardware, models  # noqa: E402
from lwjax.errors import InfeasiblePlanError  # noqa: E402
from lwjax.models.configs import DenseConfig, MoEConfig  # noqa: E402
from lwjax.passes import cost  # noqa: E402

SCRIPT = "experiments/throughput.py"
TP, PP, MICROBATCHES, NUM_DEVICES = 8, 2, 8, 16
NUM_LAYERS = 16
ATOL = 1e-4
GOAL = 1.3  # the target: layer-wise tokens/s >= 1.3 x the baseline's
MIB = 2**20
PROJECTED_ON = hardware.H100_SXM
PROJECTED_LABEL = f"projected (cost model, {NUM_DEVICES} x {PROJECTED_ON.name})"
METHODS = {"baseline": "Baseline (TP=8, PP=2)", "layerwise": "Layer-wise (lwjax)",
           "single": "Single device (reference)"}

# Seed document 004's table (dense, MoE) and seed 000's extra columns (dense only). Claims,
# quoted beside lwjax's figures, never used as results.
CLAIMS_004 = {
    ("dense", "baseline"): (12_800, 0.078), ("dense", "layerwise"): (15_360, 0.065),
    ("moe", "baseline"): (10_200, 0.098), ("moe", "layerwise"): (13_400, 0.075),
}
CLAIMS_000 = {("dense", "baseline"): (0.23, 0.15), ("dense", "layerwise"): (0.985, 0.99)}


@dataclasses.dataclass(frozen=True)
class Scale:
    """CPU model dimensions (16 layers, 8 heads) and how often to time them."""

    hidden: int
    batch: int
    seq: int
    vocab: int
    repeats: int


FULL = Scale(hidden=256, batch=32, seq=64, vocab=256, repeats=7)
QUICK = Scale(hidden=64, batch=16, seq=32, vocab=256, repeats=5)


def cpu_config(kind: str, scale: Scale, **changes) -> DenseConfig:
    """16-layer float32 model: 8 heads and (MoE) 8 experts so that tp=8 divides them.
    Dense MLP 4 x hidden; MoE experts 2 x hidden each, top-2 of 8 (capacity factor 1.25)."""
    fields = dict(num_layers=NUM_LAYERS, hidden_size=scale.hidden, num_heads=8,
                  head_dim=scale.hidden // 8, vocab_size=scale.vocab, batch_size=scale.batch,
                  seq_len=scale.seq, dtype=jnp.dtype(jnp.float32))
    fields.update(changes)
    if kind == "moe":
        return MoEConfig(**{"mlp_hidden_size": 2 * fields["hidden_size"], **fields},
                         num_experts=8, experts_per_token=2)
    return DenseConfig(**{"mlp_hidden_size": 4 * fields["hidden_size"], **fields})


def model_name(kind: str, cfg: DenseConfig) -> str:
    return (f"MoE ({cfg.num_layers}-layer, {cfg.num_experts} experts)" if kind == "moe"
            else f"Dense ({cfg.num_layers}-layer)")


# ---- measured ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Deployment:
    """One model deployed on this machine's simulated devices.

    Attributes:
        layerwise: the seeds' layout, one layer per device (``objective="bottleneck"``).
        planned: what ``layerwise_shard`` plans for the host's L2 with the default
            ``objective="step"`` (split allowed, M fixed); None when no plan fits the L2.
    """

    cfg: DenseConfig
    model: nnx.Module
    tokens: jax.Array
    baseline: baselines.Baseline
    layerwise: lwjax.ShardedModel
    planned: lwjax.ShardedModel | None
    single: baselines.Baseline
    notes: dict[str, str]

    def callables(self) -> dict[str, functools.partial]:
        """method -> a call on the example tokens; "planned" only when it differs from
        "layerwise" (same stages and tp: the same program)."""
        fns = {"baseline": self.baseline, "layerwise": self.layerwise, "planned": self.planned,
               "single": self.single}
        if self.planned is None or _layout(self.planned) == _layout(self.layerwise):
            del fns["planned"]
        return {name: functools.partial(f, self.tokens) for name, f in fns.items()}


def _layout(sm: lwjax.ShardedModel) -> tuple:
    return tuple(s.layer_range for s in sm.plan.stages), sm.plan.tp


def deploy(cfg: DenseConfig, devices: Sequence | None = None,
           microbatches: int = MICROBATCHES, with_plan: bool = True) -> Deployment:
    """Builds the model and its deployments (weights placed, nothing compiled)."""
    devices = list(jax.devices()[:NUM_DEVICES] if devices is None else devices)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0,
                                cfg.vocab_size, jnp.int32)
    baseline = baselines.tp_pp(model, tokens, devices=devices, tp=TP, pp=PP,
                               microbatches=microbatches)
    sm, note = _common.layerwise_deploy(model, tokens, devices, microbatches,
                                        objective="bottleneck")
    planned, planned_note = None, "not built"
    if with_plan:
        planned, planned_note = _common.layerwise_deploy(
            model, tokens, devices, microbatches, objective="step", allow=("split",),
            fallback=False)
    single = baselines.single_device(model, tokens, device=devices[0])
    return Deployment(cfg, model, tokens, baseline, sm, planned, single,
                      {"layerwise": note, "planned": planned_note})


@dataclasses.dataclass(frozen=True)
class Measured:
    """Interleaved timings of one model's deployments and their correctness check."""

    kind: str
    cfg: DenseConfig
    timings: dict[str, _common.Timing]
    max_diff: dict[str, float]
    compile_s: dict[str, float]
    plans: dict[str, str]  # "layerwise" / "planned" -> plan summary
    notes: dict[str, str]
    labels: dict[str, str]  # method -> row label
    devices: dict[str, int]  # method -> devices its program runs on

    @property
    def tokens(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def tps(self, method: str) -> float:
        return self.tokens / self.timings[method].median

    def ratio(self, method: str = "layerwise") -> tuple[float, float, float]:
        """``method`` / baseline tokens/s: median, min, max of the per-round ratios (each
        round times both back to back, so a ratio sees one machine load)."""
        r = np.array(self.timings["baseline"].times_s) / np.array(self.timings[method].times_s)
        return float(np.median(r)), float(r.min()), float(r.max())


def _stages_label(sm: lwjax.ShardedModel) -> str:
    n = len(sm.plan.stages)
    split = f" x tp={sm.plan.tp}" if sm.plan.tp > 1 else ""
    return f"{n} stage{'s' if n > 1 else ''}{split}"


def measure(kind: str, cfg: DenseConfig, repeats: int, d: Deployment | None = None) -> Measured:
    """Deploys (unless given), compiles, checks every output against ``model(tokens)`` within
    ATOL, then times the deployments interleaved."""
    d = deploy(cfg) if d is None else d
    fns = d.callables()
    compile_s = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - start
    want = np.asarray(d.model(d.tokens))
    diff = {name: float(np.max(np.abs(np.asarray(fn()) - want))) for name, fn in fns.items()}
    for name, value in diff.items():
        if not value <= ATOL:
            raise AssertionError(f"{name} output differs from model(tokens) by {value:.2e} > "
                                 f"{ATOL:.0e} ({kind}).")
    timings = _common.measure_interleaved(fns, repeats=repeats)
    plans = {"layerwise": d.layerwise.plan.summary()}
    labels = dict(METHODS, layerwise=f"{METHODS['layerwise']}, 1 layer/device "
                                     f"({_stages_label(d.layerwise)})")
    if d.planned is not None:
        plans["planned"] = d.planned.plan.summary()
        labels["planned"] = (f"{METHODS['layerwise']}, planned for host L2 "
                             f"({_stages_label(d.planned)})")
    devices = {"baseline": TP * PP, "layerwise": d.layerwise.plan.num_devices, "single": 1}
    if d.planned is not None:
        devices["planned"] = d.planned.plan.num_devices
    return Measured(kind, cfg, timings, diff, compile_s, plans, d.notes, labels, devices)


def measured_rows(results: Sequence[Measured]) -> list[list[str]]:
    """Table 1 rows in seed 004's format, plus the spread and the correctness check."""
    rows = []
    for m in results:
        for method in ("baseline", "layerwise", "planned", "single"):
            if method not in m.timings:
                continue
            t = m.timings[method]
            devices = m.devices[method]
            ratio = "1.00" if method == "baseline" else f"{m.ratio(method)[0]:.2f}"
            rows.append([model_name(m.kind, m.cfg), m.labels[method], str(devices),
                         _common.tps(m.tps(method)), _common.ms(1e3 / m.tps(method)),
                         f"{_common.tps(m.tokens / t.max)}-{_common.tps(m.tokens / t.min)}",
                         t.ms(), ratio, f"{m.max_diff[method]:.1e}", _common.MEASURED])
    return rows


MEASURED_HEADERS = ["Model", "Method", "Devices", "TPS (tokens/s)", "TPOT (ms)", "TPS range",
                    "forward ms, median (min-max)", "TPS / baseline", "max abs diff vs model",
                    "figure"]


# ---- where the time goes (measured) ----------------------------------------------------------


def skeleton_config(kind: str, cfg: DenseConfig) -> DenseConfig:
    """Same layers, heads, experts, batch and M, negligible compute: the per-tick floor."""
    return cpu_config(kind, Scale(hidden=16, batch=cfg.batch_size, seq=8, vocab=64, repeats=1))


def skeletons(kind: str, d: Deployment) -> tuple:
    """Calls of the baseline and of ``d.layerwise``'s exact stages on a same-shaped model of
    negligible size: what one forward pass costs beyond compute (dispatch, collectives'
    latency, rendezvous of the device threads)."""
    cfg = skeleton_config(kind, d.cfg)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
    devices = jax.devices()[:NUM_DEVICES]
    m = d.layerwise.plan.microbatches
    base = functools.partial(baselines.tp_pp(model, tokens, devices=devices, tp=TP, pp=PP,
                                             microbatches=m), tokens)
    ranges = [s.layer_range for s in d.layerwise.plan.stages]
    lw = _common.lowered(model, tokens, ranges, devices, m, d.layerwise.plan.tp)
    return base, lw


@dataclasses.dataclass(frozen=True)
class Breakdown:
    kind: str
    timings: dict[str, _common.Timing]
    ticks: dict[str, int]
    num_stages: int
    microbatches: int
    batch: int


def breakdown(kind: str, d: Deployment, repeats: int) -> Breakdown:
    """Times the parts: the model on one device at full batch and at the microbatch size
    (x M), both deployments of a same-shaped model with negligible compute (per-tick
    synchronisation floor)."""
    cfg, m = d.cfg, d.layerwise.plan.microbatches
    mb = cfg.batch_size // m
    single_mb = baselines.single_device(d.model, d.tokens[:mb], device=jax.devices()[0])
    skel_base, skel_lw = skeletons(kind, d)
    fns = {
        "layerwise": lambda: d.layerwise(d.tokens),
        "baseline": lambda: d.baseline(d.tokens),
        "single": lambda: d.single(d.tokens),
        "single_mb": lambda: [single_mb(d.tokens[i * mb:(i + 1) * mb]) for i in range(m)],
        "skeleton_layerwise": skel_lw,
        "skeleton_baseline": skel_base,
    }
    timings = _common.measure_interleaved(fns, repeats=repeats)
    stages = len(d.layerwise.plan.stages)
    return Breakdown(kind, timings,
                     {"layerwise": m + stages - 1, "baseline": m + PP - 1}, stages, m,
                     cfg.batch_size)


def breakdown_rows(b: Breakdown) -> list[list[str]]:
    """Each method's time over one device running the whole model (the floor for any
    deployment whose devices share these cores), split into measured and estimated parts."""
    t = {k: v.median * 1e3 for k, v in b.timings.items()}
    one = t["single"]
    bubble_ms = (PP - 1) / b.microbatches * one
    lw_over, base_over = t["layerwise"] - one, t["baseline"] - one
    return [
        ["all the work on one device, full batch", f"{one:,.1f}", "measured",
         "the floor for any deployment here: the 16 simulated devices share the same cores"],
        ["ceiling on layer-wise / baseline here", f"{t['baseline'] / one:.2f}x", "measured",
         "baseline time / one-device time: what a zero-overhead deployment would reach"],
        ["layer-wise pipeline", f"{t['layerwise']:,.1f}", "measured",
         f"{b.ticks['layerwise']} ticks, {b.num_stages} stages: {lw_over:+,.1f} ms over one "
         "device"],
        ["  per-tick floor", f"{t['skeleton_layerwise']:,.1f}", "measured",
         f"the same stages on a model of negligible size: "
         f"{t['skeleton_layerwise'] / b.ticks['layerwise']:.2f} ms/tick (switch dispatch, "
         "ppermute of the carried activations, rendezvous of the device threads)"],
        ["  rest", f"{lw_over - t['skeleton_layerwise']:,.1f}", "remainder",
         f"microbatches of {b.batch // b.microbatches} instead of {b.batch} (smaller "
         "matmuls), fill/drain ticks with fewer active devices than cores, the last stage's "
         "LM head after the ticks (M microbatches, one device), weight slicing"],
        ["TP=8 x PP=2 baseline", f"{t['baseline']:,.1f}", "measured",
         f"{b.ticks['baseline']} ticks: {base_over:+,.1f} ms over one device"],
        ["  per-tick floor", f"{t['skeleton_baseline']:,.1f}", "measured",
         f"the same program on a model of negligible size: "
         f"{t['skeleton_baseline'] / b.ticks['baseline']:.2f} ms/tick "
         f"({2 * NUM_LAYERS // PP} all-reduces over 8 devices + 1 ppermute per tick)"],
        ["  bubble compute", f"{bubble_ms:,.1f}", "estimate",
         f"its stages also compute in the {PP - 1} fill/drain tick(s): (PP-1)/M x one-device "
         "time"],
        ["  rest", f"{base_over - t['skeleton_baseline'] - bubble_ms:,.1f}", "remainder",
         "TP-split matmuls (8x narrower), all-reduce traffic, microbatch granularity"],
        [f"reference: one device, {b.microbatches} microbatches one after another",
         f"{t['single_mb']:,.1f}", "measured",
         "microbatch granularity when one device runs them in turn (the pipelines overlap "
         "microbatches across the cores and pay less)"],
    ]


# ---- projected ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProjectedRow:
    model: str
    method: str
    devices: int
    projection: cost.Projection
    hit_rate: float
    memory_efficiency: float
    claimed_tps: float | None
    claimed_tpot_ms: float | None
    claimed_hit: float | None
    claimed_efficiency: float | None


def on_chip_shares(cfg: DenseConfig, hw: hardware.HardwareSpec, layers_per_stage: Sequence[int],
                   tp: int, microbatches: int) -> tuple[float, float]:
    """(cache hit rate, memory efficiency) implied by the projection's own roofline rule.

    The rule ``cost._project`` applies: a stage reads its weights from L2 when the device's
    share of the stage's weights fits ``hw.l2_bytes``, else from HBM; activations always go
    through HBM. Hit rate = on-chip bytes / all weight + activation bytes the blocks move
    (``block_cost``). Memory efficiency = bytes a device keeps resident in L2 across
    microbatches / L2 capacity, averaged over stages (0 for a stage that does not fit: it
    streams and keeps nothing resident).
    """
    mb = cfg.batch_size // microbatches
    c = cost.block_cost(cfg, batch_size=mb, tp=tp)
    on = total = 0.0
    efficiency = []
    for n in layers_per_stage:
        fits = n * c.weight_bytes <= hw.l2_bytes
        on += n * c.weight_bytes * fits
        total += n * (c.weight_bytes + c.activation_bytes)
        efficiency.append(n * c.weight_bytes / hw.l2_bytes if fits else 0.0)
    return on / total, float(np.mean(efficiency))


def projections(cfg: DenseConfig, hw: hardware.HardwareSpec = PROJECTED_ON,
                microbatches: int = MICROBATCHES) -> dict[str, tuple[cost.Projection, float,
                                                                      float]]:
    """method -> (Projection, hit rate, memory efficiency): TP x PP and one layer per stage."""
    pp_stages = [cfg.num_layers // PP] * PP
    lw_stages = [1] * cfg.num_layers
    return {
        "baseline": (cost.project_tp_pp(cfg, hw, TP, PP, microbatches),
                     *on_chip_shares(cfg, hw, pp_stages, TP, microbatches)),
        "layerwise": (cost.project_layerwise(cfg, hw, lw_stages, microbatches),
                      *on_chip_shares(cfg, hw, lw_stages, 1, microbatches)),
    }


def projected_rows(config_names: Sequence[str] = ("seed_dense", "seed_moe"),
                   hw: hardware.HardwareSpec = PROJECTED_ON,
                   microbatches: int = MICROBATCHES) -> list[ProjectedRow]:
    rows = []
    for name in config_names:
        cfg = getattr(models.configs, name)()
        kind = "moe" if cfg.is_moe else "dense"
        label = f"{model_name(kind, cfg)} [{name}]"
        for method, (p, hit, eff) in projections(cfg, hw, microbatches).items():
            c_tps, c_tpot = CLAIMS_004[kind, method]
            c_hit, c_eff = CLAIMS_000.get((kind, method), (None, None))
            rows.append(ProjectedRow(label, METHODS[method], cfg.num_layers, p, hit, eff, c_tps,
                                     c_tpot, c_hit, c_eff))
    return rows


def _claim(value: float | None, fmt) -> str:
    return "--" if value is None else fmt(value)


def projected_table(rows: Sequence[ProjectedRow]) -> str:
    """Markdown: ours (projected) and the claims (seed 004; seed 000) in separate columns."""
    body = []
    for r in rows:
        checks = [f"TPS {_common.verdict(r.projection.tps, r.claimed_tps)}"]
        if r.claimed_hit is not None:
            checks.append("hit " + _common.verdict_points(r.hit_rate, r.claimed_hit))
        body.append([
            r.model, r.method, str(r.devices), _common.tps(r.projection.tps),
            _common.ms(r.projection.tpot_ms), _common.pct(r.hit_rate),
            _common.pct(r.memory_efficiency), _common.PROJECTED,
            _claim(r.claimed_tps, _common.tps), _claim(r.claimed_tpot_ms, _common.ms),
            _claim(r.claimed_hit, _common.pct), _claim(r.claimed_efficiency, _common.pct),
            "; ".join(checks),
        ])
    return _common.markdown_table(
        ["Model", "Method", "GPUs", "TPS (tokens/s)", "TPOT (ms)", "cache hit rate",
         "memory efficiency", "figure", "claimed TPS (seed 004)", "claimed TPOT ms (seed 004)",
         "claimed cache hit (seed 000)", "claimed memory eff. (seed 000)", "agreement"],
        body, "lllrrrrlrrrrl")


def microbatch_sweep(name: str = "seed_dense", hw: hardware.HardwareSpec = PROJECTED_ON,
                     counts: Sequence[int] = (1, 8, 16, 32, 64, 128)) -> str:
    """Projected TPS of both methods as M grows (the GPipe bubble is (S-1)/(M+S-1))."""
    cfg = getattr(models.configs, name)()
    rows = []
    for m in counts:
        if cfg.batch_size % m:
            continue
        p = {k: v[0] for k, v in projections(cfg, hw, m).items()}
        rows.append([str(m), str(cfg.batch_size // m), _common.tps(p["baseline"].tps),
                     _common.pct(p["baseline"].bubble), _common.tps(p["layerwise"].tps),
                     _common.pct(p["layerwise"].bubble),
                     f"{p['layerwise'].tps / p['baseline'].tps:.2f}", _common.PROJECTED])
    return _common.markdown_table(
        ["M", "microbatch", "baseline TPS", "baseline bubble", "layer-wise TPS",
         "layer-wise bubble", "layer-wise / baseline", "figure"], rows, "rrrrrrrl")


DECODE_MICROBATCHES = (1, 2, 8, 16, 32, 128)


def decode_projections(name: str, hw: hardware.HardwareSpec = PROJECTED_ON,
                       counts: Sequence[int] = DECODE_MICROBATCHES) -> dict:
    """(method, M) -> DecodeProjection: TP x PP decoding with GPipe per token (what
    ``baselines.tp_pp_generate`` runs) and one layer per stage decoding in a ring (what
    ``lwjax.layerwise_generate`` runs), KV cache of seq_len."""
    cfg = getattr(models.configs, name)()
    layouts = {"baseline": ([cfg.num_layers // PP] * PP, TP, "gpipe"),
               "layerwise": ([1] * cfg.num_layers, 1, "ring")}
    return {(method, m): cost.project_decode(cfg, hw, stages, tp, m, schedule=schedule)
            for method, (stages, tp, schedule) in layouts.items()
            for m in counts if cfg.batch_size % m == 0}


def best_decode(name: str) -> dict[str, cost.DecodeProjection]:
    """method -> its shortest-TPOT projection over the microbatch counts tried."""
    best: dict[str, cost.DecodeProjection] = {}
    for (method, _), p in decode_projections(name).items():
        if method not in best or p.tpot_ms < best[method].tpot_ms:
            best[method] = p
    return best


def decode_table(names: Sequence[str] = ("seed_dense", "seed_moe")) -> str:
    """Projected decode TPOT and tokens/s per method and M, each method's best M marked."""
    rows = []
    for name in names:
        best = best_decode(name)
        for (method, m), p in decode_projections(name).items():
            rows.append([name, METHODS[method], str(m), f"{p.tick_s * 1e3:.3f}",
                         f"{p.tpot_ms:.2f}" + (" (best)" if p is best[method] else ""),
                         _common.tps(p.tps), f"{p.kv_bytes_per_device / 2**30:.1f}",
                         _common.PROJECTED])
    return _common.markdown_table(
        ["config", "Method", "M", "tick ms", "TPOT ms", "decode tokens/s", "KV GiB / device",
         "figure"], rows, "llrrrrrl")


def projected_detail(name: str, hw: hardware.HardwareSpec = PROJECTED_ON,
                     microbatches: int = MICROBATCHES) -> list[str]:
    """One line per method: what one tick costs and why (projected)."""
    cfg = getattr(models.configs, name)()
    mb = cfg.batch_size // microbatches
    lines = []
    for method, tp, per_stage in (("baseline", TP, cfg.num_layers // PP), ("layerwise", 1, 1)):
        c = cost.block_cost(cfg, batch_size=mb, tp=tp)
        fits = per_stage * c.weight_bytes <= hw.l2_bytes
        t = cost.layer_time(c, hw, weights_on_chip=fits, dtype=cfg.dtype.name)
        act = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
        sync = 2 * cost.allreduce_time(act, tp, hw)
        p = projections(cfg, hw, microbatches)[method][0]
        lines.append(
            f"- {name}, {METHODS[method]}: per block per microbatch {t.total_s * 1e3:.2f} ms "
            f"({t.bound}-bound: compute {t.compute_s * 1e3:.2f} ms, memory "
            f"{t.memory_s * 1e3:.2f} ms; weights {c.weight_bytes / MIB:,.1f} MiB per device, "
            f"{'on chip' if fits else 'from HBM'}) + all-reduces {sync * 1e3:.2f} ms; "
            f"{per_stage} block(s) per stage; tick {max(p.stage_s) * 1e3:.1f} ms + transfer "
            f"{p.transfer_s * 1e3:.2f} ms; {len(p.stage_s) + microbatches - 1} ticks, bubble "
            f"{p.bubble:.0%}; step {p.step_s:.2f} s for {p.tokens_per_step:,} tokens.")
    return lines


def planner_verdict(name: str, hw: hardware.HardwareSpec = PROJECTED_ON,
                    microbatches: int = MICROBATCHES) -> str:
    """What ``lwjax.plan`` says about the seed config on 16 devices of ``hw`` (abstract)."""
    cfg = getattr(models.configs, name)()
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    try:
        p = lwjax.plan(models.abstract(cfg), tokens, num_devices=NUM_DEVICES, hardware=hw,
                       microbatches=microbatches)
    except InfeasiblePlanError as e:
        return (f"`lwjax.plan` (split, compress and smaller microbatches allowed) finds no "
                f"plan: {_common.explain_infeasible(e)}.")
    return f"`lwjax.plan`: {p.strategy}, {len(p.stages)} stages x tp={p.tp}, {p.compression}."


# ---- report ------------------------------------------------------------------------------------


DEFINITIONS = f"""\
- **TPS** = tokens of one forward (prefill) pass / its time = batch x seq_len / seconds.
- **TPOT** (ms per output token): for a forward/prefill pass lwjax defines it as 1000 / TPS,
  the time per token at that throughput, as the seed documents compute it (their TPOT is
  1000 / their TPS). The decode TPOT -- ms between two tokens of one sequence, KV caches
  attended -- is projected in Table 2c; lwjax's runtime does not pipeline decode yet, so it
  is not measured.
- **measured** ({{cpu}}): wall-clock time, medians of interleaved runs
  (baseline, layer-wise, single, baseline, ...) after all were compiled; "TPS range" is the
  TPS of the slowest and fastest run. The 16 simulated devices share the machine's cores:
  these figures say how XLA's CPU runtime executes each SPMD program, not how 16 GPUs would.
- **Layer-wise, 1 layer/device**: the seeds' layout, `layerwise_shard(...,
  objective="bottleneck")`: 16 stages of one layer, planned against the host's L2 or, when a
  layer does not fit it, the least capacity that holds one layer per device (the plan says).
  **Layer-wise, planned for host L2**: what `layerwise_shard` does by default
  (`objective="step"`: the stage count with the shortest projected GPipe step, counting the
  cores the simulated devices share) against the host's L2, "split" allowed, M fixed at 8
  for comparability; absent where no plan fits the L2.
- **projected**: `lwjax.passes.cost` roofline for {NUM_DEVICES} x {PROJECTED_ON.name}
  (`project_tp_pp`, `project_layerwise`: transformer blocks only, embedding and LM head left
  out, flash attention, weights from L2 when the device's share of its stage fits the
  {PROJECTED_ON.l2_bytes / MIB:.0f} MiB L2, activations through HBM).
- **cache hit rate** (projected): share of the weight + activation bytes the blocks move that
  the roofline serves from L2 (`block_cost` bytes; the projection's own fits-in-L2 rule).
- **memory efficiency** (projected): bytes a device keeps resident in L2 across microbatches /
  L2 capacity, averaged over stages; a stage whose weights do not fit streams them and keeps
  nothing resident (0%). Seed 000 uses "memory efficiency" for HBM utilisation of the baseline
  (12 of 80 GB) and L2 utilisation of the proposal (49.5 of 50 MB); lwjax uses one definition.
- **agreement**: within 10% of the claim (5 points for hit rates).
"""


def measured_section(title: str, results: Sequence[Measured], quick: bool) -> list[str]:
    """A Table 1 section: the table, the ratios against the goal, the plans."""
    cfg = results[0].cfg
    repeats = len(results[0].timings["baseline"].times_s)
    lines = []
    for m in results:
        for method in ("layerwise", "planned"):
            if method not in m.timings:
                continue
            r, lo, hi = m.ratio(method)
            ok = "meets" if r >= GOAL else "does NOT meet"
            lines.append(f"- {model_name(m.kind, m.cfg)}, {m.labels[method]}: layer-wise / "
                         f"baseline tokens/s = **{r:.2f}x** (per-round ratios {lo:.2f}-"
                         f"{hi:.2f}; measured): {ok} the {GOAL}x goal.")
        lines.append(f"- {model_name(m.kind, m.cfg)}: compile + first call "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in m.compile_s.items()) + ".")
    plans = []
    for m in results:
        plans.append(f"{model_name(m.kind, m.cfg)}, 1 layer/device: {m.notes['layerwise']}."
                     f"\n\n```\n{m.plans['layerwise']}\n```")
        if "planned" in m.plans and "planned" in m.timings:
            plans.append(f"{model_name(m.kind, m.cfg)}, planned for the host L2 (objective "
                         f"'step'; split allowed, M fixed):\n\n```\n{m.plans['planned']}\n```")
        elif "planned" in m.plans:
            plans.append(f"{model_name(m.kind, m.cfg)}: planned for the host L2, the planner "
                         "chose the same stages as above.")
        else:
            plans.append(f"{model_name(m.kind, m.cfg)}, planned for the host L2: "
                         f"{m.notes['planned']}.")
    return [
        title,
        f"Models: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
        f"{cfg.head_dim}, dense MLP {4 * cfg.hidden_size} / MoE 8 experts x "
        f"{2 * cfg.hidden_size} top-2, vocab {cfg.vocab_size}, batch {cfg.batch_size} x seq "
        f"{cfg.seq_len}, float32; M = {MICROBATCHES} microbatches for every pipeline; median "
        f"of {repeats} interleaved runs{' (--quick)' if quick else ''}. 'TPS / baseline' is the "
        "median of the per-round ratios.\n\n"
        + _common.markdown_table(MEASURED_HEADERS, measured_rows(results), "lllrrrrrrl"),
        "Ratios (same run, interleaved):\n\n" + "\n".join(lines),
        "Layer-wise plans:\n\n" + "\n\n".join(plans),
        "A plan for the host L2 may use fewer devices than 16: with `objective=\"step\"` the "
        "planner counts the cores the simulated devices share, and fewer stages mean fewer "
        "GPipe ticks and rendezvous. On 16 GPUs that choice would leave devices idle.",
    ]


def summary(tables: Sequence[tuple[str, Sequence[Measured]]],
            breakdowns: Sequence[Breakdown]) -> list[str]:
    """The goal, checked against the figures below (every line computed from them)."""
    lines = []
    for title, results in tables:
        for m in results:
            for method in ("layerwise", "planned"):
                if method in m.timings:
                    r = m.ratio(method)[0]
                    lines.append(f"- {title.split(':')[0]}, {model_name(m.kind, m.cfg)}, "
                                 f"{m.labels[method].replace(METHODS['layerwise'] + ', ', '')}: "
                                 f"**{r:.2f}x** the baseline's tokens/s (measured) -> goal "
                                 f"{'met' if r >= GOAL else 'NOT met'}.")
    for b in breakdowns:
        t = {k: v.median for k, v in b.timings.items()}
        lines.append(f"- Ceiling on these cores ({b.kind}, Table 1 sizes): the baseline takes "
                     f"{t['baseline'] / t['single']:.2f}x the time of one device running the "
                     "whole model, so no deployment of these 16 simulated devices can beat it "
                     "by more; 1 layer/device layer-wise takes "
                     f"{t['layerwise'] / t['single']:.2f}x.")
    for name in ("seed_dense", "seed_moe"):
        p = {k: v[0] for k, v in projections(getattr(models.configs, name)()).items()}
        lines.append(f"- Projected, {name} on 16 x {PROJECTED_ON.name}, M = 8: layer-wise / "
                     f"baseline = {p['layerwise'].tps / p['baseline'].tps:.2f} (GPipe bubble "
                     f"{p['layerwise'].bubble:.0%} vs {p['baseline'].bubble:.0%}; no layer's "
                     "weights fit the L2 in either).")
        d = best_decode(name)
        lines.append(f"- Projected decode, {name}, each at its best M: TPOT baseline "
                     f"{d['baseline'].tpot_ms:.2f} ms (M = {d['baseline'].microbatches}), "
                     f"layer-wise {d['layerwise'].tpot_ms:.2f} ms (M = "
                     f"{d['layerwise'].microbatches}); layer-wise / baseline decode tokens/s = "
                     f"{d['layerwise'].tps / d['baseline'].tps:.2f} (Table 2c).")
    return lines


def report(tables: Sequence[tuple[str, Sequence[Measured]]], breakdowns: Sequence[Breakdown],
           vocab_check: Sequence[Measured], command: str, quick: bool) -> str:
    label = _common.cpu_label()
    parts = [_common.header("Throughput: layer-wise vs TP=8 x PP=2", SCRIPT, command),
             f"## Summary (goal: layer-wise >= {GOAL}x the baseline's tokens/s)",
             "\n".join(summary(tables, breakdowns)),
             "## Definitions", DEFINITIONS.replace("{cpu}", label)]
    for title, results in tables:
        parts += measured_section(f"## {title}: {label}", results, quick)
    for b in breakdowns:
        parts += [f"## Where the time goes: {b.kind}, {label}",
                  "Parts timed separately in one interleaved run (medians), against one device "
                  "running the whole model. Parts can overlap in the full run (a device thread "
                  "waiting at a rendezvous frees its core for another device's work); 'rest' "
                  "is what the measured parts leave unexplained.\n\n"
                  + _common.markdown_table(["part", "ms", "figure", "how"], breakdown_rows(b),
                                           "lrll")]
    if vocab_check:
        rows = []
        for m in vocab_check:
            rows.append([str(m.cfg.vocab_size), m.timings["baseline"].ms(),
                         m.timings["layerwise"].ms(), f"{m.ratio()[0]:.2f}", _common.MEASURED])
        parts += ["## Vocabulary sensitivity: dense, 1 layer/device, " + label,
                  "Layer-wise runs the final norm and LM head [B/M, T, D] x [D, V] on its last "
                  "stage alone, after the pipeline's ticks, once per microbatch (the other "
                  "stages return a zero [M, B/M, T, V] block once); the baseline runs the head "
                  "once, after the pipeline, split over the 8 tp devices.\n\n"
                  + _common.markdown_table(["vocab", "baseline ms", "layer-wise ms",
                                            "layer-wise / baseline TPS", "figure"], rows,
                                           "rrrrl")]
    parts += [
        f"## Table 2: {PROJECTED_LABEL}, seed dimensions",
        "seed_dense / seed_moe: 16 layers, hidden 4096, 32 x 128 heads, MLP 16384 (MoE: 8 "
        "experts, top-2), batch 128, seq 10,000, FP16, M = 8 microbatches of 16. Seed 004's "
        "own table is for different dimensions (16 x 512 heads, MLP 32768, batch 1024); Table "
        "2b projects those.\n\n" + projected_table(projected_rows()),
        "### Table 2b: seed 004's dimensions (seed004_dense / seed004_moe)",
        projected_table(projected_rows(("seed004_dense", "seed004_moe"))),
        "### What the projection is made of (seed_dense, M = 8)",
        "\n".join(projected_detail("seed_dense")),
        "### Projected TPS vs microbatches (seed_dense)",
        "The seeds' M = 8 leaves a 16-stage pipeline idle 65% of the time (15 / 23 ticks); "
        "a 2-stage one 11%.\n\n" + microbatch_sweep(),
        "### Table 2c: projected decode (TPOT), seed dimensions",
        f"One decode step: every sequence of the batch gains one token, attending over a KV "
        f"cache of seq_len = 10,000 positions (`cost.project_decode`: weights from HBM -- no "
        f"layer fits the L2 -- and the KV cache from HBM; embedding and LM head included; "
        f"{PROJECTED_ON.name}). Layer-wise decodes in a ring (`lwjax.layerwise_generate`): a "
        "microbatch's token crosses the S stages in S ticks and its next token waits for its "
        "turn at stage 0, every M ticks: TPOT = max(M, S) ticks. TP x PP decodes with a GPipe "
        "pass per token (`baselines.tp_pp_generate`): TPOT = M + S - 1 ticks plus the "
        "embedding and head over all devices. Measured decode: `experiments/decode.py` "
        "(`decode.md`).\n\n" + decode_table(),
        "### What lwjax's planner says at these dimensions",
        "\n".join(f"- {n}: {planner_verdict(n)}" for n in ("seed_dense", "seed_moe")),
    ]
    return "\n\n".join(parts) + "\n"


def figure(tables: Sequence[tuple[str, Sequence[Measured]]], path: pathlib.Path) -> pathlib.Path:
    """One bar panel per measured table, then the projections beside the claims."""
    panels = []
    for title, results in tables:
        groups = tuple(model_name(m.kind, m.cfg) for m in results)
        series, errors = {}, {}
        for method in ("baseline", "layerwise", "planned", "single"):
            if any(method not in m.timings for m in results):
                continue
            name = results[0].labels[method].replace(" (lwjax)", "")
            name = name if method != "planned" else name.split(" (")[0]
            series[name] = tuple(m.tps(method) for m in results)
            errors[name] = (tuple(m.tokens / m.timings[method].max for m in results),
                            tuple(m.tokens / m.timings[method].min for m in results))
        cfg = results[0].cfg
        panels.append(_common.Panel(
            f"{title.split(':')[0]}: {_common.cpu_label()}\nhidden {cfg.hidden_size}, batch "
            f"{cfg.batch_size} x seq {cfg.seq_len}", groups, series,
            "tokens/s (measured; bars: min-max)", errors))
    rows = projected_rows()
    groups = tuple(dict.fromkeys(r.model.split(" [")[0] for r in rows))
    series = {}
    for method in ("baseline", "layerwise"):
        mine = [r for r in rows if r.method == METHODS[method]]
        series[f"{METHODS[method]} (projected)"] = tuple(r.projection.tps for r in mine)
        series[f"{METHODS[method]}: claimed (seed 004)"] = tuple(r.claimed_tps for r in mine)
    panels.append(_common.Panel(f"{PROJECTED_LABEL}\nseed dims, M = 8", groups, series,
                                "tokens/s (log)", log=True))
    return _common.bar_panels(path, panels, "Throughput: layer-wise vs TP=8 x PP=2")


def measure_scale(scale: Scale, kinds: Sequence[str], repeats: int,
                  breakdown_kinds: Sequence[str]) -> tuple[list[Measured], list[Breakdown]]:
    results, breakdowns = [], []
    for kind in kinds:
        cfg = cpu_config(kind, scale)
        _common.step(f"{kind}, hidden {scale.hidden}: building the deployments and plans")
        d = deploy(cfg)
        print(d.layerwise.plan.summary(), flush=True)
        if d.planned is not None and _layout(d.planned) != _layout(d.layerwise):
            print(d.planned.plan.summary(), flush=True)
        _common.step(f"{kind}: compiling, checking outputs, timing {repeats} interleaved rounds")
        m = measure(kind, cfg, repeats, d)
        results.append(m)
        _common.step(f"{kind}: " + ", ".join(f"{k} {v.ms()} ms" for k, v in m.timings.items())
                     + f"; layer-wise / baseline {m.ratio()[0]:.2f}x; max|diff| "
                     f"{max(m.max_diff.values()):.1e}")
        if kind in breakdown_kinds:
            _common.step(f"{kind}: timing the parts (breakdown)")
            breakdowns.append(breakdown(kind, d, repeats))
    return results, breakdowns


def main(argv: Sequence[str] | None = None) -> str:
    a = _common.parse_measured_args(__doc__, argv, "small sizes, 5 repeats, fewer extras",
                                    NUM_DEVICES)
    tables, breakdowns, vocab_check = [], [], []
    if a.quick:
        results, breakdowns = measure_scale(QUICK, ("dense", "moe"), a.repeats or QUICK.repeats,
                                            ("dense",))
        tables.append(("Table 1 (--quick sizes)", results))
    else:
        results, breakdowns = measure_scale(FULL, ("dense", "moe"), a.repeats or FULL.repeats,
                                            ("dense", "moe"))
        tables.append(("Table 1", results))
        small, _ = measure_scale(QUICK, ("dense", "moe"), a.repeats or QUICK.repeats, ())
        tables.append(("Table 1b: a scale whose layers fit the host L2", small))
        cfg = cpu_config("dense", dataclasses.replace(FULL, vocab=2048))
        _common.step("dense, vocab 2048: vocabulary sensitivity")
        vocab_check = [results[0], measure("dense", cfg, a.repeats or FULL.repeats,
                                           deploy(cfg, with_plan=False))]
    _common.step("projecting for 16 x H100 and asking the planner")
    text = report(tables, breakdowns, vocab_check, _common.command_line(SCRIPT, argv), a.quick)
    print(text)
    suffix = "-quick" if a.quick else ""  # --quick never overwrites the full results
    if not a.no_write:
        out = _common.output_dir(a.write_results)
        path = _common.write_results(f"throughput{suffix}.md", text, out)
        png = figure(tables, out / f"throughput{suffix}.png")
        _common.step(f"written {path} and {png}")
    return text


if __name__ == "__main__":
    main()
