"""experiments/waiting_threads.py: the programs compute the block on the k working devices
only, and the slowdown is time over k x one device's (its times are a benchmark)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _experiments import load_experiment

waiting = load_experiment("waiting_threads")


def test_only_the_working_devices_run_the_block():
    calls = waiting.programs(tokens=2, hidden=4, active=(1, 16))
    one, first, every, none = (np.asarray(calls[k]()) for k in ("one", 1, 16, 0))
    np.testing.assert_array_equal(none, np.full_like(none, 1e-2))  # only passed around
    rows = one.shape[0]  # each device's rows, passed one step around the ring every tick
    assert every.shape == (16 * rows, 4)
    # all 16 working: every device's rows went through 16 blocks, as one device alone
    np.testing.assert_allclose(every[:rows], one, rtol=1e-6)
    # one working: every device's rows pass device 0 once in the 16 ticks: one block each
    w1, w2 = np.full((4, 16), 1e-3, np.float32), np.full((16, 4), 1e-3, np.float32)
    once = np.asarray(waiting._block(np.full((16 * rows, 4), 1e-2, np.float32), w1, w2))
    np.testing.assert_allclose(first, once, rtol=1e-6)
    assert not np.allclose(first[:rows], one)


def test_slowdown_and_report():
    # the ppermutes alone (k = 0) take 0.01: less them, k devices' work over k x 0.01
    medians = {0: 0.01, 1: 0.04, 2: 0.05, 16: 0.17, "one": 0.01}
    assert waiting.slowdowns(medians) == pytest.approx({1: 3.0, 2: 2.0, 16: 1.0})
    text = waiting.report({512: medians}, "python experiments/waiting_threads.py")
    assert f"JAX {jax.__version__}" in text
    assert "| 512 | 10.0 | 10.0 | 40.0 (3.00) | 50.0 (2.00) | 170.0 (1.00) | measured |" in text
    assert "| the layout search's model | -- |" in text and "| projected |" in text
    # slowdown - 1 = 2 at 15 waiting per working one, 1 at 7: exponent ln 2 / ln(15/7)
    coeff, exponent = waiting.fit({512: medians})
    assert exponent == pytest.approx(np.log(2) / np.log(15 / 7))
    assert coeff == pytest.approx(2 / 15 ** exponent)
    assert f"coeff {coeff:.3f}, exponent {exponent:.2f}." in text
    assert waiting.fit({512: {0: 0.0, 1: 0.01, 16: 0.16, "one": 0.01}}) is None  # too few
