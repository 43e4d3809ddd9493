"""The report of ``experiments/weight_compression.py``: its records as Markdown.

Nothing here measures or projects: every figure comes from ``weight_compression.Result``'s records
(measured or projected, labelled so), and the seed document's claim sits in its own column,
quoted with its file.

Example:
    >>> text = markdown(result, "python experiments/weight_compression.py", quick=False)
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402
import weight_compression as compression  # noqa: E402

MEASURED = "measured (this machine, CPU, {n} simulated devices)"
PROJECTED = f"projected (cost model, {compression.PROJECTED_ON.name}, stored bytes substituted)"


def _measured() -> str:
    import jax

    return MEASURED.format(n=len(jax.devices()))


def _kib(nbytes: float) -> str:
    return f"{nbytes / 2**10:,.1f}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f}"


def _signed_pct(x: float) -> str:
    return f"{x:+.3%}"


def _by_dtype(stage: compression.StageBytes) -> str:
    return ", ".join(f"{dt} {_kib(n)}" for dt, n in stage.by_dtype)


def _seed_positions() -> int:
    from lwjax import models

    return getattr(models.configs, compression.PROJECTED_CONFIG)().seq_len


def _base(records: Sequence, preset: str = "none"):
    return next(r for r in records if r.preset == preset)


def summary_lines(r: compression.Result) -> list[str]:
    """The claim checked, the oracle and the byte check, in words (figures from records)."""
    path, quote, preset, bound = compression.SEED_CLAIM
    base = _base(r.accuracy)
    lines = []
    claimed = [a for a in r.accuracy if a.preset == preset]
    if claimed:
        d, se = claimed[0].degradation(base)
        verdict = "within" if d + 2 * se < bound else ("not within" if d - 2 * se > bound
                                                       else "not resolved against")
        lines.append(
            f"- **{preset}** (the seeds' \"INT8 + 50% sparsity\": int8 weights, 2:4 in the MLP "
            f"layers) changes held-out perplexity by **{_signed_pct(d)}** (+- {2 * se:.3%}, two "
            f"paired standard errors over {len(base.window_nats)} windows): {verdict} the "
            f"claimed < {bound:.1%} (measured). The claim, `{path}`: \"{quote}\".")
        parts = {a.preset: a.degradation(base)[0] for a in r.accuracy}
        if "int8" in parts and "2:4" in parts:
            mlp = dict(claimed[0].weight_error)["MLP"]
            lines.append(
                f"- Its parts: int8 alone {_signed_pct(parts['int8'])}, 2:4 alone "
                f"{_signed_pct(parts['2:4'])} (measured). The pruning is one-shot magnitude "
                f"2:4 with no fine-tuning or calibration (the seed does not say how it pruned): "
                f"it leaves the MLP weights {mlp:.0%} off in relative norm, where int8 leaves "
                f"them {dict(_base(r.accuracy, 'int8').weight_error)['MLP']:.1%} off.")
    worst = max(r.accuracy, key=lambda a: a.agreement)
    lines.append(
        f"- Every preset's pipeline (weights stored compressed on {r.scale.stages} devices, "
        f"decoded inside the stage) equals the same model holding `sm.export_params()` on one "
        f"device: largest mean-loss difference {worst.agreement:.1e} nats ({worst.preset}), "
        f"tolerance {compression.AGREE_NATS:g} (measured).")
    stages = [s for a in r.accuracy for s in a.stages] + \
        [s for d in r.decode for s in d.stage_bytes]
    worst_b = max(stages, key=lambda s: abs(s.own_vs_plan))
    lines.append(
        f"- Stored bytes per device, read from the placed arrays, equal the plan's weights bytes "
        f"within {abs(worst_b.own_vs_plan):.2%} on all {len(stages)} stages of every run "
        f"(tolerance {compression.BYTES_TOLERANCE:.0%}; measured).")
    for label, recs, attr in (("the accuracy pipelines", r.accuracy, "stages"),
                              ("the decode programs", r.decode, "stage_bytes")):
        pad = max(((rec.preset, s) for rec in recs for s in getattr(rec, attr)),
                  key=lambda x: x[1].allocated_bytes / x[1].own_placed_bytes)
        preset, s = pad
        lines.append(
            f"- But every device also allocates rows of the slots it does not use: in "
            f"{label} a device allocates up to {s.allocated_bytes / s.own_placed_bytes - 1:.0%} "
            f"more than its own stored weights ({preset}, stage {s.stage}: "
            f"{s.allocated_bytes:,} bytes for {s.own_placed_bytes:,}; the embedding's and LM "
            "head's slots are padded on every stage), which the plan does not count "
            "(measured).")
    none_d = _base(r.decode)
    ratios = ", ".join(f"{d.preset} {d.decode_tps / none_d.decode_tps:.2f}x"
                       for d in r.decode[1:])
    lines.append(f"- Decode tokens/s on {r.decode[0].stages} simulated devices, / none's "
                 f"({_common.tps(none_d.decode_tps)}): {ratios} (measured, CPU: a compressed stage "
                 "decodes its weights inside its computation; below 1.00x that work costs more "
                 "here than the bytes it saves; the ratios vary from run to run on shared "
                 "cores).")
    none_p = _base(r.projected)
    best = max(r.projected, key=lambda p: p.tps)
    share = none_p.block_bytes / (none_p.block_bytes + none_p.block_activation_bytes)
    lines.append(
        f"- Projected for {compression.PROJECTED_CONFIG} on {compression.PROJECTED_ON.name} "
        f"(16 stages, ring, best M): {best.preset} gives {best.tps / none_p.tps:.2f}x none's "
        f"decode tokens/s ({_common.tps(best.tps)} vs {_common.tps(none_p.tps)}) -- bytes "
        f"moved, not FLOPs. At most this: a block's weights are {share:.0%} of the bytes it "
        f"moves per tick uncompressed, the rest is the KV cache of "
        f"{_common.tps(r.projected[0].block_activation_bytes / 2**20)} MiB read from HBM, "
        "which compression leaves as it is (projected).")
    return lines


def accuracy_table(r: compression.Result) -> str:
    base = _base(r.accuracy)
    _, quote, claim_preset, _ = compression.SEED_CLAIM
    rows = []
    for a in r.accuracy:
        d, se = a.degradation(base)
        rows.append([
            a.preset, _kib(a.stored_bytes), f"{a.stored_bytes / base.stored_bytes:.3f}",
            f"{a.nats:.5f}", f"{a.single_nats:.5f}", f"{a.agreement:.1e}",
            f"{a.bits_per_byte:.4f}", f"{a.perplexity:.4f}",
            " / ".join(f"{e:.3f}" for _, e in a.weight_error),
            "--" if a is base else _signed_pct(d), "--" if a is base else f"{2 * se:.3%}",
            "< 0.1% (seed 000)" if a.preset == claim_preset else "--", _measured()])
    return _common.markdown_table(
        ["preset", "stored weights (KiB, all stages)", "/ none", "loss, pipeline (nats/byte)",
         "loss, one device (export_params)", "abs difference", "bits/byte", "perplexity",
         "weight error " + " / ".join(g for g, _ in compression.WEIGHT_GROUPS),
         "perplexity change vs none", "+- 2 SE (paired)", "claimed change", "figure"],
        rows, "lrrrrrrrrrrll")


def bytes_table(records: Sequence, attr: str) -> str:
    rows = []
    for rec in records:
        for s in getattr(rec, attr):
            rows.append([
                rec.preset, str(s.stage), str(s.device), s.layers, f"{s.own_bytes:,}",
                f"{s.own_placed_bytes:,}", f"{s.allocated_bytes:,}",
                f"{s.allocated_bytes - s.own_placed_bytes:,}", f"{s.plan_bytes:,}",
                f"{s.own_vs_plan:+.2%}", _by_dtype(s), _measured()])
    return _common.markdown_table(
        ["preset", "stage", "device", "layers", "own bytes (storage.own_bytes)",
         "own bytes (placed shards)", "allocated on the device (all slots)", "padding rows",
         "plan weights_bytes", "own / plan - 1", "own KiB by stored dtype", "figure"],
        rows, "lrrlrrrrrrll")


def decode_bytes_table(r: compression.Result) -> str:
    """Decode runs: per preset the range over its stages (the full per-stage rows would be
    16 per preset)."""
    rows = []
    for d in r.decode:
        st = d.stage_bytes
        own = [s.own_placed_bytes for s in st]
        alloc = [s.allocated_bytes for s in st]
        rows.append([d.preset, str(len(st)), f"{min(own):,} - {max(own):,}",
                     f"{min(alloc):,} - {max(alloc):,}",
                     f"{min(s.plan_bytes for s in st):,} - {max(s.plan_bytes for s in st):,}",
                     f"{max(abs(s.own_vs_plan) for s in st):.2%}", _measured()])
    return _common.markdown_table(
        ["preset", "stages", "own bytes per device (min - max)",
         "allocated per device (min - max)", "plan weights_bytes (min - max)",
         "largest abs(own / plan - 1)", "figure"], rows, "lrrrrrl")


def decode_table(r: compression.Result) -> str:
    base = _base(r.decode)
    rows = []
    for d in r.decode:
        rows.append([
            d.preset, f"{d.stages} x 1", str(d.microbatches), d.t_new.ms(), d.t_one.ms(),
            _common.ms(d.tpot_ms), _common.tps(d.decode_tps), _common.tps(d.e2e_tps),
            f"{d.decode_tps / base.decode_tps:.2f}x",
            _kib(max(s.own_placed_bytes for s in d.stage_bytes)), f"{d.build_s:.1f}",
            f"{d.first_call_s:.1f}", "yes" if d.tokens_match else "NO", _measured()])
    return _common.markdown_table(
        ["preset", "stages x tp", "M", "t(N) ms, median (min-max)", "t(1) ms, median (min-max)",
         "TPOT (ms)", "decode tokens/s", "end-to-end tokens/s", "/ none",
         "largest stage's stored KiB", "build (s)", "first call (s)",
         "tokens == models.generate (decoded weights)", "figure"],
        rows, "llrrrrrrrrrrll")


def projected_table(r: compression.Result) -> str:
    base = _base(r.projected)
    rows = []
    for p in r.projected:
        rows.append([
            p.preset, _mib(p.block_bytes), _mib(p.head_bytes), _mib(p.embed_bytes),
            "yes" if p.weights_in_l2 else "no (HBM)", f"{p.plan_stage_ms:.3f}",
            str(p.microbatches), f"{p.tick_ms:.4f}", _common.ms(p.tpot_ms), _common.tps(p.tps),
            f"{p.tps / base.tps:.2f}x", PROJECTED])
    return _common.markdown_table(
        ["preset", "block stored MiB", "head stored MiB", "embedding MiB",
         f"busiest stage's weights in L2 ({_mib(compression.PROJECTED_ON.l2_bytes)} MiB)",
         "planner est ms (slowest stage, compression not priced)", "best M", "tick ms",
         "TPOT (ms)", "tokens/s", "/ none", "figure"], rows, "lrrrlrrrrrrl")


def markdown(r: compression.Result, command: str, quick: bool = False) -> str:
    s = r.scale
    title = "Compression that runs: accuracy, stored bytes, decode" + (" (--quick)" if quick
                                                                       else "")
    parts = [
        _common.header(title, compression.SCRIPT, command),
        *summary_lines(r),
        "",
        "## Run",
        "",
        _common.markdown_table(["", ""], [
            ["machine", _common.machine_line()],
            ["model (accuracy)", r.model],
            ["held-out text", r.heldout],
            ["accuracy pipeline", f"`lwjax.layerwise_shard(model, x, compression=preset)`, "
                                  f"{s.stages} stages x 1 device, M = {s.microbatches}, "
                                  f"{s.batch} windows per call"],
            ["decode model", r.decode_config],
            ["decode pipeline", f"`lwjax.layerwise_generate(..., compression=preset)`, "
                                f"{s.decode_stages} stages x 1 device, M = {s.decode_stages}, "
                                f"{r.scale.repeats} interleaved rounds (medians)"],
            ["wall time", f"{r.wall_s:.0f} s (measure and project; report excluded)"],
        ]),
        "",
        "The codecs (`passes/codec.py`): int8 / int4 weight-only quantisation with one float16 "
        "scale per output channel of the weight's matmul (round to nearest of w / scale, "
        "scale = max abs w / 127 or / 7; int4 packed two per byte); 2:4 and 1:4 "
        "(`int4-75%`) magnitude pruning of the MLP weights along the contracted dimension, "
        "stored as the kept values plus a 2-bit index each. Norm scales and the embedding "
        "(read by a gather) stay float32; the LM head is quantised, not pruned. Every weight "
        "is decoded inside its stage's computation before a dense dot: no XLA path uses "
        "sparse tensor cores (JAX issue 19212), so sparsity saves stored bytes and bytes "
        "moved, never FLOPs.",
        "",
        f"## Held-out accuracy: {_measured()}",
        "",
        "Perplexity = exp(mean nats per byte) over the windows; the change vs none is "
        "exp(mean paired per-window difference) - 1, with two standard errors of that mean. "
        "The model's baseline is float32 (the seed's baseline is FP16). Weight error: "
        "||w_run - w|| / ||w|| over each group's weights, w_run from `sm.export_params()`.",
        "",
        accuracy_table(r),
        "",
        f"## Stored weight bytes per device, accuracy pipelines ({s.stages} stages): "
        f"{_measured()}",
        "",
        "Own bytes: the stage's rows of the slots holding its stored arrays (values, packed "
        "indices, scales), read from the placed arrays' shards on its device; allocated: every "
        "slot array's shard on that device. Slots are shared by stages by (dtype, size), so "
        "a stage holding fewer arrays of a kind (here the middle stages, without the "
        "embedding and head) still allocates a zero row in the slots the others use: the "
        "padding column.",
        "",
        bytes_table(r.accuracy, "stages"),
        "",
        f"## Decode: {_measured()}",
        "",
        "TPOT = (t(N) - t(1)) / (N - 1); decode tokens/s = B / TPOT; end-to-end = B x N / "
        "t(N). A compressed stage decodes (dequantises, expands the 2:4 indices) its weights "
        "inside its computation, work an uncompressed stage does not do; what that costs or "
        "saves on a CPU is what this table measures.",
        "",
        decode_table(r),
        "",
        "Stored bytes of the decode programs, per device:",
        "",
        decode_bytes_table(r),
        "",
        f"## Projected decode, {compression.PROJECTED_CONFIG} on "
        f"{compression.PROJECTED_ON.name}",
        "",
        "The cost model (`passes/cost.py`) has no compression parameter, and the planner's "
        "`est ms` prices the traced (uncompressed) program: it is the same for every preset "
        "(column 6). The projection therefore takes each preset's stored bytes per block, "
        "head and embedding from `lwjax.plan(..., compression=preset, mode=\"decode\", "
        "hardware=\"h100\")` and substitutes them into the cost model's ring decode (16 "
        f"stages, one block each, KV cache of the seed's {_seed_positions():,} positions, best "
        "M): bytes moved, not FLOPs (no XLA path uses sparse tensor cores, JAX issue 19212), "
        "and the dequantisation's own work is not counted -- a lower bound on the time. "
        "none's row is `cost.project_decode`'s figure (decode.md).",
        "",
        projected_table(r),
        "",
    ]
    return "\n".join(parts)
