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
from lwjax import baselines, baselines_tp_pp, hardware, models  # noqa: E402
from lwjax.models.configs import DenseConfig, MoEConfig  # noqa: E402
from lwjax.passes import cost  # noqa: E402

SCRIPT = "experiments/throughput.py"
TP, PP, MICROBATCHES, NUM_DEVICES = 8, 2, 8, 16
NUM_LAYERS = 16
ATOL = 1e-4
GOAL = 1.3  # issue #15: one layer per device >= 1.3 x the best baseline where layers fit L2
GOAL_DEFAULT = 1.0  # issue #15: lwjax's default plan never slower than the best baseline
MEASURED_SCALE_FITS_L2 = 64  # the hidden size (Table 1b) whose layers fit the host L2
MIB = 2**20
PROJECTED_ON = hardware.H100_SXM
PROJECTED_LABEL = f"projected (cost model, {NUM_DEVICES} x {PROJECTED_ON.name})"
MICROBATCH_SWEEP = (2, 4, 8, 16)  # the default baseline variant also runs at these M
TUNE = 4  # layerwise_shard(..., tune=TUNE): the layout search's 4 best layouts measured
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


def baseline_key(variant: str, microbatches: int = MICROBATCHES) -> str:
    """The timing key of one baseline variant: ``baseline:<variant>`` (M = 8) or
    ``baseline:<variant>@M=<m>``."""
    return f"baseline:{variant}" + ("" if microbatches == MICROBATCHES else f"@M={microbatches}")


def is_baseline(method: str) -> bool:
    return method.startswith("baseline:")


def baseline_plan(cfg: DenseConfig, variants: str = "all",
                  microbatches: int = MICROBATCHES) -> list[tuple[str, int]]:
    """(variant, M) pairs to measure, the model's default variant at ``microbatches`` first:
    ``"all"`` adds every other variant at ``microbatches`` and the default variant at the
    other M of MICROBATCH_SWEEP that divide the batch; ``"microbatches"`` (``--quick``) only
    the latter; ``"default"`` adds nothing."""
    default = baselines_tp_pp.variant_for(cfg, None).name
    pairs = [(default, microbatches)]
    if variants == "all":
        pairs += [(v, microbatches) for v in baselines_tp_pp.variants_for(cfg) if v != default]
    if variants in ("all", "microbatches"):
        pairs += [(default, m) for m in MICROBATCH_SWEEP
                  if m != microbatches and cfg.batch_size % m == 0]
    return pairs


@dataclasses.dataclass(frozen=True)
class Deployment:
    """One model deployed on this machine's simulated devices.

    Attributes:
        baselines: ``baseline_key(variant, M)`` -> that ``tp_pp`` variant (TP=8 x PP=2).
        layerwise: the seeds' layout, one layer per device (``objective="bottleneck"``).
        planned: what ``layerwise_shard`` plans for the host's L2 with the default
            ``layerwise_shard``'s defaults (the layout search picks stages, tp and M) at
            the 1 layer/device row's capacity (the host L2, or the least that holds one
            layer per device).
        tuned: the same with ``tune=tune``: the layout search's best layouts measured on
            these devices, the fastest kept (None: not built).
        tune: the ``tune=`` it was built with; tune_s: the seconds that call took (its
            candidates' compiles and timings).
    """

    cfg: DenseConfig
    model: nnx.Module
    tokens: jax.Array
    baselines: dict[str, baselines.Baseline]
    layerwise: lwjax.ShardedModel
    planned: lwjax.ShardedModel | None
    single: baselines.Baseline
    notes: dict[str, str]
    tuned: lwjax.ShardedModel | None = None
    tune: int = 0
    tune_s: float = 0.0

    @property
    def baseline(self) -> baselines.Baseline:
        """``tp_pp``'s default variant at the deployment's M (what ``baselines.tp_pp``
        builds): the first of ``baselines``."""
        return next(iter(self.baselines.values()))

    def callables(self) -> dict[str, functools.partial]:
        """method -> a call on the example tokens; "planned" only when it differs from
        "layerwise" (same stages and tp: the same program), "tuned" only when it differs
        from both."""
        fns = {**self.baselines, "layerwise": self.layerwise, "planned": self.planned,
               "tuned": self.tuned, "single": self.single}
        if self.planned is None or _layout(self.planned) == _layout(self.layerwise):
            del fns["planned"]
        if self.tuned is None or self.same_as_tuned() is not None:
            del fns["tuned"]
        return {name: functools.partial(f, self.tokens) for name, f in fns.items()}

    def same_as_tuned(self) -> str | None:
        """"planned" or "layerwise" when the tuned plan is that program (timed once), else
        None (another program, or no tuned plan)."""
        if self.tuned is None:
            return None
        for name in ("layerwise", "planned"):  # "planned" is timed when it differs
            other = getattr(self, name)
            if other is not None and _layout(other) == _layout(self.tuned):
                return name
        return None


def _layout(sm: lwjax.ShardedModel) -> tuple:
    return (tuple(s.layer_range for s in sm.plan.stages), sm.plan.tp, sm.plan.microbatches,
            sm.plan.virtual)


def deploy(cfg: DenseConfig, devices: Sequence | None = None,
           microbatches: int = MICROBATCHES, with_plan: bool = True,
           variants: str = "all", tune: int = 0) -> Deployment:
    """Builds the model and its deployments (weights placed, nothing compiled but the
    candidates ``tune`` > 1 measures); ``variants`` as in ``baseline_plan`` (the default
    variant always at ``microbatches``)."""
    devices = list(jax.devices()[:NUM_DEVICES] if devices is None else devices)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch_size, cfg.seq_len), 0,
                                cfg.vocab_size, jnp.int32)
    tp_pp = {baseline_key(v, m): baselines.tp_pp(model, tokens, devices=devices, tp=TP, pp=PP,
                                                  microbatches=m, variant=v)
             for v, m in baseline_plan(cfg, variants, microbatches)}
    sm, note = _common.layerwise_deploy(model, tokens, devices, microbatches,
                                        objective="bottleneck")
    planned, planned_note = None, "not built"
    if with_plan:
        # lwjax's defaults -- the layout search picks stages, tp and M -- at the capacity of
        # the row above: the host L2, or where one layer per device does not fit it, the
        # least capacity that holds one (the least that fits anything forces M = B)
        capacity = sm.plan.capacity_bytes
        planned = lwjax.layerwise_shard(model, tokens, devices=devices, cache_bytes=capacity)
        planned_note = (f"cache_bytes = {capacity / 2**20:.2f} MiB, as the 1 layer/device "
                        "row; everything else layerwise_shard's defaults")
    tuned, tune_s = None, 0.0
    if with_plan and tune > 1:
        start = time.perf_counter()
        tuned = lwjax.layerwise_shard(model, tokens, devices=devices, cache_bytes=capacity,
                                      tune=tune)
        tune_s = time.perf_counter() - start
    single = baselines.single_device(model, tokens, device=devices[0])
    return Deployment(cfg, model, tokens, tp_pp, sm, planned, single,
                      {"layerwise": note, "planned": planned_note}, tuned, tune, tune_s)


@dataclasses.dataclass(frozen=True)
class Measured:
    """Interleaved timings of one model's deployments and their correctness check."""

    kind: str
    cfg: DenseConfig
    timings: dict[str, _common.Timing]
    max_diff: dict[str, float]
    compile_s: dict[str, float]
    plans: dict[str, str]  # "layerwise" / "planned" / "tuned" -> plan summary
    notes: dict[str, str]
    labels: dict[str, str]  # method -> row label
    devices: dict[str, int]  # method -> devices its program runs on

    @property
    def tokens(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    @property
    def baselines(self) -> list[str]:
        """The baseline variants measured, in measuring order."""
        return [k for k in self.timings if is_baseline(k)]

    @property
    def best_baseline(self) -> str:
        """The baseline variant with the shortest median: what every ratio is against."""
        return min(self.baselines, key=lambda k: self.timings[k].median)

    @property
    def default_plan(self) -> str:
        """lwjax's default plan: "planned" when it differs from one layer per device."""
        return "planned" if "planned" in self.timings else "layerwise"

    def tps(self, method: str) -> float:
        return self.tokens / self.timings[method].median

    def ratio(self, method: str = "layerwise") -> tuple[float, float, float]:
        """``method`` / best baseline variant tokens/s: median, min, max of the per-round
        ratios (each round times all back to back, so a ratio sees one machine load)."""
        best = np.array(self.timings[self.best_baseline].times_s)
        r = best / np.array(self.timings[method].times_s)
        return float(np.median(r)), float(r.min()), float(r.max())


def _stages_label(sm: lwjax.ShardedModel) -> str:
    n = len(sm.plan.stages)
    split = f" x tp={sm.plan.tp}" if sm.plan.tp > 1 else ""
    laps = f" (circular: {sm.plan.ring} devices x {sm.plan.virtual} laps)" \
        if sm.plan.virtual > 1 else ""
    return f"{n} stage{'s' if n > 1 else ''}{split}{laps}, M={sm.plan.microbatches}"


def _baseline_label(b: baselines.Baseline) -> str:
    return f"{METHODS['baseline']} `{b.variant}`, M={b.num_microbatches}"


def measure(kind: str, cfg: DenseConfig, repeats: int, d: Deployment | None = None) -> Measured:
    """Deploys (unless given), compiles, checks every output against ``model(tokens)`` within
    ATOL, then times every deployment interleaved (every baseline variant in one run)."""
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
    labels |= {k: _baseline_label(b) for k, b in d.baselines.items()}
    devices = {k: TP * PP for k in d.baselines} | {
        "layerwise": d.layerwise.plan.num_devices, "single": 1}
    if d.planned is not None and "planned" not in timings:  # the same layout: timed once
        labels["layerwise"] += " = the default plan"
    if d.planned is not None:
        plans["planned"] = d.planned.plan.summary()
        labels["planned"] = f"{METHODS['layerwise']}, default plan ({_stages_label(d.planned)})"
        devices["planned"] = d.planned.plan.num_devices
    if d.tuned is not None:
        same = d.same_as_tuned()
        if same is not None:  # the same program: its timing, once
            timings["tuned"] = timings[same]
            diff["tuned"] = diff[same]
        compile_s["tuned"] = d.tune_s  # every candidate's compile and timing
        plans["tuned"] = d.tuned.plan.summary()
        default = d.planned is not None and _layout(d.planned) == _layout(d.tuned)
        labels["tuned"] = (f"{METHODS['layerwise']}, tuned (tune={d.tune}: "
                           f"{_stages_label(d.tuned)}" + (")" if same is None else
                                                          ", the default plan)" if default
                                                          else ", the 1 layer/device plan)"))
        devices["tuned"] = d.tuned.plan.num_devices
    return Measured(kind, cfg, timings, diff, compile_s, plans, d.notes, labels, devices)


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
                                             microbatches=m, variant=d.baseline.variant), tokens)
    ranges = [s.layer_range for s in d.layerwise.plan.stages]
    lw = _common.lowered(model, tokens, ranges, devices, m, d.layerwise.plan.tp)
    return base, lw


def rendezvous(devices: Sequence, ticks: int, nbytes: int):
    """A call of a program that only passes ``nbytes`` per device one step around
    ``devices`` (a ppermute), ``ticks`` times in a scan as the pipeline's ticks do: what the
    device threads meeting at a collective costs with no work at all."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    ring = [(i, (i + 1) % n) for i in range(n)]

    def body(x):
        return jax.lax.scan(lambda c, _: (jax.lax.ppermute(c, "d", ring), None), x, None,
                            length=ticks)[0]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    x = jax.device_put(jnp.zeros((n, max(nbytes // 4, 1)), jnp.float32),
                       NamedSharding(mesh, P("d")))
    return lambda: f(x)


@dataclasses.dataclass(frozen=True)
class Breakdown:
    kind: str
    hidden: int
    timings: dict[str, _common.Timing]
    ticks: dict[str, int]
    num_stages: int
    microbatches: int
    batch: int
    baseline_variant: str  # the tp_pp variant timed as "baseline"
    best_baseline: str  # the baselines' key timed as "best_baseline"
    carry_bytes: int  # one microbatch's residual, what a layer-wise tick sends per device
    baseline_microbatches: int = MICROBATCHES  # the M of the baseline timed as "baseline"


def breakdown(kind: str, d: Deployment, repeats: int, best: str | None = None) -> Breakdown:
    """Times the parts: the model on one device at full batch and at the microbatch size
    (x M), both deployments of a same-shaped model with negligible compute (per-tick
    synchronisation floor), and the layer-wise ticks' ppermutes alone among as many device
    threads as stages and among two (``rendezvous``); ``best``, a key of ``d.baselines``
    (the fastest variant of the run before), is timed too as "best_baseline"."""
    cfg, m = d.cfg, d.layerwise.plan.microbatches
    mb = cfg.batch_size // m
    single_mb = baselines.single_device(d.model, d.tokens[:mb], device=jax.devices()[0])
    skel_base, skel_lw = skeletons(kind, d)
    stages = len(d.layerwise.plan.stages)
    ticks = m + stages - 1
    carry = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
    devices = jax.devices()[:NUM_DEVICES]
    fns = {
        "layerwise": lambda: d.layerwise(d.tokens),
        "baseline": lambda: d.baseline(d.tokens),
        "single": lambda: d.single(d.tokens),
        "single_mb": lambda: [single_mb(d.tokens[i * mb:(i + 1) * mb]) for i in range(m)],
        "skeleton_layerwise": skel_lw,
        "skeleton_baseline": skel_base,
        "rendezvous": rendezvous(devices[:stages], ticks, carry),
        "rendezvous_2": rendezvous(devices[:2], ticks, carry),
        "best_baseline": functools.partial(d.baselines[best or baseline_key(
            d.baseline.variant, d.baseline.num_microbatches)], d.tokens),
    }
    timings = _common.measure_interleaved(fns, repeats=repeats)
    base_m = d.baseline.num_microbatches
    return Breakdown(kind, cfg.hidden_size, timings,
                     {"layerwise": ticks, "baseline": base_m + PP - 1}, stages, m,
                     cfg.batch_size, d.baseline.variant,
                     best or baseline_key(d.baseline.variant, base_m), carry, base_m)


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


def measure_scale(scale: Scale, kinds: Sequence[str], repeats: int,
                  breakdown_kinds: Sequence[str], variants: str = "all", tune: int = 0,
                  ) -> tuple[list[Measured], list[Breakdown]]:
    """Every model of ``kinds`` at ``scale``: its deployments (baseline ``variants`` as in
    ``baseline_plan``) timed in one interleaved run, and the breakdowns asked for."""
    results, breakdowns = [], []
    for kind in kinds:
        cfg = cpu_config(kind, scale)
        _common.step(f"{kind}, hidden {scale.hidden}: building the deployments and plans")
        d = deploy(cfg, variants=variants, tune=tune)
        print(d.layerwise.plan.summary(), flush=True)
        if d.planned is not None and _layout(d.planned) != _layout(d.layerwise):
            print(d.planned.plan.summary(), flush=True)
        _common.step(f"{kind}: compiling, checking outputs, timing {repeats} interleaved rounds")
        m = measure(kind, cfg, repeats, d)
        results.append(m)
        _common.step(f"{kind}: " + ", ".join(f"{k} {v.ms()} ms" for k, v in m.timings.items())
                     + f"; best baseline {m.best_baseline}; default plan / best baseline "
                     f"{m.ratio(m.default_plan)[0]:.2f}x; max|diff| "
                     f"{max(m.max_diff.values()):.1e}")
        if kind in breakdown_kinds:
            _common.step(f"{kind}: timing the parts (breakdown)")
            breakdowns.append(breakdown(kind, d, repeats, m.best_baseline))
    return results, breakdowns


def main(argv: Sequence[str] | None = None) -> str:
    a = _common.parse_measured_args(__doc__, argv, "small sizes, 5 repeats, fewer extras",
                                    NUM_DEVICES)
    tables, breakdowns, vocab_check = [], [], []
    if a.quick:
        results, breakdowns = measure_scale(QUICK, ("dense", "moe"), a.repeats or QUICK.repeats,
                                            ("dense",), variants="microbatches")
        tables.append(("Table 1 (--quick sizes)", results))
    else:
        results, breakdowns = measure_scale(FULL, ("dense", "moe"), a.repeats or FULL.repeats,
                                            ("dense", "moe"), tune=TUNE)
        tables.append(("Table 1", results))
        small, small_parts = measure_scale(QUICK, ("dense", "moe"), a.repeats or QUICK.repeats,
                                           ("dense", "moe"), tune=TUNE)
        tables.append(("Table 1b: a scale whose layers fit the host L2", small))
        breakdowns += small_parts
        cfg = cpu_config("dense", dataclasses.replace(FULL, vocab=2048))
        _common.step("dense, vocab 2048: vocabulary sensitivity")
        vocab_check = [results[0], measure("dense", cfg, a.repeats or FULL.repeats,
                                           deploy(cfg, with_plan=False, variants="default"))]
    _common.step("projecting for 16 x H100 and asking the planner")
    # the report module imports this one as "throughput", also when demo.py loads it by path
    sys.modules.setdefault("throughput", sys.modules[__name__])
    import throughput_report  # noqa: PLC0415

    text = throughput_report.report(tables, breakdowns, vocab_check,
                                    _common.command_line(SCRIPT, argv), a.quick)
    print(text)
    suffix = "-quick" if a.quick else ""  # --quick never overwrites the full results
    if not a.no_write:
        out = _common.output_dir(a.write_results)
        path = _common.write_results(f"throughput{suffix}.md", text, out)
        png = throughput_report.figure(tables, out / f"throughput{suffix}.png")
        _common.step(f"written {path} and {png}")
    return text


if __name__ == "__main__":
    main()
