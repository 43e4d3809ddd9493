"""experiments/layout_check.py: the rank correlation and the default's cost by hand; a small
measured run reports what tuning measured, in the search's order."""

import pytest
from _experiments import load_experiment

from lwjax import tune

layout_check = load_experiment("layout_check")


def _measured(medians_ms, kept, projected_ms=None):
    projected_ms = projected_ms or [2 * ms for ms in medians_ms]
    return tuple(tune.Measured(i + 1, 16 // (i + 1), 1, 2, ms / 1e3, i == kept,
                               projected_s=p / 1e3)
                 for i, (ms, p) in enumerate(zip(medians_ms, projected_ms, strict=True)))


def test_rank_correlation_and_default_cost_by_hand():
    assert layout_check.spearman([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert layout_check.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert layout_check.spearman([1, 2], [2, 1]) is None  # too few to rank
    # measured order 2, 1, 4, 3: d^2 = 1 + 1 + 1 + 1, rho = 1 - 6 x 4 / (4 x 15) = 0.6
    c = layout_check.Check("m", 2**20, _measured([20.0, 10.0, 40.0, 30.0], kept=1,
                                                 projected_ms=[15.0, 16.0, 60.0, 61.0]),
                           1.0, "16 x tp 1, M=8", 1.25)
    assert c.measured_ranks() == [2, 1, 4, 3]
    assert c.rho() == pytest.approx(0.6)
    assert c.default_cost() == pytest.approx(2.0)  # the first choice took twice the fastest
    text = layout_check.report([c], layout_check.throughput.QUICK, 4, "python x")
    # projected / measured: 0.75, 1.60, 1.50, 2.03 -> 0.75-2.03x
    assert c.projected_over_measured() == pytest.approx([0.75, 1.6, 1.5, 61 / 30])
    assert ("| m | 1.00 | 4 | +0.60 | 0.75-2.03x | 2.00x | 8 x tp 1, M=2 | 16 x tp 1, M=8: "
            "1.25x |") in text
    assert "| 2 | 8 x tp 1, M=2 | 16.0 | 10.0 | 1.60x | 1 | kept |" in text


@pytest.mark.slow  # builds, compiles and times 2 layouts at 2 capacities (~40 s)
def test_quick_run_reports_the_measured_candidates():
    text = layout_check.main(["--quick", "--models", "dense", "--candidates", "2",
                              "--no-write"])
    assert text.count("| kept |") == 2  # one kept layout per capacity
    assert "## Summary" in text and "Dense (16-layer)" in text


def test_labels_name_laps_and_gpt2_is_the_transformers_model():
    c = layout_check.Check("m", 2**20, (
        tune.Measured(1, 8, 1, 4, 0.01, True, virtual=2, projected_s=0.02),
        tune.Measured(2, 16, 1, 8, 0.02, False, projected_s=0.03)), 1.0)
    assert c.layouts() == ["8 x tp 1 x 2 laps, M=4", "16 x tp 1, M=8"]
    pytest.importorskip("transformers")
    scale = layout_check.throughput.Scale(hidden=16, batch=4, seq=8, vocab=64, repeats=1)
    model, tokens, name = layout_check.gpt2(scale)
    assert type(model).__name__ == "FlaxGPT2LMHeadModel" and "GPT2" in name
    assert model.config.n_layer == 16 and model.config.n_embd == 16
    assert model(tokens).logits.shape == (4, 8, 64)
