"""The pipeline's outputs are spread over the stages (passes/outputs.py): a device holds its
1/S of them, not all of them, and the outputs still equal the model's.

Before the spread, the program returned every stage's output slots stacked [S, M, mb, ...]:
each device held an output-sized block (memory_analysis().output_size_in_bytes = the whole
output), of which only the last stage's was real.

Tolerance: float32 on CPU, atol = rtol = 1e-5, as in tests/test_lower.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax import models
from lwjax.models import configs
from lwjax.passes.lower import lower
from lwjax.passes.outputs import OutputSplit, output_splits
from lwjax.passes.segment import segment
from lwjax.passes.trace import trace

ATOL = RTOL = 1e-5
BATCH = 8
# the activations, carries and weights-reading temporaries of the 8-layer model below: well
# under one microbatch's logits ([2, 16, 4096] float32 = 512 KiB)
SMALL_CHANGE = 64 * 1024


@pytest.fixture(scope="module")
def dense():
    """8 layers, vocab 4096: logits [8, 16, 4096] float32 = 2 MiB, the program's bulk."""
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=8, vocab_size=4096)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (BATCH, cfg.seq_len), 0, cfg.vocab_size)
    return cfg, model, tokens


def _program(model, tokens, num_stages, microbatches, tp=1):
    graph = segment(trace(model, tokens, microbatch_size=BATCH // microbatches))
    layers = len(graph.segments) - 2
    ranges = [(s * layers // num_stages, (s + 1) * layers // num_stages)
              for s in range(num_stages)]
    return graph, lower(graph, ranges, jax.devices()[:num_stages * tp], microbatches, tp=tp)


@pytest.mark.parametrize(("microbatches", "axis"), [(2, 0), (4, 1)])
def test_each_device_holds_a_quarter_of_the_outputs_on_four_stages(dense, microbatches, axis):
    """memory_analysis per device: the outputs are 1/4 of the model's (before: all of them);
    the temporaries hold at most ~2 microbatches' logits (the last stage's, and the copy
    the transfer reads)."""
    cfg, model, tokens = dense
    output_bytes = BATCH * cfg.seq_len * cfg.vocab_size * 4
    _, prog = _program(model, tokens, 4, microbatches)
    # microbatches of 4 rows are cut along the batch; of 2 rows, along the sequence (16 / 4)
    assert prog.output_splits == (OutputSplit(axis=axis, parts=4, size=(BATCH, 16)[axis]),)
    memory = prog.fn.lower(*prog.abstract_args()).compile().memory_analysis()
    assert memory.output_size_in_bytes == output_bytes // 4
    assert memory.temp_size_in_bytes <= 2 * output_bytes // microbatches + SMALL_CHANGE
    # so the outputs and temporaries together stay under what the outputs alone took before
    assert memory.output_size_in_bytes + memory.temp_size_in_bytes < output_bytes


@pytest.mark.parametrize(("num_stages", "microbatches", "tp", "shard_rows", "devices"), [
    pytest.param(1, 2, 1, 8, [0], marks=pytest.mark.slow),  # one stage: the other cases' rule
    pytest.param(2, 2, 1, 4, [0, 1], marks=pytest.mark.slow),
    (4, 4, 1, 8, [0, 1, 2, 3]),  # cut along the sequence: every row, 4 positions each
    (5, 2, 1, 2, [1, 2, 3, 4]),  # 5 does not divide the batch of 8: the last 4 stages hold it
    (2, 2, 2, 4, [0, 1, 2, 3]),  # tp = 2: both devices of a stage hold its rows whole
])
def test_outputs_equal_the_model_and_lie_on_their_stages(dense, num_stages, microbatches, tp,
                                                          shard_rows, devices):
    cfg, model, tokens = dense
    graph, prog = _program(model, tokens, num_stages, microbatches, tp)
    placed = prog.place_params(graph.traced.params)
    want = model(tokens)
    got = prog(placed, tokens)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    assert got.devices() == {jax.devices()[d] for d in devices}
    assert {s.data.shape[0] for s in got.addressable_shards} == {shard_rows}
    assert sum(s.data.size for s in got.addressable_shards) == got.size * tp
    # under an outer jit the outputs are that program's (sliced there when 5 stages hold 4)
    np.testing.assert_allclose(jax.jit(lambda p, t: prog(p, t))(placed, tokens), want,
                               atol=ATOL, rtol=RTOL)


class Heads(nnx.Module):
    """Three outputs of three dtypes, one not batch-leading in its other axes."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(4)])
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + jax.nn.relu(b(x))
        y = self.out(x)
        return {"y": y, "best": jnp.argmax(y, -1), "positive": y > 0}


def test_outputs_of_every_dtype_are_spread_and_equal_the_model():
    model = Heads(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (BATCH, 4))
    graph, prog = _program(model, x, 4, 2)
    got, want = prog(prog.place_params(graph.traced.params), x), model(x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for k in want:
        assert got[k].dtype == want[k].dtype
        assert {s.data.shape[0] for s in got[k].addressable_shards} == {2}
        np.testing.assert_allclose(got[k], want[k], atol=ATOL, rtol=RTOL)


def test_split_axis_has_the_most_parts_and_the_batch_wins_ties():
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    # 5 stages, microbatches of 4: 4 parts along the batch (as along 16 and 256); rows of
    # the 2 microbatches interleave in 4 groups
    assert output_splits([f32(4, 16, 256)], 5, 2) == (
        (OutputSplit(axis=0, parts=4, size=8),), 4)
    # 16 stages, microbatches of 2: the sequence has 16 parts; the batch keeps its order
    assert output_splits([f32(2, 32, 256)], 16, 8) == (
        (OutputSplit(axis=1, parts=16, size=32),), 1)
    # no axis shares a factor with 2 stages: one part, on the last stage
    assert output_splits([f32(3, 7)], 2, 1) == ((OutputSplit(axis=0, parts=1, size=3),), 1)
    # one microbatch needs no interleave
    assert output_splits([f32(8, 16)], 4, 1) == ((OutputSplit(axis=0, parts=4, size=8),), 1)
