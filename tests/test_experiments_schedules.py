"""experiments/schedules.py: the projected rows follow the cost model's arithmetic; a small
measured run equals the model for each pipeline."""

import pytest
from _experiments import load_experiment

from lwjax import hardware
from lwjax.models import configs
from lwjax.passes import cost
from lwjax.passes.cost_circular import project_circular

schedules = load_experiment("schedules")


def test_circular_projection_by_hand():
    cfg, hw = configs.seed_dense(), hardware.H100_SXM
    lw = cost.project_layerwise(cfg, hw, [1] * 16, 8)
    p = project_circular(cfg, hw, devices=8, virtual=2, microbatches=8)
    # 8 x 2 + 7 = 23 one-block ticks, as GPipe's 8 + 15 on 16 devices: the same step
    assert p.bubble == pytest.approx(7 / 23)
    assert p.step_s == pytest.approx(23 * (lw.stage_s[0] + lw.transfer_s))
    assert p.tps == pytest.approx(lw.tps)
    assert p.tokens_per_j > lw.tokens_per_j  # half the devices idle-free for the same step
    one_lap = project_circular(cfg, hw, devices=16, virtual=1, microbatches=8)
    assert one_lap.step_s == pytest.approx(lw.step_s)
    with pytest.raises(ValueError, match="do not split"):
        project_circular(cfg, hw, devices=3, virtual=2, microbatches=8)
    rows = schedules.projected_rows("dense")
    assert [r[1] for r in rows][:2] == ["TP=8 x PP=2, GPipe", "layer-wise 16 x 1, GPipe"]
    assert rows[0][-1] == "1.00x"


def test_the_layout_search_picks_circular_on_four_devices():
    """Planned abstractly: 16 seed blocks on 4 H100s at M = 8 plan circular, projected above
    the best GPipe plan; the report says where circular won."""
    (row,) = schedules.planned_rows("dense", devices=(4,))
    assert row[:3] == ["dense", 4, "4 x tp 1 x 4 laps (circular)"]
    assert float(row[-1].rstrip("x")) > 1.0
    assert "dense on 4 devices" in schedules._planned_note([row])


@pytest.mark.slow  # the circular program itself: tests/test_circular.py
def test_measured_run_equals_the_model():
    rows = schedules.measured_rows("dense", repeats=1)
    assert len(rows) == 3 and all(float(r[-1]) < 1e-4 for r in rows)
    assert "circular on 8 devices takes" in schedules.report([], rows, 1)
