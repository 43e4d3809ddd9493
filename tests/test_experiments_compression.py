"""experiments/weight_compression.py (the compression experiment): held-out loss of the trained
byte LM through compressed pipelines equals one device's, int8 barely moves it, the stored
bytes equal the plan's; the projection's baseline is the cost model's; and (slow) the
``--quick`` run end to end in a subprocess."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from _experiments import EXPERIMENTS, load_experiment

from lwjax import hardware, models
from lwjax.passes import cost

TIMEOUT_S = 600  # ~100 s on the 2-core machine under load; more when the cores are shared


common = load_experiment("_common")
bytelm = load_experiment("bytelm")
wc = load_experiment("weight_compression")

# 8 held-out windows, 4 stages of one layer each, M = 4
TINY = wc.Scale(windows=8, batch=8, stages=4, microbatches=4, ppl_presets=("none", "int8"),
                decode_presets=("none",), decode_layers=4, decode_stages=4, batch_decode=4,
                prompt_len=4, new_tokens=2, repeats=1)


@pytest.fixture(scope="module")
def accuracy():
    from flax import nnx

    model, cfg, meta = bytelm.load_trained_with_meta(wc.MODEL_PATH)
    batches, _ = wc.heldout_windows(meta, cfg.seq_len, TINY)
    graphdef, _ = nnx.split(model)
    single = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    out = {p: wc.measure_accuracy(model, batches, p, TINY, single) for p in TINY.ppl_presets}
    return out, model, batches


def test_pipeline_loss_equals_one_device_and_int8_barely_moves_it(accuracy):
    out, model, batches = accuracy
    none, int8 = out["none"], out["int8"]
    for r in (none, int8):
        assert len(r.window_nats) == TINY.windows
        assert r.agreement <= wc.AGREE_NATS
    # none is the model itself: the same per-window losses as bytelm's one-device loss
    x, y = batches[0]
    assert none.nats == pytest.approx(bytelm.mean_loss(model, x, y), abs=1e-5)
    assert dict(none.weight_error) == {"attention": 0.0, "MLP": 0.0, "LM head": 0.0}
    # int8 with per-channel scales: weights ~0.5% off, loss within 0.01 nats
    assert all(0 < e < 0.02 for _, e in int8.weight_error)
    assert abs(int8.nats - none.nats) < 0.01
    d, se = int8.degradation(none)
    assert d == pytest.approx(np.expm1(np.mean(np.subtract(int8.window_nats,
                                                            none.window_nats))))
    assert se > 0


def test_stored_bytes_are_the_plans_and_compressed(accuracy):
    out, _, _ = accuracy
    none, int8 = out["none"], out["int8"]
    for r in (none, int8):
        assert len(r.stages) == TINY.stages
        for s in r.stages:
            assert s.own_bytes == s.own_placed_bytes
            assert abs(s.own_vs_plan) <= wc.BYTES_TOLERANCE
            assert s.allocated_bytes >= s.own_placed_bytes
            assert sum(n for _, n in s.by_dtype) == s.own_placed_bytes
    assert all(dict(s.by_dtype).keys() == {"float32"} for s in none.stages)
    assert all("int8" in dict(s.by_dtype) and "float16" in dict(s.by_dtype)
               for s in int8.stages)
    # a block's matmul weights: one byte per value plus 2-byte scales instead of four bytes
    assert 0.25 < int8.stored_bytes / none.stored_bytes < 0.3


def test_projection_without_compression_is_the_cost_model():
    cfg, hw = models.configs.seed_dense(), hardware.H100_SXM
    for m in (8, 16):
        tpot, tick, _ = wc.project_ring(cfg, hw, m, {"block": 1, "head": 1, "embed": 1})
        p = cost.project_decode(cfg, hw, [1] * cfg.num_layers, 1, m)
        assert tpot * 1e3 == pytest.approx(p.tpot_ms, rel=1e-12)
        assert tick == pytest.approx(p.tick_s, rel=1e-12)
    # fewer weight bytes: a shorter tick, never a longer one
    half, _, _ = wc.project_ring(cfg, hw, 16, {"block": 0.5, "head": 0.5, "embed": 1})
    assert half < wc.project_ring(cfg, hw, 16, {"block": 1, "head": 1, "embed": 1})[0]


@pytest.mark.slow
def test_quick_run_prints_its_tables():
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "weight_compression.py"), "--quick", "--no-write"],
        capture_output=True, text=True, timeout=TIMEOUT_S,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "../shared/seeds/000_89c23fd103b20193.txt" in text
    assert "Perplexity degradation: <0.1% on validation set" in text
    rows = {m.group(1): m.group(0) for m in
            re.finditer(r"^\| (none|int8|int8-2:4) \| [0-9,.]+ \| [0-9.]+ \|.*$", text,
                        re.MULTILINE)}
    assert set(rows) == {"none", "int8", "int8-2:4"}
    assert "within 0.00% on all" in text
    decode_rows = [line for line in text.splitlines()
                   if re.match(r"^\| (none|int8) \| 4 x 1 \|", line)]
    assert len(decode_rows) == 2 and all("| yes |" in line for line in decode_rows)
    assert "projected (cost model, H100 SXM5, stored bytes substituted)" in text
