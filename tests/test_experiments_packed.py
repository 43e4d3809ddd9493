"""experiments/packed_weights.py: the slot and packed tick loops agree, and the compiled
packed loop keeps its weights' slices as copies while the slots keep none (what the
script's table reports; its times are a benchmark, not asserted)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from _experiments import load_experiment


def test_packed_loop_copies_weights_the_slot_loop_reads_in_place():
    packed = load_experiment("packed_weights")
    x = jnp.ones((8, 64), jnp.float32)
    (f_slots, a_slots), (f_flat, a_flat) = packed.programs(64)
    np.testing.assert_array_equal(np.asarray(f_slots(a_slots, x)), np.asarray(f_flat(a_flat, x)))
    slots, flat = (f.lower(a, x).compile() for f, a in ((f_slots, a_slots), (f_flat, a_flat)))
    assert packed._loop_copies(slots.as_text()) == 0
    assert packed._loop_copies(flat.as_text()) == len(packed._shapes(64))
    weight_bytes = sum(4 * a * b for a, b in packed._shapes(64))
    assert flat.memory_analysis().temp_size_in_bytes >= weight_bytes
    assert slots.memory_analysis().temp_size_in_bytes < weight_bytes


def test_report_names_the_command():
    packed = load_experiment("packed_weights")
    text = packed.report([["64", "slots (bitcast rows)", "1", "1.00", "1.00", "0", "1"]], 3)
    assert "python experiments/packed_weights.py --repeats 3" in text and "*Measured*" in text
