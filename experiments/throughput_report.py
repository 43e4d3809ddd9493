"""The report of ``experiments/throughput.py``: Markdown tables, the summary and the figure.

``throughput.py`` measures and projects (plain records: ``Measured``, ``Breakdown``,
``ProjectedRow``); this module formats them. Every figure it prints is labelled measured or
projected.

Example:
    >>> text = report([("Table 1", [measured])], [], [], "python experiments/throughput.py",
    ...               quick=True)
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import _common
import jax
import jax.numpy as jnp
from throughput import (
    GOAL,
    GOAL_DEFAULT,
    MEASURED_SCALE_FITS_L2,
    METHODS,
    MIB,
    MICROBATCHES,
    NUM_DEVICES,
    NUM_LAYERS,
    PP,
    PROJECTED_LABEL,
    PROJECTED_ON,
    SCRIPT,
    TP,
    TUNE,
    Breakdown,
    Measured,
    ProjectedRow,
    best_decode,
    decode_projections,
    model_name,
    projected_rows,
    projections,
)

import lwjax
from lwjax import baselines_tp_pp, hardware, models
from lwjax.errors import InfeasiblePlanError
from lwjax.passes import cost

QUICK_NOTE = " (--quick: the default baseline variant only, at each M)"


def _goal(m: Measured, method: str) -> float:
    """The issue's goal for ``method``: 1.3x for one layer per device where layers fit the
    host L2 (hidden 64), else 1.0x (the default plan never slower than the best baseline)."""
    if method == "layerwise" and m.cfg.hidden_size <= MEASURED_SCALE_FITS_L2:
        return GOAL
    return GOAL_DEFAULT


def measured_rows(results: Sequence[Measured]) -> list[list[str]]:
    """Table 1 rows in seed 004's format, plus the spread and the correctness check."""
    rows = []
    for m in results:
        for method in [*m.baselines, "layerwise", "planned", "tuned", "single"]:
            if method not in m.timings:
                continue
            t = m.timings[method]
            devices = m.devices[method]
            ratio = ("1.00 (best baseline)" if method == m.best_baseline
                     else f"{m.ratio(method)[0]:.2f}")
            rows.append([model_name(m.kind, m.cfg), m.labels[method], str(devices),
                         _common.tps(m.tps(method)), _common.ms(1e3 / m.tps(method)),
                         f"{_common.tps(m.tokens / t.max)}-{_common.tps(m.tokens / t.min)}",
                         t.ms(), ratio, f"{m.max_diff[method]:.1e}", _common.MEASURED])
    return rows


MEASURED_HEADERS = ["Model", "Method", "Devices", "TPS (tokens/s)", "TPOT (ms)", "TPS range",
                    "forward ms, median (min-max)", "TPS / best baseline", "max abs diff vs model",
                    "figure"]


def breakdown_rows(b: Breakdown) -> list[list[str]]:
    """Each method's time over one device running the whole model (the floor for any
    deployment whose devices share these cores), split into measured and estimated parts."""
    t = {k: v.median * 1e3 for k, v in b.timings.items()}
    one = t["single"]
    skips = baselines_tp_pp.VARIANTS[b.baseline_variant].skip_bubble
    bubble_ms = 0.0 if skips else (PP - 1) / b.microbatches * one
    lw_over, base_over = t["layerwise"] - one, t["baseline"] - one
    ticks = b.ticks["layerwise"]
    return [
        ["all the work on one device, full batch", f"{one:,.1f}", "measured",
         "the 16 simulated devices share the same cores; a reference, not a bound: one "
         "device's run does not keep every core busy"],
        ["layer-wise / baseline if layer-wise ran as one device", f"{t['baseline'] / one:.2f}x",
         "measured", "baseline time / one-device time: a deployment with no overhead over "
         "one device's run"],
        ["layer-wise pipeline", f"{t['layerwise']:,.1f}", "measured",
         f"{ticks} ticks, {b.num_stages} stages: {lw_over:+,.1f} ms over one device"],
        ["  per-tick floor", f"{t['skeleton_layerwise']:,.1f}", "measured",
         f"the same stages on a model of negligible size: "
         f"{t['skeleton_layerwise'] / ticks:.2f} ms/tick (switch dispatch, "
         "ppermute of the carried activations, rendezvous of the device threads)"],
        [f"    of which the rendezvous of {b.num_stages} device threads",
         f"{t['rendezvous']:,.1f}", "measured",
         f"a program that only ppermutes the carry ({b.carry_bytes / 1024:,.0f} KiB per "
         f"device) around {b.num_stages} devices {ticks} times: "
         f"{t['rendezvous'] / ticks:.3f} ms each; around 2 devices "
         f"{t['rendezvous_2'] / ticks:.3f} ms each -- the device threads outnumber the cores"],
        ["  rest", f"{lw_over - t['skeleton_layerwise']:,.1f}", "remainder",
         f"microbatches of {b.batch // b.microbatches} instead of {b.batch} (smaller "
         "matmuls), fill/drain ticks with fewer active devices than cores, the last stage's "
         "LM head after the ticks (M microbatches, one device)"],
        [f"TP=8 x PP=2 baseline (`{b.baseline_variant}`, M = {b.baseline_microbatches})",
         f"{t['baseline']:,.1f}", "measured",
         f"{b.ticks['baseline']} ticks: {base_over:+,.1f} ms over one device"],
        ["  per-tick floor", f"{t['skeleton_baseline']:,.1f}", "measured",
         f"the same program on a model of negligible size: "
         f"{t['skeleton_baseline'] / b.ticks['baseline']:.2f} ms/tick "
         f"({2 * NUM_LAYERS // PP} all-reduces over 8 devices + 1 ppermute per tick)"],
        ["  bubble compute", f"{bubble_ms:,.1f}", "estimate",
         "skipped: a stage's fill/drain ticks run no layers (`lax.cond`)" if skips else
         f"its stages also compute in the {PP - 1} fill/drain tick(s): (PP-1)/M x one-device "
         "time"],
        ["  rest", f"{base_over - t['skeleton_baseline'] - bubble_ms:,.1f}", "remainder",
         "TP-split matmuls (8x narrower), all-reduce traffic, microbatch granularity"],
        [f"reference: one device, {b.microbatches} microbatches one after another",
         f"{t['single_mb']:,.1f}", "measured",
         "microbatch granularity when one device runs them in turn (the pipelines overlap "
         "microbatches across the cores and pay less)"],
    ]


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
  attended -- is projected in Table 2c here and measured by `experiments/decode.py`
  (`experiments/results/decode.md`: lwjax's decode ring against TP x PP generation).
- **measured** ({{cpu}}): wall-clock time, medians of interleaved runs
  (every baseline variant, layer-wise, single, then again ...) after all were compiled;
  "TPS range" is the
  TPS of the slowest and fastest run. The 16 simulated devices share the machine's cores:
  these figures say how XLA's CPU runtime executes each SPMD program, not how 16 GPUs would.
- **Baseline variants** (`lwjax.baselines.tp_pp(..., variant=...)`, TP=8 x PP=2): the
  same Megatron TP x GPipe PP written the ways a competent JAX user might
  (`lwjax/baselines_tp_pp.py`): `scan` (shard_map over pp, GSPMD tp, a stage's layers
  stacked and run by `lax.scan`, fill/drain ticks computed -- the baseline before issue
  #15), `unrolled` (per-layer arrays, still computing in the bubble), `shard_map` (per-layer
  arrays, fill/drain ticks skipped by `lax.cond`), `explicit` (shard_map manual over pp and
  tp, explicit psums), `gspmd` (no shard_map: the stages a vmapped axis of a pp-sharded
  state rolled every tick), `*_split` (MoE: every expert's F split over tp instead of whole
  experts per device); the default variant also at other M. Every comparison is against
  the fastest of them measured in the same run.
- **Layer-wise, 1 layer/device**: the seeds' layout, `layerwise_shard(...,
  objective="bottleneck")`: 16 stages of one layer, planned against the host's L2 or, when a
  layer does not fit it, the least capacity that holds one layer per device (the plan says).
  **Layer-wise, default plan**: what `layerwise_shard` does with its defaults
  (`objective="step"`: the layout search picks the stage count, tp per stage and M by the
  shortest projected step, counting the cores the simulated devices share) at the capacity
  of the 1 layer/device row: the host's L2, or the least capacity that holds one layer per
  device (the plan's note says which); where it is the 1 layer/device layout, that row says
  "= the default plan" and is timed once. **Layer-wise, tuned**: the same with
  `tune={TUNE}`: the layout search's {TUNE} best layouts built, each called 1 + 3 times,
  the fastest kept (the search's first choice unless another is 3% faster; the plans
  section quotes what tuning measured, before this table's rounds).
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
    repeats = len(results[0].timings[results[0].best_baseline].times_s)
    lines = []
    for m in results:
        best = m.best_baseline
        lines.append(f"- {model_name(m.kind, m.cfg)}: best baseline variant **{m.labels[best]}** "
                     f"({m.timings[best].ms()} ms; measured), of {len(m.baselines)} measured.")
        for method in ("layerwise", "planned", "tuned"):
            if method not in m.timings:
                continue
            r, lo, hi = m.ratio(method)
            goal = _goal(m, method)
            ok = "meets" if r >= goal else "does NOT meet"
            lines.append(f"- {model_name(m.kind, m.cfg)}, {m.labels[method]}: layer-wise / "
                         f"best baseline tokens/s = **{r:.2f}x** (per-round ratios {lo:.2f}-"
                         f"{hi:.2f}; measured): {ok} the {goal}x goal.")
        lines.append(f"- {model_name(m.kind, m.cfg)}: compile + first call "
                     + ", ".join(f"{k} {v:.1f} s" for k, v in m.compile_s.items()
                                 if k != "tuned") + "."
                     + (f" The tune= call (every candidate planned, built, compiled and "
                        f"timed) took {m.compile_s['tuned']:.1f} s." if "tuned" in m.compile_s
                        else ""))
    plans = []
    for m in results:
        plans.append(f"{model_name(m.kind, m.cfg)}, 1 layer/device: {m.notes['layerwise']}."
                     f"\n\n```\n{m.plans['layerwise']}\n```")
        if "planned" in m.plans and "planned" in m.timings:
            plans.append(f"{model_name(m.kind, m.cfg)}, default plan ({m.notes['planned']}; "
                         f"layerwise_shard's defaults):\n\n```\n{m.plans['planned']}\n```")
        elif "planned" in m.plans:
            plans.append(f"{model_name(m.kind, m.cfg)}: the default plan is the one above "
                         "(same stages, tp and M).")
        else:
            plans.append(f"{model_name(m.kind, m.cfg)}, default plan: "
                         f"{m.notes['planned']}.")
        if "tuned" in m.plans:
            tuned = next(n for n in m.plans["tuned"].splitlines() if "tuned:" in n).strip()
            plans.append(f"{model_name(m.kind, m.cfg)}, tuned (`layerwise_shard(..., "
                         f"tune={TUNE})` at the same capacity): {tuned.removeprefix('- ')}")
    return [
        title,
        f"Models: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
        f"{cfg.head_dim}, dense MLP {4 * cfg.hidden_size} / MoE 8 experts x "
        f"{2 * cfg.hidden_size} top-2, vocab {cfg.vocab_size}, batch {cfg.batch_size} x seq "
        f"{cfg.seq_len}, float32; M = {MICROBATCHES} microbatches unless a row says otherwise; "
        f"median of {repeats} interleaved runs{QUICK_NOTE if quick else ''}. "
        "'TPS / best baseline' is the median of the per-round ratios against the baseline "
        "variant with the shortest median in the same run.\n\n"
        + _common.markdown_table(MEASURED_HEADERS, measured_rows(results), "lllrrrrrrl"),
        "Ratios (same run, interleaved):\n\n" + "\n".join(lines),
        "Layer-wise plans:\n\n" + "\n\n".join(plans),
        "The default plan may use fewer devices than 16: with `objective=\"step\"` the "
        "planner counts the cores the simulated devices share, and fewer stages mean fewer "
        "GPipe ticks and rendezvous. On 16 GPUs that choice would leave devices idle.",
    ]


def breakdown_summary(b: Breakdown) -> str:
    """One device against the baseline and layer-wise, and at the hidden size where layers
    fit the L2, what the 1.3x goal leaves for the pipeline's overhead against what its
    rendezvous alone take (all measured, the breakdown's own run)."""
    t = {k: v.median * 1e3 for k, v in b.timings.items()}
    line = (f"- Where the time goes ({b.kind}, hidden {b.hidden}): the baseline "
            f"(`{b.baseline_variant}` at M = {b.baseline_microbatches}) takes "
            f"{t['baseline'] / t['single']:.2f}x the time of "
            "one device running the whole model, 1 layer/device layer-wise "
            f"{t['layerwise'] / t['single']:.2f}x (measured, the breakdown's own run).")
    if b.hidden == MEASURED_SCALE_FITS_L2:
        budget = t["best_baseline"] / GOAL
        line += (f" For {GOAL}x the best baseline variant "
                 f"(`{b.best_baseline.removeprefix('baseline:')}`, {t['best_baseline']:,.1f} "
                 f"ms in this run), layer-wise would have to finish in "
                 f"{budget:,.1f} ms, {budget - t['single']:+,.1f} ms over one device; its "
                 f"{b.ticks['layerwise']} ticks' per-tick floor takes "
                 f"{t['skeleton_layerwise']:,.1f} ms, of which {t['rendezvous']:,.1f} ms are "
                 f"the bare rendezvous of {b.num_stages} device threads on these cores "
                 f"({t['rendezvous'] / b.ticks['layerwise']:.3f} ms each, "
                 f"{t['rendezvous_2'] / b.ticks['layerwise']:.3f} ms among 2).")
    return line


def summary(tables: Sequence[tuple[str, Sequence[Measured]]],
            breakdowns: Sequence[Breakdown]) -> list[str]:
    """The goal, checked against the figures below (every line computed from them)."""
    lines = []
    for title, results in tables:
        for m in results:
            for method in ("layerwise", "planned", "tuned"):
                if method in m.timings:
                    r, goal = m.ratio(method)[0], _goal(m, method)
                    lines.append(f"- {title.split(':')[0]}, {model_name(m.kind, m.cfg)}, "
                                 f"{m.labels[method].replace(METHODS['layerwise'] + ', ', '')}: "
                                 f"**{r:.2f}x** the best baseline variant's tokens/s "
                                 f"(`{m.best_baseline.removeprefix('baseline:')}`; measured) "
                                 f"-> {goal}x goal {'met' if r >= goal else 'NOT met'}.")
    for b in breakdowns:
        lines.append(breakdown_summary(b))
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
             f"## Summary (goals: lwjax's default plan >= {GOAL_DEFAULT}x the best baseline "
             f"variant's tokens/s everywhere; one layer per device >= {GOAL}x where layers fit "
             "the host L2)",
             "\n".join(summary(tables, breakdowns)),
             "## Definitions", DEFINITIONS.replace("{cpu}", label)]
    for title, results in tables:
        parts += measured_section(f"## {title}: {label}", results, quick)
    for b in breakdowns:
        parts += [f"## Where the time goes: {b.kind}, hidden {b.hidden}, {label}",
                  "Parts timed separately in one interleaved run (medians), against one device "
                  "running the whole model. Parts can overlap in the full run (a device thread "
                  "waiting at a rendezvous frees its core for another device's work); 'rest' "
                  "is what the measured parts leave unexplained.\n\n"
                  + _common.markdown_table(["part", "ms", "figure", "how"], breakdown_rows(b),
                                           "lrll")]
    if vocab_check:
        rows = []
        for m in vocab_check:
            rows.append([str(m.cfg.vocab_size), m.timings[m.best_baseline].ms(),
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
        for method in ("best baseline", "layerwise", "planned", "single"):
            keys = [m.best_baseline if method == "best baseline" else method for m in results]
            if any(k not in m.timings for k, m in zip(keys, results, strict=True)):
                continue
            name = (f"{METHODS['baseline']}, best variant" if method == "best baseline"
                    else results[0].labels[method].replace(" (lwjax)", ""))
            name = name if method != "planned" else name.split(" (")[0]
            series[name] = tuple(m.tps(k) for k, m in zip(keys, results, strict=True))
            errors[name] = tuple(
                tuple(m.tokens / getattr(m.timings[k], end) for k, m in zip(keys, results,
                                                                            strict=True))
                for end in ("max", "min"))
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
