"""The circular (interleaved) forward schedule: V = S x virtual stages, stage k on device
k mod S, microbatches going round the ring in groups of S. Its tick order against a
hand-written table, the program against the model (dense and MoE, M below, equal to and
above S, S not dividing M), and each device storing the weights of its own stages only."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import ConfigError
from lwjax.models import configs
from lwjax.passes.lower import lower
from lwjax.passes.schedules import SCHEDULES

ATOL = RTOL = 1e-5


def test_tick_order_matches_the_hand_written_table():
    # S = 2 devices, 2 laps (V = 4 stages), M = 4: (stage, microbatch) per tick and device.
    # Microbatches 0, 1 go round twice (stages 0-3), then 2, 3 follow with no gap.
    assert SCHEDULES["circular"].table(2, 4, 2) == [
        [(0, 0), None],
        [(0, 1), (1, 0)],
        [(2, 0), (1, 1)],
        [(2, 1), (3, 0)],
        [(0, 2), (3, 1)],
        [(0, 3), (1, 2)],
        [(2, 2), (1, 3)],
        [(2, 3), (3, 2)],
        [None, (3, 3)],
    ]
    assert list(SCHEDULES["circular"].output_ticks(2, 4, 2)) == [3, 4, 7, 8]
    # M = 3 on S = 2: the second group has one microbatch; its partner's slots idle
    table = SCHEDULES["circular"].table(2, 3, 2)
    assert len(table) == 8 and table[5] == [None, (1, 2)] and table[4] == [(0, 2), (3, 1)]
    # one lap is GPipe's order
    assert SCHEDULES["circular"].table(3, 4, 1) == SCHEDULES["gpipe"].table(3, 4)
    # each (stage, microbatch) runs once, on its device, after its predecessor
    for s, m, v in [(4, 8, 2), (3, 5, 3)]:
        runs = {}
        for t, row in enumerate(SCHEDULES["circular"].table(s, m, v)):
            for d, work in enumerate(row):
                if work is not None:
                    assert work not in runs and work[0] % s == d
                    runs[work] = t
        assert set(runs) == {(k, mb) for k in range(s * v) for mb in range(m)}
        assert all(runs[k, mb] == runs[k - 1, mb] + 1 for k, mb in runs if k)
        ticks = len(SCHEDULES["circular"].table(s, m, v))
        if m % s == 0:  # bubble: only the first fill and the last drain
            assert ticks == v * m + s - 1


@pytest.fixture(scope="module")
def dense():
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=8)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (8, cfg.seq_len), 0, cfg.vocab_size)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], cache_bytes=2**30,
                               microbatches=4, objective="bottleneck", allow=())
    return model, tokens, sm.program.graph


def _ranges(bounds):
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize(("devices", "virtual", "bounds"), [
    (2, 2, [0, 2, 4, 6, 8]),           # M = 4 = 2 groups of S
    pytest.param(4, 2, [0, 1, 2, 3, 4, 5, 6, 7, 8], marks=pytest.mark.slow),  # M = S
    # S does not divide M; uneven stages
    pytest.param(3, 2, [0, 1, 2, 3, 4, 5, 8], marks=pytest.mark.slow),
])
def test_circular_program_equals_the_model(dense, devices, virtual, bounds):
    model, tokens, graph = dense
    prog = lower(graph, _ranges(bounds), jax.devices()[:devices], 4, schedule="circular",
                 virtual=virtual)
    np.testing.assert_allclose(prog(prog.place_params(graph.traced.params), tokens),
                               model(tokens), atol=ATOL, rtol=RTOL)
    # each device stores the weights of its own stages and no other's
    cfg = model.cfg
    layer = cfg.block_param_count() * 4
    embed, head = cfg.vocab_size * cfg.hidden_size * 4, cfg.hidden_size * (cfg.vocab_size + 1) * 4
    own = [prog.storage.own_bytes(s) for s in range(devices)]
    if bounds == [0, 2, 4, 6, 8]:  # device 0: layers 0, 1, 4, 5; device 1: 2, 3, 6, 7
        assert own == [4 * layer + embed, 4 * layer + head]
    else:
        sizes = [b - a for a, b in _ranges(bounds)]
        for s in range(devices):
            layers = sum(sizes[k] for k in range(s, len(sizes), devices))
            assert own[s] == layers * layer + (embed if s == 0 else 0) + \
                (head if s == devices - 1 else 0)


@pytest.mark.slow  # the dense cases above run by default
def test_circular_moe_equals_the_model():
    cfg = configs.tiny_moe()
    model = models.build(cfg, rngs=nnx.Rngs(1))
    tokens = jax.random.randint(jax.random.key(1), (8, cfg.seq_len), 0, cfg.vocab_size)
    graph = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:1], cache_bytes=2**30,
                                  microbatches=2, allow=()).program.graph
    n = cfg.num_layers
    bounds = [0, n // 4, n // 2, 3 * n // 4, n]
    prog = lower(graph, _ranges(bounds), jax.devices()[:2], 2, schedule="circular", virtual=2)
    np.testing.assert_allclose(prog(prog.place_params(graph.traced.params), tokens),
                               model(tokens), atol=ATOL, rtol=RTOL)


def test_laps_add_no_temporaries(dense):
    """The last stage writes each microbatch's final carry to one of M slots (+1 spare for
    the other ticks) instead of stacking every tick's: a device's temporaries do not grow
    with the tick count. Before, 4 laps on 2 devices held 49 KB more than 2 stages of
    GPipe here (V x M + S - 1 = 17 stacked carries against M + S - 1 = 5); the planned
    footprint counts neither."""
    model, tokens, graph = dense
    params = graph.traced.params
    carry = tokens.shape[0] // 4 * tokens.shape[1] * model.cfg.hidden_size * 4  # one microbatch's

    def temp(bounds, virtual, devices=2):
        prog = lower(graph, _ranges(bounds), jax.devices()[:devices], 4,
                     schedule="circular" if virtual > 1 else "gpipe", virtual=virtual)
        compiled = prog.fn.lower(prog.place_params(params), tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    gpipe = temp([0, 4, 8], 1)
    two_laps, four_laps = temp([0, 2, 4, 6, 8], 2), temp(list(range(9)), 4)
    assert two_laps <= gpipe + carry and four_laps <= two_laps + carry, (gpipe, two_laps,
                                                                          four_laps)
    # GPipe over 8 devices (M + S - 1 = 11 ticks) holds no more than over 2 (5 ticks)
    assert temp(list(range(9)), 1, devices=8) <= gpipe + carry


def test_virtual_stages_need_the_circular_schedule(dense):
    _, _, graph = dense
    with pytest.raises(ConfigError, match="virtual=2 stages per device needs"):
        lower(graph, _ranges([0, 2, 4, 6, 8]), jax.devices()[:2], 4, virtual=2)
    with pytest.raises(ConfigError, match="divisible"):
        lower(graph, _ranges([0, 2, 4, 8]), jax.devices()[:2], 4, schedule="circular",
              virtual=2)


# ---- through layerwise_shard: the layout search's circular plans ----------------------------

@pytest.fixture(scope="module")
def circular_sm(dense):
    model, tokens, _ = dense
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=2**30,
                               schedule="circular", tune=2)
    return model, tokens, sm


def test_layerwise_shard_runs_a_circular_plan(circular_sm):
    """schedule="circular" searches the circular layouts only (this CPU host projects GPipe
    faster): the plan runs several stages per device, the program equals the model, each
    device stores the padding the plan predicts, and the plan runs again as given."""
    model, tokens, sm = circular_sm
    plan = sm.plan
    assert plan.virtual >= 2 and sm.program.virtual == plan.virtual
    assert sm.program.schedule == "circular" and len(plan.stages) == plan.ring * plan.virtual
    assert [s.devices for s in plan.stages] == \
        [plan.stages[k % plan.ring].devices for k in range(len(plan.stages))]
    expected = model(tokens)
    np.testing.assert_allclose(sm(tokens), expected, atol=ATOL, rtol=RTOL)
    placed = sm.weight_bytes()
    assert len(placed) == plan.num_devices == plan.ring
    for s in plan.stages:  # each stage reports its device's padding, beyond all its stages
        d = placed[s.devices[0]]
        assert plan.padding_bytes[s.index] == d["allocated"] - d["own"]
    own = {s.devices[0]: 0 for s in plan.stages}
    for s in plan.stages:
        own[s.devices[0]] += s.footprint.weights_bytes
    assert own == {i: b["own"] for i, b in placed.items()}
    text = plan.summary()
    assert "circular step" in text and f"x {plan.virtual} laps" in text
    # tune=2 timed two circular layouts, each named with its device groups and laps
    assert len(sm.tuning) == 2 and all(t.virtual >= 2 for t in sm.tuning)
    kept = next(t for t in sm.tuning if t.kept)
    assert (kept.num_stages, kept.virtual) == (plan.ring, plan.virtual)
    assert f"{plan.ring} x tp 1 x {plan.virtual} laps" in plan.notes[-1]
    # the weights come back as the model's tree (each device's stages unpacked)
    exported = sm.export_params()
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(nnx.state(model)),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    again = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4],
                                  plan=lwjax.Plan.from_json(plan.to_json()))
    np.testing.assert_allclose(again(tokens), expected, atol=ATOL, rtol=RTOL)


def test_a_circular_plan_refuses_what_runs_one_stage_per_device(circular_sm):
    model, tokens, sm = circular_sm
    with pytest.raises(ConfigError, match="schedule='gpipe' runs one stage per device"):
        lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], plan=sm.plan,
                              schedule="gpipe")
    for train in (lambda: sm.value_and_grad(lambda logits: logits.sum()),
                  lambda: lwjax.training.value_and_grad(sm, lambda logits: logits.sum()),
                  lambda: lwjax.training.TrainStep(sm, lambda logits: logits.sum(),
                                                   optax.sgd(0.1), "gpipe")):
        with pytest.raises(ConfigError, match="training pipelines one stage per device"):
            train()
    with pytest.raises(ConfigError, match="circular"):
        sm.replan(exclude_devices=[sm.plan.stages[0].devices[0]])
    edited = dataclasses.replace(sm.plan, stages=(
        dataclasses.replace(sm.plan.stages[0], devices=(3,)), *sm.plan.stages[1:]))
    with pytest.raises(lwjax.errors.DeviceError, match="stage k runs on stage k mod"):
        lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], plan=edited)


def test_schedule_circular_never_plans_gpipe_silently(dense):
    """With nothing for the layout search to choose (M pinned, allow=()), no circular layout
    is planned: the call says why instead of running GPipe under another name."""
    model, tokens, _ = dense
    with pytest.raises(ConfigError, match="found no circular layout"):
        lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=2**30,
                              microbatches=4, allow=(), schedule="circular")


@pytest.mark.parametrize("mode,schedule,says", [
    ("prefill", "interleaved", "neither a forward pass's schedule"),
    ("decode", "circular", "picks a forward pass's pipeline schedule"),
    ("prefill", "1f1b", "plan training; pass mode='train'"),
])
def test_plan_names_what_a_schedule_is_for(dense, mode, schedule, says):
    """lwjax.plan's schedule= names the known schedules and the mode each plans."""
    model, tokens, _ = dense
    with pytest.raises(ConfigError, match=says):
        lwjax.plan(model, tokens, num_devices=4, mode=mode, schedule=schedule)


def test_a_transformers_model_runs_circular():
    """transformers' Flax GPT-2 (8 blocks) on 2 devices x laps: the logits equal the
    model's, and each device's predicted padding equals its placed slots'."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=8, n_embd=32, n_head=4, vocab_size=128,
                                     n_positions=16)
    model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    tokens = np.arange(64, dtype=np.int32).reshape(8, 8) % 128
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], cache_bytes=2**30,
                               schedule="circular")
    assert sm.plan.virtual >= 2 and sm.plan.ring == 2
    np.testing.assert_allclose(sm(tokens).logits, model(tokens).logits, atol=ATOL, rtol=RTOL)
    placed = sm.weight_bytes()
    for s in sm.plan.stages:
        d = placed[s.devices[0]]
        assert sm.plan.padding_bytes[s.index] == d["allocated"] - d["own"]
