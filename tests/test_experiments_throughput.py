"""experiments/throughput.py, scaling.py and cost_check.py: their pure pieces, a tiny run."""

import dataclasses
import datetime
import os

import flax
import jax
import numpy as np
import pytest
from _experiments import load_experiment

from lwjax import baselines, baselines_tp_pp, hardware, models
from lwjax.passes import cost

H100 = hardware.H100_SXM


# under their own names: cost_check imports throughput, and every script imports _common
common = load_experiment("_common")
throughput = load_experiment("throughput")
throughput_report = load_experiment("throughput_report")
scaling = load_experiment("scaling")
cost_check = load_experiment("cost_check")


def _table_rows(markdown: str) -> list[str]:
    """Body rows of every markdown table in ``markdown``."""
    rows = []
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i > 0 and lines[i - 1].startswith("| ") and \
                not set(line) <= set("|-: "):
            rows.append(line)
    return [r for r in rows if not r.startswith("| ---")]


# ---- projected (pure) ----------------------------------------------------------------------


def test_projected_rows_are_the_cost_model_with_seed_004_claims_beside():
    rows = throughput.projected_rows()
    dense, moe = models.configs.seed_dense(), models.configs.seed_moe()
    assert [r.projection for r in rows] == [
        cost.project_tp_pp(dense, H100, 8, 2, 8),
        cost.project_layerwise(dense, H100, [1] * 16, 8),
        cost.project_tp_pp(moe, H100, 8, 2, 8),
        cost.project_layerwise(moe, H100, [1] * 16, 8),
    ]
    assert [(r.claimed_tps, r.claimed_tpot_ms) for r in rows] == [
        (12_800, 0.078), (15_360, 0.065), (10_200, 0.098), (13_400, 0.075)]
    # seed 000's extra columns are claims for the dense model only
    assert [(r.claimed_hit, r.claimed_efficiency) for r in rows] == [
        (0.23, 0.15), (0.985, 0.99), (None, None), (None, None)]
    for r in rows:
        assert r.projection.tpot_ms == pytest.approx(1000 / r.projection.tps)
    # A seed_dense block holds 4*4096^2 + 3*4096*16384 FP16 weights = 512 MiB: 64 MiB per tp=8
    # device, 8 blocks a stage; one block per layer-wise device. Neither fits 50 MiB of L2.
    assert all(r.hit_rate == 0 and r.memory_efficiency == 0 for r in rows)


def test_projected_table_labels_every_figure_and_shows_the_claims():
    table = throughput_report.projected_table(throughput.projected_rows())
    body = _table_rows(table)
    assert len(body) == 4
    assert all("| projected |" in row for row in body)
    header = table.splitlines()[0]
    assert "claimed TPS (seed 004)" in header and "claimed cache hit (seed 000)" in header
    for claim in ("12,800", "15,360", "10,200", "13,400", "0.078", "0.065", "23.0%", "98.5%"):
        assert claim in table


def test_on_chip_shares_by_hand():
    # tiny_dense (B=4, T=16, D=64, N*H=64, F=128, float32), one microbatch, on an H100:
    # weights 4 * (4*64*64 + 3*64*128 + 2*64) = 164,352 B fit the L2; activations
    # 4 * (7*B*T*D + 8*B*T*N*H + 3*B*T*F) = 344,064 B go through HBM.
    cfg = models.configs.tiny_dense()
    hit, efficiency = throughput.on_chip_shares(cfg, H100, [1] * 4, tp=1, microbatches=1)
    assert hit == pytest.approx(164_352 / (164_352 + 344_064))
    assert efficiency == pytest.approx(164_352 / H100.l2_bytes)


def test_scaling_projections_show_seed_000_and_002_claims():
    projections = scaling.project_layers()
    assert [p.num_layers for p in projections] == [8, 16, 32, 64]
    for p in projections:
        cfg = dataclasses.replace(models.configs.seed_dense(), num_layers=p.num_layers)
        assert p.layerwise == cost.project_layerwise(cfg, H100, [1] * p.num_layers, 8)
        assert p.baseline == cost.project_tp_pp(cfg, H100, 8, p.num_layers // 8, 8)
    table = scaling.projected_layer_table(projections)
    assert all("| projected |" in row for row in _table_rows(table))
    for claim in ("7,680", "15,360", "30,720", "61,440"):
        assert claim in table
    s002 = scaling.project_seed002()
    table = scaling.projected_seed002_table(s002)
    assert all("| projected |" in row for row in _table_rows(table))
    for claim in ("1,200,000", "1,580,000", "0.35", "0.22"):
        assert claim in table
    # seed 002's "TPOT" (sync + comm per token), baseline: 9 ticks x (1 layer per stage x 2
    # ring all-reduces over 8 + one send) of a [16, 10000, 4096] FP16 microbatch, per 1.28M
    # tokens.
    act = 16 * 10_000 * 4096 * 2
    ring = 2 * 7 / 8 * act / H100.link_bandwidth + 2 * 7 * H100.link_latency
    send = H100.link_latency + act / H100.link_bandwidth
    assert s002[0].comm_ms_per_token == pytest.approx(9 * (2 * ring + send) / 1.28e6 * 1e3)


def test_cost_check_time_shared_model_adds_the_devices_work():
    st = cost_check.StageTimes(stage_s=(1.0, 2.0), transfer_s=0.5, devices_per_stage=1)
    # layer-wise: each of M microbatches passes both stages and one send
    assert cost_check.time_shared_s("layerwise", st) == 8 * (1.0 + 2.0 + 0.5)
    st8 = cost_check.StageTimes(stage_s=(1.0, 2.0), transfer_s=0.5, devices_per_stage=8)
    # baseline: all 16 devices compute on every one of M + 1 ticks
    assert cost_check.time_shared_s("baseline", st8) == 9 * (8 * 3.0 + 8 * 0.5)
    cfg = throughput.cpu_config("dense", throughput.QUICK)
    predicted = cost_check.predict(cfg, H100, {"layerwise": 0.1, "baseline": 0.2}, 1.0)
    assert predicted["layerwise", "C"] == pytest.approx(predicted["layerwise", "B"] + 0.1)
    assert predicted["baseline", "C"] == pytest.approx(predicted["baseline", "B"] + 0.2)
    assert predicted["layerwise", "D"] == pytest.approx(1.0 + 0.1)
    assert predicted["baseline", "D"] == pytest.approx(9 / 8 + 0.2)


# ---- helpers ---------------------------------------------------------------------------------


def test_measure_interleaved_alternates_the_callables():
    calls = []
    timings = common.measure_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1,
        retries=0)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds
    assert [len(t.times_s) for t in timings.values()] == [3, 3]
    t = common.Timing((1.0, 2.0, 4.0))
    assert (t.median, t.min, t.max, t.spread) == (2.0, 1.0, 4.0, 1.5)


def test_results_header_records_machine_jax_and_date(tmp_path):
    text = common.header("Title", "experiments/x.py", "python experiments/x.py --quick")
    assert f"JAX {jax.__version__}" in text
    assert f"Flax {flax.__version__}" in text
    assert datetime.date.today().isoformat() in text
    assert f"{os.cpu_count()} cores" in text
    assert "python experiments/x.py --quick" in text
    path = common.write_results("x.md", text + common.markdown_table(["a", "b"], [[1, 2]], "lr"),
                                tmp_path)
    assert path.read_text().endswith("| a | b |\n| --- | ---: |\n| 1 | 2 |")


# ---- a tiny measured run ---------------------------------------------------------------------


def test_baseline_plan_lists_every_variant_and_the_default_at_other_m():
    dense = throughput.cpu_config("dense", throughput.FULL)  # batch 32
    moe = throughput.cpu_config("moe", throughput.FULL)
    pairs = throughput.baseline_plan(dense)
    default = baselines_tp_pp.DEFAULT["dense"]
    assert pairs[0] == (default, 8)
    assert {v for v, m in pairs if m == 8} == set(baselines_tp_pp.variants_for(dense))
    assert [(v, m) for v, m in pairs if m != 8] == [(default, 2), (default, 4), (default, 16)]
    assert "shard_map_split" in {v for v, _ in throughput.baseline_plan(moe)}
    assert throughput.baseline_plan(dense, "default") == [(default, 8)]
    assert throughput.baseline_plan(dense, "microbatches") == [
        (default, 8), (default, 2), (default, 4), (default, 16)]
    assert throughput.baseline_key("gspmd") == "baseline:gspmd"
    assert throughput.baseline_key("gspmd", 4) == "baseline:gspmd@M=4"


@pytest.fixture(scope="module")
def tiny_measured():
    scale = throughput.Scale(hidden=16, batch=16, seq=8, vocab=64, repeats=2)
    cfg = throughput.cpu_config("dense", scale)
    # Two baseline variants, so the ratios are against the faster of the two.
    d = throughput.deploy(cfg, variants="default", tune=2)  # the tuned row too
    scan = baselines.tp_pp(d.model, d.tokens, devices=jax.devices()[:16], tp=8, pp=2,
                           microbatches=8, variant="scan")
    d = dataclasses.replace(d, baselines=d.baselines | {"baseline:scan": scan})
    return throughput.measure("dense", cfg, repeats=2, d=d)


def test_tiny_measurement_matches_the_model(tiny_measured):
    m = tiny_measured
    default = throughput.baseline_key(baselines_tp_pp.DEFAULT["dense"])
    assert {default, "baseline:scan", "layerwise", "single"} <= set(m.timings)
    assert m.baselines == [default, "baseline:scan"]
    assert m.best_baseline in m.baselines
    assert min(m.timings[k].median for k in m.baselines) == m.timings[m.best_baseline].median
    assert all(len(t.times_s) == 2 for t in m.timings.values())
    assert all(diff <= throughput.ATOL for diff in m.max_diff.values()), m.max_diff
    assert m.devices[default] == 16 and m.devices["layerwise"] == 16  # 1 layer per device
    best = np.array(m.timings[m.best_baseline].times_s)
    assert m.ratio("layerwise")[0] == pytest.approx(
        float(np.median(best / np.array(m.timings["layerwise"].times_s))))
    rows = throughput_report.measured_rows([m])
    assert all(row[-1] == "measured" for row in rows)
    assert sum("(best baseline)" in row[7] for row in rows) == 1
    # the tuned plan: timed (once, if it is another row's program), labelled, its note kept
    assert "tuned" in m.timings and m.labels["tuned"].startswith("Layer-wise (lwjax), tuned")
    assert "tuned:" in m.plans["tuned"]
    same = [k for k in ("layerwise", "planned") if k in m.timings
            and m.timings[k] is m.timings["tuned"]]
    assert len(same) <= 1 and m.labels["tuned"].startswith(
        "Layer-wise (lwjax), tuned (tune=2: ")
    if same:  # names the plan it is: the default plan, or the 1 layer/device plan
        named = "the default plan" if "planned" in m.plans and m.plans["planned"].split(
            "\n")[0] == m.plans["tuned"].split("\n")[0] else "the 1 layer/device plan"
        assert m.labels["tuned"].endswith(f", {named})")
    assert m.compile_s["tuned"] > 0  # tuning's compiles and timings


def test_report_labels_every_figure(tiny_measured):
    text = throughput_report.report([("Table 1", [tiny_measured])], [], [], "python x --quick",
                                    True)
    assert f"JAX {jax.__version__}" in text and datetime.date.today().isoformat() in text
    rows = _table_rows(text)
    assert rows
    for row in rows:
        assert "| measured |" in row or "| projected |" in row, row


def test_breakdown_goal_budget_by_hand():
    """At the hidden size whose layers fit the L2, the summary line says what the 1.3x goal
    leaves over one device and what the rendezvous alone take, from the timings given."""
    ms = {"single": 20.0, "baseline": 60.0, "best_baseline": 26.0, "layerwise": 44.0,
          "skeleton_layerwise": 23.0 * 0.75, "rendezvous": 23.0 * 0.4, "rendezvous_2": 1.15,
          "skeleton_baseline": 30.0, "single_mb": 30.0}
    b = throughput.Breakdown(
        "dense", throughput.MEASURED_SCALE_FITS_L2,
        {k: common.Timing((v / 1e3,)) for k, v in ms.items()}, {"layerwise": 23, "baseline": 9},
        16, 8, 16, "explicit_scan", "baseline:explicit_scan@M=2", 16 * 1024)
    line = throughput_report.breakdown_summary(b)
    assert "(`explicit_scan` at M = 8) takes 3.00x the time of one device" in line
    assert "layer-wise 2.20x" in line
    # 26 / 1.3 = 20.0 ms: 0.0 ms over one device; the floor 17.25 ms, rendezvous 9.2 ms
    assert "finish in 20.0 ms, +0.0 ms over one device" in line
    assert "per-tick floor takes 17.2 ms, of which 9.2 ms" in line
    assert "(0.400 ms each, 0.050 ms among 2)" in line
    rows = {r[0].strip(): r for r in throughput_report.breakdown_rows(b)}
    assert rows["of which the rendezvous of 16 device threads"][1] == "9.2"
    assert "16 KiB per device" in rows["of which the rendezvous of 16 device threads"][3]
    # at another hidden size, no goal budget
    other = dataclasses.replace(b, hidden=256)
    assert "finish in" not in throughput_report.breakdown_summary(other)


def test_tiny_breakdown_times_every_part():
    scale = throughput.Scale(hidden=16, batch=16, seq=8, vocab=64, repeats=1)
    cfg = throughput.cpu_config("dense", scale)
    d = throughput.deploy(cfg, with_plan=False, variants="default")
    b = throughput.breakdown("dense", d, repeats=1)
    assert set(b.timings) == {"layerwise", "baseline", "best_baseline", "single", "single_mb",
                              "skeleton_layerwise", "skeleton_baseline", "rendezvous",
                              "rendezvous_2"}
    assert b.hidden == 16 and b.ticks["layerwise"] == 8 + 16 - 1
    assert b.carry_bytes == (16 // 8) * 8 * 16 * 4  # one microbatch's residual, float32
    for row in throughput_report.breakdown_rows(b):
        assert row[2] in ("measured", "estimate", "remainder"), row
