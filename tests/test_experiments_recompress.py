"""experiments/recompress.py: a small run measures every part and checks the pipeline."""

import pytest
from _experiments import load_experiment

recompress = load_experiment("recompress")


@pytest.mark.slow  # sm.recompress itself: tests/test_compression_run.py
def test_a_small_run_times_each_part_and_checks_the_pipeline():
    rows = recompress.measure(rounds=1, num_layers=4)
    assert [r[0] for r in rows] == ["one stage (2)", "every stage"]
    for row in rows:
        assert all(float(x.replace(",", "")) > 0 for x in row[1:7])
        assert float(row[7]) < 1e-4          # the pipeline equals the decoded model
    text = recompress.report(rows, 1)
    assert "< 100 ms" in text and "device work ms" in text
