"""Training through the pipeline: loss and every gradient equal the unsharded model's, optax
steps equal single-device training, schedules follow their tick tables, bad input is refused.

Tolerances: loss and gradients float32, rtol 1e-5 (relative to each leaf's largest
gradient); parameters after adamw steps within 5% of one step's size (adam divides by the
root of the second moment, so an element whose gradient is ~1e-7 -- float32 noise -- moves
by up to the learning rate either way)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import ConfigError, InputError, LossError, OptimizerError
from lwjax.passes.schedules import TRAIN_SCHEDULES
from lwjax.training import check_optimizer

BATCH = 8


def cross_entropy(outputs, targets_BT):
    """Mean token cross-entropy; adds a per-example auxiliary loss when the model returns one;
    reads ``.logits`` from a transformers output."""
    aux = 0.0
    if isinstance(outputs, tuple):
        outputs, aux_B = outputs
        aux = aux_B.mean()
    logits = getattr(outputs, "logits", outputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT).mean() + aux


def _model(kind: str, num_layers: int = 4):
    base = models.configs.tiny_moe() if kind == "moe" else models.configs.tiny_dense()
    cfg = dataclasses.replace(base, dtype=jnp.float32, num_layers=num_layers,
                              tie_embeddings=kind == "tied")
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, cfg.seq_len), 0, cfg.vocab_size)
    return cfg, model, tokens, jnp.roll(tokens, -1, axis=1)


def _shard(model, *args, devices: int, microbatches: int, **kwargs):
    return lwjax.layerwise_shard(model, *args, devices=jax.devices()[:devices],
                                 microbatches=microbatches, cache_bytes=2**30,
                                 objective="bottleneck", hardware="h100", allow=(), **kwargs)


def _assert_grads_equal(got, want):
    got_l, want_l = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)
    assert len(got_l) == len(want_l) > 0
    for (path, a), b in zip(got_l, want_l, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        assert float(np.max(np.abs(a - b))) <= 1e-5 * scale, jax.tree_util.keystr(path)


# ---- schedules -------------------------------------------------------------------------------

HAND_TABLES = {
    ("gpipe", 2, 3): ["s0: F0 F1 F2 .  .  B0 B1 B2",
                      "s1: .  F0 F1 F2 B0 B1 B2"],
    ("1f1b", 2, 3): ["s0: F0 F1 .  B0 F2 B1 .  B2",
                     "s1: .  F0 B0 F1 B1 F2 B2"],
    ("1f1b", 3, 4): ["s0: F0 F1 F2 .  .  B0 F3 B1 .  B2 .  B3",
                     "s1: .  F0 F1 .  B0 F2 B1 F3 B2 .  B3",
                     "s2: .  .  F0 B0 F1 B1 F2 B2 F3 B3"],
}


@pytest.mark.parametrize("name,stages,microbatches", sorted(HAND_TABLES))
def test_tick_table_matches_the_hand_written_one(name, stages, microbatches):
    table = TRAIN_SCHEDULES[name].table(stages, microbatches)
    assert str(table).splitlines() == HAND_TABLES[name, stages, microbatches]
    assert table.num_ticks == 2 * (microbatches + stages - 1)


@pytest.mark.parametrize("stages,microbatches", [(2, 8), (4, 8), (4, 16), (8, 16)])
def test_1f1b_stashes_at_most_s_inputs_gpipe_all_m(stages, microbatches):
    assert TRAIN_SCHEDULES["gpipe"].table(stages, microbatches).stash() == microbatches
    assert TRAIN_SCHEDULES["1f1b"].table(stages, microbatches).stash() <= stages


# ---- gradients equal the model's -------------------------------------------------------------

@pytest.mark.parametrize("kind,schedule,devices,microbatches", [
    ("moe", "1f1b", 3, 4),             # MoE with its aux loss; uneven stages: 1, 2, 1 layers
    pytest.param("dense", "gpipe", 3, 4, marks=pytest.mark.slow),  # GPipe: the adamw test
    pytest.param("dense", "1f1b", 4, 8, marks=pytest.mark.slow),
    pytest.param("moe", "gpipe", 2, 2, marks=pytest.mark.slow),
    pytest.param("tied", "1f1b", 3, 2, marks=pytest.mark.slow),
    pytest.param("dense", "gpipe", 1, 4, marks=pytest.mark.slow),
])
def test_value_and_grad_equals_the_model(kind, schedule, devices, microbatches):
    _, model, tokens, targets = _model(kind)
    kwargs = {"with_aux": True} if kind == "moe" else {}
    sm = _shard(model, tokens, devices=devices, microbatches=microbatches, **kwargs)
    assert len(sm.plan.stages) == devices
    loss, grads = sm.value_and_grad(cross_entropy, schedule=schedule)(tokens, targets, **kwargs)
    # jitted: the numbers nnx.value_and_grad gives eagerly, without compiling op by op
    want_loss, want = nnx.jit(nnx.value_and_grad(
        lambda m: cross_entropy(m(tokens, **kwargs), targets)))(model)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    _assert_grads_equal(grads, want)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=97, n_layer=3, n_embd=32, n_head=4,
                                     n_positions=64)
    model = transformers.FlaxGPT2LMHeadModel(config, seed=0, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (BATCH, 16), 2, 97)
    return model, ids, jnp.roll(ids, -1, axis=1)


def test_transformers_model_gradients_equal_jax_grad():
    model, ids, targets = _gpt2()
    sm = _shard(model, ids, devices=3, microbatches=4)
    loss, grads = sm.value_and_grad(cross_entropy, schedule="1f1b")(ids, targets)
    want_loss, want = jax.jit(jax.value_and_grad(
        lambda p: cross_entropy(model(ids, params=p), targets)))(model.params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(want)
    _assert_grads_equal(grads, want)


@pytest.mark.slow
def test_linen_module_gradients_are_variables_params():
    model, ids, targets = _gpt2()
    variables = {"params": model.params}
    mask = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    sm = _shard(model.module, variables, ids, mask, positions, devices=2, microbatches=2)
    loss, grads = sm.value_and_grad(cross_entropy)(ids, mask, positions, targets)
    want_loss, want = jax.value_and_grad(lambda p: cross_entropy(
        model.module.apply({"params": p}, ids, mask, positions), targets))(model.params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    _assert_grads_equal(grads, want)


# ---- optimizer steps ---------------------------------------------------------------------------

def test_three_adamw_steps_equal_single_device_training():
    cfg, model, tokens, targets = _model("dense")
    sm = _shard(model, tokens, devices=3, microbatches=4)
    lr = 1e-3
    step = sm.train_step(cross_entropy, optax.adamw(lr), schedule="gpipe")
    state = step.init()
    ref = models.build(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(ref, optax.adamw(lr), wrt=nnx.Param)

    @nnx.jit
    def ref_step(m, opt):
        loss, g = nnx.value_and_grad(lambda m: cross_entropy(m(tokens), targets))(m)
        opt.update(m, g)
        return loss

    for _ in range(3):
        state, loss = step(state, tokens, targets)
        np.testing.assert_allclose(float(loss), float(ref_step(ref, opt)), rtol=1e-5)
    assert int(state.step) == 3
    got = nnx.filter_state(step.export_params(state), nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(nnx.state(ref, nnx.Param)),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * lr, rtol=0)
    # each device holds its own stage's weights and optimizer moments: one row of each slot
    mu = state.opt_state[0].mu
    for arrays in (state.params, mu):
        for a in arrays:
            assert {tuple(s.data.shape) for s in a.addressable_shards} == {(1, a.shape[1])}
    # the trained weights load back into the model, and into the pipeline
    nnx.update(model, step.export_params(state))
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(ref(tokens)), atol=1e-4)
    sm.load_params(state)
    np.testing.assert_allclose(np.asarray(sm(tokens)), np.asarray(ref(tokens)), atol=1e-4)


def test_export_params_round_trips_the_model():
    _, model, tokens, _ = _model("dense", num_layers=2)
    sm = _shard(model, tokens, devices=2, microbatches=2)
    exported = sm.export_params()
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    _, model, tokens, targets = _model("dense", num_layers=2)
    return _shard(model, tokens, devices=2, microbatches=2), tokens, targets


def test_loss_that_is_not_a_scalar_is_refused(small):
    sm, tokens, targets = small
    per_token = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y)  # noqa: E731
    with pytest.raises(LossError, match=r"float scalar.*float32\[4, 16\].*mean"):
        sm.value_and_grad(per_token)(tokens, targets)
    with pytest.raises(LossError, match="failed on one microbatch"):
        sm.value_and_grad(lambda logits, y: logits["nope"])(tokens, targets)


def test_targets_that_do_not_split_are_refused(small):
    sm, tokens, targets = small
    with pytest.raises(InputError, match=r"target \[0\] has shape \(16,\).*batch \(8\)"):
        sm.value_and_grad(cross_entropy)(tokens, targets[0])
    with pytest.raises(InputError, match="then the targets"):
        sm.value_and_grad(cross_entropy)(tokens)


def test_unknown_schedule_is_refused(small):
    sm, _, _ = small
    with pytest.raises(ConfigError, match=r"'pipedream'.*\['1f1b', 'gpipe'\]"):
        sm.train_step(cross_entropy, optax.sgd(0.1), schedule="pipedream")


@pytest.mark.parametrize("optimizer,match", [
    (optax.adafactor(1e-3), "cannot be sharded"),
    (optax.lamb(1e-3), "grouped"),
    (optax.adamw(1e-3, mask={"embed": True}), "failed on weights grouped"),
])
def test_optimizers_that_cannot_run_per_stage_are_refused(optimizer, match):
    with pytest.raises(OptimizerError, match=match):
        check_optimizer(optimizer)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1, momentum=0.9), optax.adamw(1e-3),
                                       optax.adamw(1e-4), optax.adamw(
                                           optax.warmup_cosine_decay_schedule(0, 1e-3, 5, 50)),
                                       optax.lion(1e-4), optax.chain(
                                           optax.clip_by_global_norm(1.0), optax.adam(1e-3))])
def test_elementwise_optimizers_pass_the_check(optimizer):
    check_optimizer(optimizer)


def test_not_an_optimizer_is_refused(small):
    sm, _, _ = small
    with pytest.raises(ConfigError, match="GradientTransformation"):
        sm.train_step(cross_entropy, "adam")


def test_a_training_plan_runs_with_its_own_schedule():
    _, model, tokens, targets = _model("dense", num_layers=2)
    p = lwjax.plan(model, tokens, devices=jax.devices()[:2], mode="train", schedule="1f1b",
                   microbatches=2, objective="bottleneck", hardware="h100", allow=())
    assert p.mode == "train" and p.schedule == "1f1b"
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices(), plan=p)
    step = sm.train_step(cross_entropy, optax.sgd(0.1))
    assert step.schedule == "1f1b"
    with pytest.raises(ConfigError, match="schedule='1f1b', whose stash it counted"):
        sm.train_step(cross_entropy, optax.sgd(0.1), schedule="gpipe")
