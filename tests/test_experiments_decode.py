"""experiments/decode.py and decode_report.py: the smallest measured run and its report."""

import dataclasses

import pytest
from _experiments import load_experiment

from lwjax import hardware, models
from lwjax.passes import cost

common = load_experiment("_common")
decode = load_experiment("decode")
report = load_experiment("decode_report")

# 4 layers, 1 round: one layer-wise sweep point, the default plan, TP=8 x PP=2 at one M, a
# layout the heads do not admit (skipped), one device.
TINY = decode.Scale(num_layers=4, batch=4, prompt_len=4, new_tokens=3, repeats=1, stages=(2,),
                    group_multiples=(1,), layouts=((8, 2), (16, 1)),
                    baseline_microbatches=(2,))


@pytest.fixture(scope="module")
def dense():
    return decode.measure_model("dense", TINY)


def test_measure_records_every_method_with_reference_tokens(dense):
    families = [m.family for m in dense.methods]
    assert families.count("layerwise") == 1 and families.count("tp_pp") == 1
    assert families.count("single") == 1 and families.count("layerwise_default") == 1
    assert all(m.tokens_match for m in dense.methods)
    assert dense.skipped == ("TP=16 x PP=1: 16 does not divide the 8 heads",)
    lw = dense.best("layerwise")
    assert (lw.stages, lw.microbatches, lw.devices, lw.period_ticks) == (2, 2, 2, 2)
    # ring: N - 1 = 2 decode steps of max(M, S) ticks, plus S - 1 to drain
    assert lw.decode_ticks == 2 * 2 + 1
    tp = dense.best("tp_pp", (8, 2))
    assert (tp.tp, tp.stages, tp.devices, tp.period_ticks, tp.decode_ticks) == (8, 2, 16, 3, 6)
    assert lw.compile_s is not None and tp.compile_s is None
    for m in dense.methods:
        assert len(m.t_new.times_s) == len(m.t_one.times_s) == 1
        assert m.tpot_ms == pytest.approx(1e3 * (m.t_new.median - m.t_one.median) / 2)
        assert m.decode_tps == pytest.approx(4e3 / m.tpot_ms)
        assert m.e2e_tps == pytest.approx(4 * 3 / m.t_new.median)


def test_report_tables_are_the_records(dense):
    projected = decode.project(("seed_dense", "seed_moe"))
    text = report.markdown([dense], projected, "python experiments/decode.py --test")
    assert "measured (this machine, CPU, 16 simulated devices)" in text
    assert "projected (cost model, H100 SXM5)" in text
    assert common.machine_line().split(";")[0] in text
    lw, tp = dense.best("layerwise"), dense.best("tp_pp", (8, 2))
    assert f"**{lw.decode_tps / tp.decode_tps:.2f}x** TP=8 x PP=2" in text
    rows = [line for line in text.splitlines() if line.startswith("| Dense | TP=8 x PP=2, best M")]
    assert len(rows) == 1 and "| 1.00x |" in rows[0] and "| yes |" in rows[0]
    # the claims sit in their own columns, never as lwjax's figures
    claims = [line for line in text.splitlines() if line.startswith("| Dense | Layer-wise | 004")]
    assert len(claims) == 1 and "| 15,360 | 0.065 | -17% |" in claims[0]
    assert "not comparable" in text and "1000 / TPS" in text


def test_projected_records_are_the_cost_model():
    p = decode.project(("seed_dense", "seed_moe"))
    h100 = hardware.H100_SXM
    for record, name in zip(p, ("seed_dense", "seed_moe"), strict=True):
        lw, base = cost.project_decode_comparison(getattr(models.configs, name)(), h100)
        assert (record.layerwise, record.tp_pp) == (lw, base)
        assert record.hbm_bytes == h100.hbm_bytes


def test_figure_writes_a_png(dense, tmp_path):
    projected = decode.project(("seed_dense", "seed_moe"))
    path = report.figure([dense], projected, tmp_path / "decode.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_layout_skip_reasons():
    moe = dataclasses.replace(decode.cpu_config("moe"), num_experts=4)
    assert decode.layout_skip_reason(moe, 8, 2) == "8 does not divide the 4 experts"
    assert decode.layout_skip_reason(decode.cpu_config("dense"), 4, 3) == \
        "3 does not divide the 16 layers"
    assert decode.layout_skip_reason(decode.cpu_config("moe"), 8, 2) is None
