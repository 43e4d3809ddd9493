"""The report of ``experiments/decode.py``: its records as Markdown tables and a bar figure.

Nothing here measures or projects: every figure comes from ``decode.ModelResult`` (measured)
and ``decode.ProjectedResult`` (projected) records, and the seed documents' claims sit in
their own columns, labelled as claims.

Example:
    >>> text = markdown(measured, projected, "python experiments/decode.py", quick=False)
    >>> figure(measured, projected, pathlib.Path("experiments/out/decode.png"))
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402
import decode  # noqa: E402

MEASURED_LABEL = "measured (this machine, CPU, {n} simulated devices)"
PROJECTED_LABEL = f"projected (cost model, {decode.PROJECTED_ON.name})"
NAMES = {"dense": "Dense", "moe": "MoE"}


def measured_label() -> str:
    import jax

    return MEASURED_LABEL.format(n=len(jax.devices()))


def _ratio(a: decode.MethodResult | None, b: decode.MethodResult | None) -> float | None:
    """Decode tokens/s of ``a`` over ``b`` (same run), None when either is missing."""
    return None if a is None or b is None else a.decode_tps / b.decode_tps


def _x(value: float | None) -> str:
    return "--" if value is None else f"{value:.2f}x"


def headline(r: decode.ModelResult) -> list[tuple[str, decode.MethodResult]]:
    """(row name, method) of each method at its best configuration: the default plan, the best
    swept layer-wise plan, TP=8 x PP=2 at its best M, each other TP x PP layout, one device."""
    rows = []
    for name, m in (("Layer-wise, default plan", r.best("layerwise_default")),
                    ("Layer-wise, best of the sweep", r.best("layerwise")),
                    ("TP=8 x PP=2, best M", r.best("tp_pp", decode.BASELINE))):
        if m is not None:
            rows.append((name, m))
    layouts: dict[tuple[int, int], list[int]] = {}
    for m in r.family("tp_pp"):
        layouts.setdefault((m.tp, m.stages), []).append(m.microbatches)
    for layout, counts in layouts.items():
        m = r.best("tp_pp", layout)
        if layout != decode.BASELINE and m is not None:
            tried = "best M" if len(counts) > 1 else f"M={counts[0]} only"
            rows.append((f"TP={layout[0]} x PP={layout[1]}, {tried}", m))
    single = r.best("single")
    if single is not None:
        rows.append(("Single device", single))
    return rows


def best_tp_pp(r: decode.ModelResult) -> decode.MethodResult | None:
    return r.best("tp_pp")


def summary_lines(measured: Sequence[decode.ModelResult],
                  projected: Sequence[decode.ProjectedResult]) -> list[str]:
    """The goal checked against the measured records, then the projections' ratios."""
    lines = []
    for r in measured:
        base, any_tp = r.best("tp_pp", decode.BASELINE), best_tp_pp(r)
        for name, m in (("default plan", r.best("layerwise_default")),
                        ("best swept plan", r.best("layerwise"))):
            if m is None or base is None:
                continue
            ratio = _ratio(m, base)
            verdict = "met" if ratio >= decode.GOAL else "NOT met"
            lines.append(
                f"- {NAMES[r.kind]}, layer-wise {name} ({m.label.split('(')[-1].rstrip(')')}"
                f"): {m.decode_tps:,.0f} decode tokens/s = **{ratio:.2f}x** TP=8 x PP=2 at its "
                f"best M ({base.label}, {base.decode_tps:,.0f}) and {_x(_ratio(m, any_tp))} the "
                f"best TP x PP ({any_tp.label}) -> goal {verdict} (measured).")
        bad = [m.label for m in r.methods if not m.tokens_match]
        if bad:
            lines.append(f"- {NAMES[r.kind]}: tokens differ from models.generate for "
                         f"{', '.join(bad)} (left out of every 'best').")
    for p in projected:
        lw, tp = p.layerwise, p.tp_pp
        lines.append(f"- {p.config}: layer-wise ring (M={lw.microbatches}) / TP=8 x PP=2 GPipe "
                     f"(M={tp.microbatches}) decode tokens/s = {lw.tps / tp.tps:.2f} (projected, "
                     f"{decode.PROJECTED_ON.name}).")
    return lines


def headline_table(measured: Sequence[decode.ModelResult]) -> str:
    rows = []
    for r in measured:
        base, any_tp = r.best("tp_pp", decode.BASELINE), best_tp_pp(r)
        for name, m in headline(r):
            rows.append([NAMES[r.kind], name, m.label, str(m.devices), _common.ms(m.tpot_ms),
                         _common.tps(m.decode_tps), _common.tps(m.e2e_tps),
                         _x(_ratio(m, base)), _x(_ratio(m, any_tp)),
                         f"{m.first_call_s:.1f}", "yes" if m.tokens_match else "NO",
                         _common.MEASURED])
    return _common.markdown_table(
        ["Model", "Method", "configuration", "devices", "TPOT (ms)", "decode tokens/s",
         "end-to-end tokens/s", "/ TP=8 x PP=2", "/ best TP x PP", "first call (s)",
         "tokens == reference", "figure"], rows, "lllrrrrrrrll")


def sweep_table(measured: Sequence[decode.ModelResult]) -> str:
    rows = []
    for r in measured:
        for m in r.methods:
            rows.append([
                NAMES[r.kind], m.label, f"{m.stages} x tp={m.tp}", str(m.microbatches),
                str(m.period_ticks), m.t_new.ms(), m.t_one.ms(), _common.ms(m.tpot_ms),
                _common.tps(m.decode_tps), _common.tps(m.e2e_tps), f"{m.build_s:.1f}",
                f"{m.first_call_s:.1f}", "--" if m.compile_s is None else f"{m.compile_s:.1f}",
                "yes" if m.tokens_match else "NO", _common.MEASURED])
    return _common.markdown_table(
        ["Model", "Method", "stages x tp", "M", "ticks / token", "t(N) ms, median (min-max)",
         "t(1) ms, median (min-max)", "TPOT (ms)", "decode tokens/s", "end-to-end tokens/s",
         "build (s)", "first call (s)", "compile (s, lwjax)", "tokens == reference",
         "figure"], rows, "lllrrrrrrrrrrll")


def tick_table(measured: Sequence[decode.ModelResult]) -> str:
    """Per decode tick: the measured time, and what one device's compute would give it."""
    rows = []
    for r in measured:
        single = r.best("single")
        lw = r.family("layerwise_default") + r.family("layerwise")
        tp = [m for m in r.family("tp_pp") if (m.tp, m.stages) == decode.BASELINE]
        for m in lw + tp:
            share = single.tpot_ms / m.period_ticks if single else None
            rows.append([
                NAMES[r.kind], m.label, str(m.decode_ticks), f"{m.decode_s * 1e3:,.1f}",
                f"{m.tick_ms:.3f}", "--" if share is None else f"{share:.3f}",
                "--" if share is None else f"{m.tick_ms - share:.3f}",
                "--" if share is None else f"{share / m.tick_ms:.0%}", _common.MEASURED])
    return _common.markdown_table(
        ["Model", "Method", "decode ticks", "decode ms (t(N) - t(1))", "ms / tick",
         "one-device compute / tick (estimate)", "rest / tick (estimate)", "compute share",
         "figure"], rows, "llrrrrrrl")


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f}"


def projected_table(projected: Sequence[decode.ProjectedResult]) -> str:
    rows = []
    for p in projected:
        for name, c in (("Layer-wise ring", p.layerwise), ("TP=8 x PP=2 GPipe", p.tp_pp)):
            kv = _gib(c.kv_bytes_per_device) + (" (> HBM)" if c.kv_bytes_per_device > p.hbm_bytes
                                                else "")
            rows.append([
                p.config, name, f"{len(c.layers_per_stage)} x tp={c.tp}", str(c.microbatches),
                str(c.period_ticks), f"{c.tick_ms:.3f}", f"{c.slowest_stage_ms:.3f}",
                f"{c.transfer_ms:.4f}", f"{c.outside_ms:.3f}", _common.pct(c.bubble),
                _common.ms(c.tpot_ms), _common.tps(c.tps),
                f"{c.tps / p.tp_pp.tps:.2f}", kv, f"{c.prefill_ms:,.0f}", _common.PROJECTED])
    return _common.markdown_table(
        ["config", "Method", "stages x tp", "best M", "ticks / token", "tick ms",
         "slowest stage ms", "transfer ms", "outside ms", "bubble", "TPOT (ms)", "tokens/s",
         "/ TP=8 x PP=2", "KV GiB / device", "prefill ms", "figure"], rows,
        "lllrrrrrrrrrrrrl")


def _change(a: float, b: float) -> str:
    return f"{a / b - 1:+.0%}"


def claims_table(measured: Sequence[decode.ModelResult],
                 projected: Sequence[decode.ProjectedResult]) -> str:
    """The seeds' TPOT claims beside lwjax's measured and projected figures (own columns)."""
    by_kind = {r.kind: r for r in measured}
    proj = {p.kind: p for p in projected if p.config.startswith("seed_")}
    claims = {(c.kind, c.method): c for c in decode.CLAIMS}
    rows = []
    for kind in ("dense", "moe"):
        r, p = by_kind.get(kind), proj.get(kind)
        ours = {"tp_pp": r.best("tp_pp", decode.BASELINE) if r else None,
                "layerwise": r.best("layerwise") if r else None}
        mine = {"tp_pp": p.tp_pp if p else None, "layerwise": p.layerwise if p else None}
        for method, name in (("tp_pp", "TP=8 x PP=2"), ("layerwise", "Layer-wise")):
            c, m, q = claims[kind, method], ours[method], mine[method]
            change = ["--"] * 3
            if method == "layerwise":
                base_c = claims[kind, "tp_pp"]
                change[0] = _change(c.tpot_ms, base_c.tpot_ms)
                if m is not None and ours["tp_pp"] is not None:
                    change[1] = _change(m.tpot_ms, ours["tp_pp"].tpot_ms)
                if q is not None:
                    change[2] = _change(q.tpot_ms, mine["tp_pp"].tpot_ms)
            rows.append([
                NAMES[kind], name, c.source, _common.tps(c.tps), _common.ms(c.tpot_ms),
                change[0],
                "--" if m is None else _common.ms(m.tpot_ms),
                "--" if m is None else _common.ms(1e3 / m.decode_tps), change[1],
                "--" if q is None else _common.ms(q.tpot_ms),
                "--" if q is None else _common.ms(1e3 / q.tps), change[2]])
    return _common.markdown_table(
        ["Model", "Method", "claimed by seed", "claimed TPS", "claimed TPOT (ms)",
         "claimed TPOT change", "measured TPOT (ms)", "measured 1000 / tokens/s (ms)",
         "measured TPOT change", "projected TPOT (ms), seed_*",
         "projected 1000 / tokens/s (ms)", "projected TPOT change"], rows, "lllrrrrrrrrr")


def disagreements(measured: Sequence[decode.ModelResult],
                  projected: Sequence[decode.ProjectedResult]) -> list[str]:
    """One sentence per disagreement with the claims, its numbers taken from the records."""
    c = {(x.kind, x.method): x for x in decode.CLAIMS}
    lines = [
        f"- **Definition.** The seeds' TPOT is 1000 / TPS: {c['dense', 'tp_pp'].tps:,.0f} x "
        f"{c['dense', 'tp_pp'].tpot_ms} ms = "
        f"{c['dense', 'tp_pp'].tps * c['dense', 'tp_pp'].tpot_ms / 1e3:.2f} s, and so for every "
        "row: the time per token of the whole batch's stream. lwjax's TPOT is the time between "
        "two tokens of one sequence, B times longer; the '1000 / tokens/s' columns put lwjax's "
        "figures in the seeds' definition. The TPOT change is the same in both."]
    for p in projected:
        if not p.config.startswith("seed_"):
            continue
        lw, tp = p.layerwise, p.tp_pp
        claimed = decode.CLAIMED_TPOT_CHANGE[p.kind]
        change = lw.tpot_ms / tp.tpot_ms - 1
        why = (
            "the ring reads all experts of a layer on one device every tick (a MoE layer's "
            "weights are the largest per-device read), while TP=8 splits the experts over 8 "
            "devices and each reads an eighth; the GPipe bubble the ring avoids "
            f"({tp.bubble:.0%} at M={tp.microbatches}) does not make up for it"
            if p.kind == "moe" else
            f"the ring has no bubble (M={lw.microbatches} = S) while GPipe's best M="
            f"{tp.microbatches} idles {tp.bubble:.0%} of its ticks, and no layer's weights fit "
            f"the {decode.PROJECTED_ON.l2_bytes / 2**20:.0f} MiB L2 in either layout, so the "
            "gain comes from the schedule, not from the L2 the seeds credit")
        lines.append(
            f"- **{p.config}, projected:** layer-wise TPOT {change:+.0%} vs TP=8 x PP=2 "
            f"(claimed {claimed:+.0%}): {why}. Absolute TPOT: {lw.tpot_ms:.2f} ms per sequence "
            f"({1e3 / lw.tps:.3f} ms in the seeds' definition) vs the claimed "
            f"{c[p.kind, 'layerwise'].tpot_ms} ms: at batch {p.batch} and a {p.seq_len:,}-"
            "position KV cache per sequence, a decode step reads every layer's weights and "
            f"{_gib(lw.kv_bytes_per_device)} GiB of KV cache per device from HBM.")
    for p in projected:
        if p.layerwise.kv_bytes_per_device > p.hbm_bytes:
            lines.append(
                f"- **{p.config}** (seed 004's own dimensions, batch {p.batch}): with a "
                f"{p.seq_len:,}-position cache per sequence (the length lwjax's seed004_* "
                "configs take from seeds 000/001; seed 004 states none) the KV cache alone is "
                f"{_gib(p.layerwise.kv_bytes_per_device)} GiB per device, beyond the "
                f"{p.hbm_bytes / 1e9:.0f} GB of HBM in both layouts, so this projection is not "
                "a runnable deployment; seed 004's table must assume far shorter sequences.")
    for r in measured:
        lw, tp, single = r.best("layerwise"), r.best("tp_pp", decode.BASELINE), r.best("single")
        if lw is None or tp is None or single is None:
            continue
        change = lw.tpot_ms / tp.tpot_ms - 1

        def rest(m: decode.MethodResult, single: decode.MethodResult = single) -> float:
            return m.tick_ms - single.tpot_ms / m.period_ticks  # Table 3's estimate

        lines.append(
            f"- **{NAMES[r.kind]}, measured on this CPU:** layer-wise TPOT {change:+.0%} vs "
            f"TP=8 x PP=2 (claimed {decode.CLAIMED_TPOT_CHANGE[r.kind]:+.0%}), for another "
            f"reason than the seeds give: TP=8 x PP=2 ({tp.label}) pays {tp.tick_ms:.2f} ms per "
            f"GPipe tick, about {rest(tp):.2f} ms of it beyond one device's compute (Table 3: "
            "its TP all-reduces, two per layer, across 8 device threads on shared cores), "
            f"{tp.period_ticks} ticks per token; the ring ({lw.label}) pays {lw.tick_ms:.2f} ms "
            f"per tick, about {rest(lw):.2f} ms beyond compute, {lw.period_ticks} ticks per "
            "token. This measures synchronisation on shared cores, not L2 residency (the swept "
            "plans ignore the L2: cache_bytes = 2**30).")
    lines.append(f"- Also quoted, not comparable: {decode.SEED_002}.")
    return lines


DEFINITIONS = """\
- **measured**: {measured}. Each generator is built for N new tokens and for 1 with the same
  arguments (layer-wise: the same M; where that plans other stages, the N-token plan itself,
  noted under Table 2); all calls of a model run interleaved (a, b, c, a, b, c, ...) after one
  warm-up round; t(k) is the median of one generator's calls.
- **TPOT** (time per output token): time between two tokens of one sequence,
  (t(N) - t(1)) / (N - 1): the prompt's prefill and the first token are subtracted. A
  1-token generator holds a KV cache of T + 1 positions where its N-token one holds T + N, so
  t(1)'s prefill attends over fewer positions, for every method alike (a bias against all of
  them of at most that prefill difference / (N - 1)).
- **decode tokens/s** = B / TPOT; **end-to-end tokens/s** = B * N / t(N), prefill included.
- **ticks / token**: ring decode max(M, S); GPipe decode M + PP - 1 (the baseline fills and
  drains its pipeline for every token); one device: 1 (a step).
- **ms / tick** = (t(N) - t(1)) / decode ticks. **one-device compute / tick** (estimate) = the
  single-device TPOT / ticks per token: the share of one whole-batch step each tick would take
  if the ticks only ran the model's compute, one stage after another on the shared cores. The
  rest is the per-tick floor (dispatch, ppermute, rendezvous of the device threads).
- **first call**: compile + one run of the N-token program; **compile (lwjax)**:
  `Generator.compile_seconds`. **build**: constructing both generators (trace, plan, place).
- **projected**: `lwjax.passes.cost.project_decode_comparison` for {projected}: layer-wise
  ring over 16 one-layer stages vs TP=8 x PP=2 GPipe, each at its best M over the divisors of
  the batch; KV cache of seq_len positions from HBM; weights from L2 only where a device's
  share fits it (no seed layer does).
- **claimed**: figures the seed documents state, in their own columns; never lwjax's results.
"""


def markdown(measured: Sequence[decode.ModelResult],
             projected: Sequence[decode.ProjectedResult], command: str,
             quick: bool = False) -> str:
    """The whole report: summary, definitions, measured tables, projected tables, claims."""
    label = measured_label()
    first = measured[0] if measured else None
    sizes = "" if first is None else (
        f"B = {first.batch} prompts of T = {first.prompt_len} tokens, N = {first.new_tokens} new "
        f"tokens, median of {first.repeats} interleaved rounds{' (--quick)' if quick else ''}. "
        + " ".join(f"{NAMES[r.kind]}: {r.config}." for r in measured))
    skipped = [f"- {NAMES[r.kind]}: {s}" for r in measured for s in r.skipped]
    notes = [f"- {NAMES[r.kind]}, {m.label}: {m.note}" for r in measured for m in r.methods
             if m.note]
    plans = [f"{NAMES[r.kind]}, {m.label}:\n\n```\n{m.plan}\n```"
             for r in measured for m in r.family("layerwise_default")]
    walls = ", ".join(f"{NAMES[r.kind]} {r.measure_s:.0f} s" for r in measured)
    parts = [
        _common.header("Decode: layer-wise ring vs TP x PP (TPOT, tokens/s)", decode.SCRIPT,
                       command),
        f"## Summary (the tracker's goal: layer-wise decode tokens/s >= {decode.GOAL}x "
        "TP=8 x PP=2 at equal batch)",
        "\n".join(summary_lines(measured, projected)),
        "## Definitions",
        DEFINITIONS.format(measured=label, projected=PROJECTED_LABEL),
        f"## Table 1: each method at its best configuration, {label}",
        f"{sizes} Ratios are decode tokens/s over TP=8 x PP=2 at its best M and over the best "
        f"TP x PP layout, all from the same run.\n\n" + headline_table(measured),
        f"## Table 2: every configuration, {label}",
        sweep_table(measured) + ("\n\nNot run:\n\n" + "\n".join(skipped) if skipped else "")
        + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else "")
        + f"\n\nWall time of the measurement (build, compile, check, time): {walls}.",
        f"## Table 3: time per decode tick, {label}",
        "Layer-wise plans against TP=8 x PP=2. A ring tick that costs about the same at "
        "every S while the compute per tick shrinks is the per-tick floor of this machine.\n\n"
        + tick_table(measured),
        f"## Table 4: {PROJECTED_LABEL}, seed dimensions",
        "seed_dense / seed_moe: 16 layers, hidden 4096, 32 x 128 heads, MLP 16384 (MoE: 8 "
        "experts, top-2), batch 128, KV cache of 10,000 positions, FP16; seed004_*: seed 004's "
        "own dimensions (16 x 512 heads, MLP 32768, batch 1024).\n\n"
        + projected_table(projected),
        "## Table 5: TPOT beside the seed documents' claims",
        "The seeds' TPS and TPOT (seed 004's table; seeds 000 and 001 state the dense rows "
        "for seed_dense's dimensions) in their own columns, then lwjax's measured figures "
        "(this CPU, tiny models: Table 1's best swept layer-wise plan and TP=8 x PP=2 at its "
        "best M) and projected ones (seed_dense / seed_moe, Table 4). The measured and claimed "
        "figures are for different models and machines; only the TPOT change compares.\n\n"
        + claims_table(measured, projected),
        "Why they disagree:\n\n" + "\n".join(disagreements(measured, projected)),
    ]
    if plans:
        parts += ["## The default layer-wise plans", "\n\n".join(plans)]
    return "\n\n".join(parts) + "\n"


def figure(measured: Sequence[decode.ModelResult],
           projected: Sequence[decode.ProjectedResult], path: pathlib.Path) -> pathlib.Path:
    """Bars of decode and end-to-end tokens/s per method (one measured panel per model), then
    the projections beside the seeds' claimed TPS."""
    panels = []
    for r in measured:
        rows = headline(r)
        groups = tuple(name.replace(", best of the sweep", "\nbest swept")
                       .replace(", default plan", "\ndefault").replace(", best M", "")
                       .replace(", M=1 only", "")
                       for name, _ in rows)
        panels.append(_common.Panel(
            f"{NAMES[r.kind]}: {measured_label()}\nB={r.batch}, T={r.prompt_len}, "
            f"N={r.new_tokens}", groups,
            {"decode tokens/s (measured)": tuple(m.decode_tps for _, m in rows),
             "end-to-end tokens/s (measured)": tuple(m.e2e_tps for _, m in rows)},
            "tokens/s (measured)"))
    seeds = [p for p in projected if p.config.startswith("seed_")]
    claims = {(c.kind, c.method): c.tps for c in decode.CLAIMS}
    panels.append(_common.Panel(
        f"{PROJECTED_LABEL}\nseed dims, each at its best M", tuple(p.config for p in seeds),
        {"Layer-wise ring (projected)": tuple(p.layerwise.tps for p in seeds),
         "TP=8 x PP=2 (projected)": tuple(p.tp_pp.tps for p in seeds),
         "Layer-wise: claimed (seeds)": tuple(claims[p.kind, "layerwise"] for p in seeds),
         "TP=8 x PP=2: claimed (seeds)": tuple(claims[p.kind, "tp_pp"] for p in seeds)},
        "decode tokens/s (log)", log=True))
    return _common.bar_panels(path, panels, "Decode: layer-wise ring vs TP x PP")
