"""Device loss while running (``ShardedModel.replan``, ``keep_hot_spares``,
``Generator.replan``): outputs stay the model's, weights move device to device and never from
a lost device, the bytes moved are what the two plans imply, and a hot spare turns a loss into
a switch with a program compiled ahead."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lwjax
from lwjax import failover, models
from lwjax.errors import DeviceError
from lwjax.models import configs

ATOL = RTOL = 1e-5
BIG = 2**30


@pytest.fixture(scope="module")
def dense():
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=8)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (8, cfg.seq_len), 0, cfg.vocab_size)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:8], cache_bytes=BIG,
                               microbatches=4, objective="bottleneck")
    return model, tokens, sm, model(tokens)


def _layer_bytes(sm) -> list[int]:
    return [f.weights_bytes for f in sm.plan.numbers.footprints]


def _check_placed(new):
    """The moved weights equal a placement from scratch of the new plan, bit for bit."""
    fresh = new.program.place_params(new._traced.params)
    for a, b in zip(new.params, fresh, strict=True):
        for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
            assert sa.device == sb.device
            np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))


@pytest.mark.parametrize("lost", [[3], pytest.param([1, 4, 6], marks=pytest.mark.slow)])
def test_replan_after_losing_devices_keeps_outputs_and_moves_what_the_plans_need(dense, lost):
    model, tokens, sm, want = dense
    new = sm.replan(exclude_devices=lost)
    used = [d for st in new.plan.stages for d in st.devices]
    # repaired in place: each lost layer joins a neighbour (projected no slower than a full
    # re-partition: the bottleneck is two layers either way), the rest stay
    assert not set(used) & set(lost) and len(used) == 8 - len(lost)
    assert any(n.startswith("repaired in place") for n in new.plan.notes)
    np.testing.assert_allclose(new(tokens), want, atol=ATOL, rtol=RTOL)
    _check_placed(new)
    f = new.failover
    assert f.kind == "migrate" and f.excluded == tuple(lost) and f.compile_s > 0
    # nothing is read from a lost device; what arrives is what the plans need, by hand:
    # per new stage, the layers its device did not run before (one layer per old device)
    assert all(m.src_device not in lost for m in f.moves if m.source != "model")
    layer_bytes = _layer_bytes(sm)
    by_hand = sum(layer_bytes[i] for st in new.plan.stages for i in range(*st.layer_range)
                  if i != st.devices[0])
    outer = {m.param: m for m in f.moves if not m.param.startswith("layers/")}
    by_hand += sum(m.nbytes for m in outer.values() if m.src_device != m.dst_device)
    assert f.bytes_needed == f.bytes_arrived == by_hand == sum(layer_bytes[d] for d in lost)
    assert f.bytes_in_place + f.bytes_arrived == sum(
        new.program.storage.own_bytes(s) for s in range(len(new.plan.stages)))
    # the layers of lost devices come from the model's arrays; the rest from devices
    from_model = {m.param.split("/")[1] for m in f.moves if m.source == "model"}
    assert from_model == {str(d) for d in lost}


@pytest.mark.slow  # a spare taking a lost stage whole: test_a_repair_slower_than_...
def test_spare_devices_join_and_weights_stay_where_they_are(dense):
    model, tokens, sm, want = dense
    new = sm.replan(exclude_devices=[6], spare_devices=[12])
    np.testing.assert_allclose(new(tokens), want, atol=ATOL, rtol=RTOL)
    # layer 6 goes to the spare; every other layer stays on its device
    assert [st.devices[0] for st in new.plan.stages] == [0, 1, 2, 3, 4, 5, 12, 7]
    assert new.failover.bytes_arrived == _layer_bytes(sm)[6]
    assert new.failover.bytes_moved == 0


def test_a_hot_spare_makes_a_loss_a_switch(dense):
    model, tokens, sm, want = dense
    spare = sm.keep_hot_spares({2: 9})[2]
    assert spare.copied_bytes == sm.program.storage.own_bytes(2) and spare.compile_s > 0
    new = sm.replan(exclude_devices=[2])
    f = new.failover
    assert (f.kind, f.compile_s, f.bytes_moved, f.bytes_from_model) == ("switch", 0.0, 0, 0)
    assert f.bytes_needed == f.bytes_arrived == spare.copied_bytes
    assert new.program is spare.program  # compiled ahead
    assert [st.devices[0] for st in new.plan.stages] == [0, 1, 9, 3, 4, 5, 6, 7]
    assert [st.layer_range for st in new.plan.stages] == \
        [st.layer_range for st in sm.plan.stages]
    np.testing.assert_allclose(new(tokens), want, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(jax.jit(new)(tokens), want, atol=ATOL, rtol=RTOL)
    assert f"{spare.copied_bytes:,} bytes" in f.summary() and "on their hot spares" in f.summary()
    with pytest.raises(DeviceError, match=r"\[13\]: not in the plan's pool"):
        sm.replan(exclude_devices=[2, 13])  # a switch checks the pool as a migration does
    # losing the spare's stage and another one: a migration that reads the spare's copy
    both = sm.replan(exclude_devices=[2, 5])
    assert both.failover.kind == "migrate"
    assert {m.param.split("/")[1] for m in both.failover.moves
            if m.source in ("spare", "spare-local")} == {"2"}
    np.testing.assert_allclose(both(tokens), want, atol=ATOL, rtol=RTOL)
    sm.hot_spares.clear()


def test_weights_that_cannot_be_restored_are_an_error(dense):
    model, tokens, sm, want = dense
    # the model's arrays live on device 0: losing it loses stage 0's only copies
    assert {d.id for d in model.embed[...].devices()} == {0}
    with pytest.raises(DeviceError, match=r"lost device 0.*keep a hot spare"):
        sm.replan(exclude_devices=[0])
    drained = sm.replan(exclude_devices=[0], drain=True)  # device 0 still works
    assert drained.failover.bytes_from_model == 0
    np.testing.assert_allclose(drained(tokens), want, atol=ATOL, rtol=RTOL)
    with pytest.raises(DeviceError, match="not in the plan's pool"):
        sm.replan(exclude_devices=[11])
    with pytest.raises(DeviceError, match="runs stage 1"):
        sm.keep_hot_spares({0: 1})
    with pytest.raises(DeviceError, match="'x', which is not a device"):
        sm.keep_hot_spares({1: "x"})
    with pytest.raises(DeviceError, match="9.7, which is not a device"):
        sm.keep_hot_spares({1: 9.7})


def test_weights_other_than_the_models_are_not_restored_from_it(dense):
    model, tokens, _, _ = dense
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=BIG,
                               microbatches=2, objective="bottleneck")
    sm.load_params(sm.train_step(lambda y, t: y.mean(), optax.sgd(0.1)).init())
    with pytest.raises(DeviceError, match="differ from the model's own arrays"):
        sm.replan(exclude_devices=[2])


@pytest.mark.slow
def test_trained_weights_survive_a_loss_only_through_a_hot_spare(dense):
    model, tokens, _, _ = dense
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=BIG,
                               microbatches=2, objective="bottleneck")

    def loss_fn(logits, targets):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    step = sm.train_step(loss_fn, optax.sgd(0.5))
    state, _ = step(step.init(), tokens, tokens)
    sm.load_params(state)
    trained = sm(tokens)
    assert not np.allclose(trained, dense[3], atol=1e-3)
    with pytest.raises(DeviceError, match="differ from the model's own arrays"):
        sm.replan(exclude_devices=[2])
    sm.keep_hot_spares({2: 10}, compile_ahead=False)
    new = sm.replan(exclude_devices=[2], spare_devices=[11])  # a migration from the spare
    assert new.failover.kind == "migrate" and new.failover.bytes_from_model == 0
    assert {m.source for m in new.failover.moves if m.param.startswith("layers/4/")} <= \
        {"spare", "spare-local"}
    np.testing.assert_allclose(new(tokens), trained, atol=ATOL, rtol=RTOL)
    with pytest.raises(DeviceError, match="differ from the model's own arrays"):
        sm.replan(exclude_devices=[1])
    switched = sm.replan(exclude_devices=[2])
    assert switched.failover.compile_s > 0  # not compiled ahead
    np.testing.assert_allclose(switched(tokens), trained, atol=ATOL, rtol=RTOL)


def test_generator_replan_gives_the_same_tokens(dense):
    model, tokens, _, _ = dense
    prompt = tokens[:, :8]
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=2, devices=jax.devices()[:3],
                                 microbatches=2, objective="bottleneck", cache_bytes=BIG)
    want = models.generate(model, prompt, 2)
    np.testing.assert_array_equal(g(prompt), want)
    g2 = g.replan(exclude_devices=[1])
    f = g2.failover
    assert 1 not in {d for st in g2.plan.stages for d in st.devices}
    assert f.bytes_needed == f.bytes_arrived > 0 and f.compile_s > 0
    np.testing.assert_array_equal(g2(prompt), want)
    own = g2.kv_cache_bytes()
    assert set(own) == {st.devices[0] for st in g2.plan.stages}


def test_a_repair_slower_than_replanning_is_not_taken(dense):
    model, tokens, _, _ = dense
    plan = lwjax.plan(model, tokens, devices=jax.devices()[:4], cache_bytes=BIG,
                      microbatches=4, objective="bottleneck")
    assert [st.layer_range for st in plan.stages] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # losing stage 1: joining a neighbour makes a 4-layer stage; 3 devices do it in 3
    new = failover._new_plan(plan, [1], [])
    sizes = [b - a for a, b in (st.layer_range for st in new.stages)]
    assert max(sizes) == 3
    assert not any("repaired in place" in n for n in new.notes)
    # the re-partition keeps devices where they were: device 0 keeps layer 0 and 1, ...
    held = {st.devices[0]: set(range(*st.layer_range)) for st in plan.stages}
    for st in new.stages:
        kept = held[st.devices[0]] & set(range(*st.layer_range))
        assert kept, f"stage {st.layer_range} on device {st.devices[0]} keeps nothing"
    # with a spare, the lost stage moves there whole
    spared = failover._new_plan(plan, [1], [13])
    assert [st.devices[0] for st in spared.stages] == [0, 13, 2, 3]
    assert [st.layer_range for st in spared.stages] == [st.layer_range for st in plan.stages]
