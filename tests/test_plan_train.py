"""Planning for training: ``lwjax.plan(..., mode="train", schedule=..., optimizer=...)``.

Oracles: per-stage bytes worked out by hand from tiny_dense's dimensions (D=64, N=4 heads x
H=16, F=128, V=256, T=16, float32): parameters, gradients (the same bytes), adam's mu and nu
(2x) plus its int32 step count once per stage, the stash (M or min(S, M) stage inputs of
[mb, T, D] f32 + [T] i32 positions), the largest forward activation peak ``analyze`` reports
for the stage's segments and 2x each segment's peak for the backward's saved values and
cotangents. That backward factor against XLA's buffer assignment for ``jit(grad)`` of one and
two blocks; the stash slots against the training lowering's tick tables; the seed model on
16 x H100 against the same arithmetic at seed size (fits with exactly the bytes computed, not
with one byte less; one microbatch of all 16 sequences does not fit); a 1F1B case that fits
only with fewer stages, from hand-built numbers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import ConfigError, InfeasiblePlanError
from lwjax.models import configs
from lwjax.models.transformer import Block
from lwjax.passes.footprint import Footprint
from lwjax.passes.planner import plan_from_numbers
from lwjax.passes.schedules import TRAIN_SCHEDULES
from lwjax.passes.train_footprint import BACKWARD_FACTOR, STASH_SLOTS, TrainingNumbers
from lwjax.plan import LayerNumbers, Plan

CFG = dataclasses.replace(configs.tiny_dense(), dtype=jnp.float32)
D, N, H, F, V, T = (CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.mlp_hidden_size,
                    CFG.vocab_size, CFG.seq_len)
F32 = 4
LAYER = (2 * D + 4 * D * N * H + 3 * D * F) * F32  # two norms, q/k/v/out, gate/up/down
EMBED = V * D * F32
HEAD = (D + D * V) * F32  # final norm + LM head
ADAM_COUNT = 4  # adam's int32 step count, once per stage
TOKENS = jax.ShapeDtypeStruct((CFG.batch_size, T), jnp.int32)
MiB = 2**20


def carry(mb: int, t: int = T, d: int = D, itemsize: int = F32) -> int:
    """A stage's input per microbatch: the residual [mb, t, d] and the positions [t] i32."""
    return mb * t * d * itemsize + t * 4


@pytest.fixture(scope="module")
def tiny():
    return models.abstract(CFG)


def _plan(model, tokens=TOKENS, **kw) -> Plan:
    kw = {"num_devices": 4, "hardware": "h100", "mode": "train", "cache_bytes": 64 * MiB,
          "allow": (), **kw}
    return lwjax.plan(model, tokens, **kw)


def _forward_peaks(model, tokens, mb: int) -> list[int]:
    """Activation + buffer peak per segment (prologue, layers, epilogue), from ``analyze``."""
    r = lwjax.analyze(model, tokens, microbatch_size=mb, attention="fused")
    return [s.footprint.activation_bytes + s.footprint.buffer_bytes
            for s in (r.prologue, *r.layers, r.epilogue)]


def _stage_peaks(peaks: list[int], a: int, b: int, num_layers: int) -> list[int]:
    """The peaks of the segments a stage of layers [a, b) runs (with the prologue / epilogue
    on the first / last)."""
    return peaks[a + 1:b + 1] + [peaks[0]] * (a == 0) + [peaks[-1]] * (b == num_layers)


def test_stage_bytes_by_hand(tiny):
    p = _plan(tiny, microbatches=4, objective="bottleneck")
    S, M, mb = len(p.stages), 4, 1
    assert (S, p.mode, p.schedule, p.optimizer) == (4, "train", "gpipe", "optax.adamw(1e-3)")
    peaks = _forward_peaks(tiny, TOKENS, mb)
    for s in p.stages:
        a, b = s.layer_range
        params = LAYER * (b - a) + EMBED * (a == 0) + HEAD * (b == CFG.num_layers)
        mine = _stage_peaks(peaks, a, b, CFG.num_layers)
        f = s.footprint
        assert f.weights_bytes == f.grad_bytes == params
        assert f.optimizer_bytes == 2 * params + ADAM_COUNT  # mu + nu, float32 like the params
        assert f.stash_bytes == M * carry(mb)  # GPipe: every microbatch's stage input
        assert f.activation_bytes + f.buffer_bytes == max(mine)
        assert f.backward_bytes == 2 * sum(mine)
        assert f.total_bytes == 4 * params + ADAM_COUNT + M * carry(mb) + max(mine) + \
            2 * sum(mine)
    text = p.summary()
    assert "mode=train" in text and "schedule=gpipe" in text and "opt state" in text
    assert Plan.from_json(p.to_json()) == p
    again = p.replan(exclude_devices=[3])
    assert again.schedule == "gpipe" and again.stages[0].footprint.grad_bytes > 0


def test_1f1b_stashes_min_stages_microbatches(tiny):
    kw = dict(num_devices=2, microbatches=4, objective="bottleneck")
    gpipe, one_f = _plan(tiny, **kw), _plan(tiny, schedule="1f1b", **kw)
    assert len(one_f.stages) == len(gpipe.stages) == 2
    for g, o in zip(gpipe.stages, one_f.stages, strict=True):
        assert o.footprint.stash_bytes == min(2, 4) * carry(1) < g.footprint.stash_bytes == \
            4 * carry(1)
        assert o.footprint.total_bytes - g.footprint.total_bytes == -2 * carry(1)
    assert one_f.schedule == "1f1b" and "1F1B training step" in one_f.summary()


def test_stash_slots_match_the_lowerings_tick_tables():
    assert set(STASH_SLOTS) == set(TRAIN_SCHEDULES)
    for name, schedule in TRAIN_SCHEDULES.items():
        for stages in range(2, 6):
            for m in range(1, 9):
                assert STASH_SLOTS[name](stages, m) == schedule.table(stages, m).stash()


def test_1f1b_fits_with_fewer_stages_when_the_stash_needs_it():
    layer = Footprint(weights_bytes=100, activation_bytes=0, buffer_bytes=0, stash_bytes=1000)
    empty = Footprint(weights_bytes=0, activation_bytes=0, buffer_bytes=0)

    def numbers(schedule):
        return LayerNumbers(names=tuple(f"layers_{i}" for i in range(4)),
                            footprints=(layer,) * 4, prologue=empty, epilogue=empty,
                            costs_s=(1.0,) * 4,
                            training=TrainingNumbers(schedule, "sgd", microbatches=4))

    kw = dict(capacity_bytes=2300, device_ids=range(4), hardware="test", compression="none",
              microbatches=4, microbatch_size=1, mode="train")
    # 4 stages would stash 4 x 1000 > 2300; 2 stages stash 2000 and hold 2 x 100 beside it
    p = plan_from_numbers(numbers("1f1b"), **kw)
    assert [s.layer_range for s in p.stages] == [(0, 2), (2, 4)]
    assert [s.footprint.total_bytes for s in p.stages] == [2200, 2200]
    with pytest.raises(InfeasiblePlanError, match="training stage reserves 4,000 bytes"):
        plan_from_numbers(numbers("gpipe"), **kw)  # GPipe stashes all 4 whatever S


def test_training_time_is_four_forwards(tiny):
    kw = dict(microbatches=4, cache_bytes=40 * MiB)  # on chip (below L2) for both modes
    train = _plan(tiny, **kw)
    forward = _plan(tiny, mode="prefill", **kw)
    assert train.numbers.costs_s == pytest.approx([4 * c for c in forward.numbers.costs_s])
    assert train.numbers.epilogue_s == pytest.approx(4 * forward.numbers.epilogue_s)


@pytest.mark.parametrize("blocks", [1, 2])
def test_backward_bytes_against_xla(tiny, blocks):
    """XLA's buffer assignment for jit(grad) of ``blocks`` blocks, input and input cotangent
    included, parameter gradients excluded, against what a stage of them counts: the forward
    peak + BACKWARD_FACTOR x the forward peak per block (measured 3.0x and 5.0x at batch 4)."""
    stack = nnx.eval_shape(lambda: nnx.List([Block(CFG, rngs=nnx.Rngs(0))
                                             for _ in range(blocks)]))
    graphdef, params = nnx.split(stack, nnx.Param)
    x = jax.ShapeDtypeStruct((4, T, D), jnp.float32)

    def loss(p, x_BTD):
        for block in nnx.merge(graphdef, p):
            x_BTD = block(x_BTD, jnp.arange(T))[0]
        return jnp.sum(x_BTD)

    mem = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().memory_analysis()
    measured = mem.temp_size_in_bytes + 2 * 4 * T * D * F32
    forward = lwjax.analyze(tiny, TOKENS, backend="cpu").layers[0].footprint
    peak = forward.activation_bytes + forward.buffer_bytes
    assert measured == pytest.approx((1 + BACKWARD_FACTOR * blocks) * peak, rel=0.05)


def test_seed_dense_on_16_h100():
    seed = configs.seed_dense()
    model = models.abstract(seed)
    tokens = jax.ShapeDtypeStruct((16, 10_000), jnp.int32)
    d, f, v, t = seed.hidden_size, seed.mlp_hidden_size, seed.vocab_size, 10_000
    fp16 = 2
    layer = (2 * d + 4 * d * seed.num_heads * seed.head_dim + 3 * d * f) * fp16
    embed, head = v * d * fp16, (d + d * v) * fp16  # the head also has the final norm
    assert layer == 536_887_296
    stash = 16 * carry(1, t, d, fp16)  # GPipe, M = 16 microbatches of 1
    peaks = _forward_peaks(model, tokens, 1)
    p = lwjax.plan(model, tokens, num_devices=16, hardware="h100", mode="train", allow=())
    assert p.capacity_bytes == 80 * 10**9  # H100's HBM, not its L2
    assert len(p.stages) == 16
    # weights, grads, mu and nu; adam's count; the stash; the forward peak; 2x each peak
    for k, params in ((0, embed + layer), (5, layer), (15, layer + head)):
        mine = _stage_peaks(peaks, k, k + 1, 16)
        assert p.stages[k].footprint.total_bytes == \
            4 * params + ADAM_COUNT + stash + max(mine) + 2 * sum(mine)
    # What a device must hold: the heaviest stage's additive bytes (the last: a layer and the
    # head) + the largest forward peak of any segment (the partitioner reserves it for every
    # stage: the last layer's peak is a few KB below the others', its input is not read again)
    need = 4 * (layer + head) + 2 * sum(peaks[-2:]) + ADAM_COUNT + stash + max(peaks)
    assert max(s.footprint.total_bytes for s in p.stages) <= need < 10 * 10**9  # of 80 GB
    exact = lwjax.plan(model, tokens, num_devices=16, hardware="h100", mode="train",
                       allow=(), cache_bytes=need)
    assert len(exact.stages) == 16
    with pytest.raises(InfeasiblePlanError):
        lwjax.plan(model, tokens, num_devices=16, hardware="h100", mode="train", allow=(),
                   cache_bytes=need - 1)
    # M = 1, all 16 sequences in one microbatch: the last stage's forward peak and the saved
    # values of its layer and head (the logits [16, T, V]) overflow an H100
    whole = _forward_peaks(model, tokens, 16)
    need_whole = 4 * (layer + head) + 2 * sum(whole[-2:]) + ADAM_COUNT + carry(16, t, d, fp16) \
        + max(whole)
    assert need_whole > 80 * 10**9
    with pytest.raises(InfeasiblePlanError) as e:
        lwjax.plan(model, tokens, num_devices=16, hardware="h100", mode="train", allow=(),
                   microbatches=1)
    assert e.value.min_capacity == need_whole


def test_bad_training_inputs(tiny):
    with pytest.raises(ConfigError, match="'gpipe', '1f1b'"):
        _plan(tiny, schedule="interleaved")
    with pytest.raises(ConfigError, match="optax GradientTransformation"):
        _plan(tiny, optimizer="adam")
    with pytest.raises(ConfigError, match="compressed weights is not supported"):
        _plan(tiny, compression="int8")
    with pytest.raises(ConfigError, match="mode='train'"):
        _plan(tiny, mode="prefill", schedule="1f1b")
    with pytest.raises(ConfigError, match="residency='all'"):
        _plan(tiny, residency="weights")
    sgd = _plan(tiny, optimizer=optax.sgd(0.1, momentum=0.9), microbatches=4)
    assert sgd.optimizer == "optax (trace state)"
    assert sgd.stages[1].footprint.optimizer_bytes == LAYER  # one momentum per parameter
