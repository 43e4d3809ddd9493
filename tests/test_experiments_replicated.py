"""experiments/replicated_check.py: what it counts as a split stage's replicated work, and
the rate its report derives (its times are a benchmark, not asserted)."""

from __future__ import annotations

import dataclasses

import jax
from _experiments import load_experiment
from flax import nnx

from lwjax import models
from lwjax.models import configs
from lwjax.passes import cost_calibration as cal


def test_replicated_totals_count_every_segment():
    """The MoE model routes tokens in every block: more equations run whole than in the dense
    model, and their bytes grow with the batch."""
    check = load_experiment("replicated_check")
    totals = {}
    for name, cfg in (("dense", configs.tiny_dense()), ("moe", configs.tiny_moe())):
        model = models.build(cfg, rngs=nnx.Rngs(0))
        for batch in (4, 8):
            tokens = jax.numpy.zeros((batch, cfg.seq_len), jax.numpy.int32)
            totals[name, batch] = check.replicated_totals(model, tokens, 2)
    assert totals["moe", 4][1] > totals["dense", 4][1] > 0
    for name in ("dense", "moe"):
        (small, count), (large, same) = totals[name, 4], totals[name, 8]
        assert count == same and large > small > 0


def test_report_derives_the_rate_from_the_tp_difference():
    check = load_experiment("replicated_check")

    @dataclasses.dataclass
    class T:
        median: float
        min: float
        max: float

    medians = {(4, 1): 0.050, (8, 1): 0.070, (4, 2): 0.060, (8, 2): 0.080}
    result = {"kind": "moe", "medians": medians,
              "timings": {f"{tp},{m}": T(v, v, v) for (tp, m), v in medians.items()},
              "bytes": 50e6, "count": 100,
              "rates": {m: 4 * 50e6 / 0.020 for m in (1, 2)}}
    text = check.report([result], "python experiments/replicated_check.py")
    assert "| moe | 100 | 50.0 | 1 | 20.0 | 10.0 |" in text
    assert "Median rate of this run: 10.0 GB/s" in text
    assert f"{cal.CPU_REPLICATED_BYTES_PER_S / 1e9:.1f} GB/s" in text
