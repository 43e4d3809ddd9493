"""experiments/failover.py: a small run measures every part, moves exactly what the plans
need, and the new pipelines equal the model."""

import pytest
from _experiments import load_experiment

failover = load_experiment("failover")


@pytest.mark.slow  # ShardedModel.replan itself: tests/test_failover.py
def test_a_small_run_times_each_part_and_checks_the_pipelines():
    cases = failover.measure(rounds=1, kinds=("dense",), num_layers=4)
    assert [(c.kind, c.lost, c.stages_before, c.stages_after) for c in cases] == [
        ("migrate", (1,), 4, 3), ("migrate", (1, 2), 4, 2), ("switch", (1,), 2, 2)]
    for c in cases:
        assert c.max_error < 1e-4                       # the new pipeline equals the model
        assert c.bytes_arrived == c.bytes_needed > 0
        assert c.first_call_s > 0 and c.steady_call_s > 0 and c.weights_s > 0
    migrate, _, switch = cases
    assert migrate.compile_s > 0 and migrate.bytes_from_model > 0
    assert switch.compile_s == 0 and switch.bytes_moved == switch.bytes_from_model == 0
    assert switch.ahead_compile_s > 0 and switch.ahead_warm_s > 0
    text = failover.report(cases, 1)
    assert "< 100 ms" in text and "| dense | switch | 1 | 2 -> 2 |" in text
