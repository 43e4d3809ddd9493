"""Training through the baselines against the unsharded model (16 simulated CPU devices).

Oracle: the gradient of the same loss on the unsharded model itself, float32 (jitted
``jax.value_and_grad`` over ``nnx.split(model, nnx.Param)``, which is what
``nnx.value_and_grad`` computes). The baselines
sum in another order (row-parallel all-reduces, microbatch means), so loss and every gradient
leaf agree to RTOL = 1e-5, ATOL = 1e-6 (observed gradient differences are <= 5e-8), not
bitwise. Loss: mean token cross-entropy, plus the batch mean of the MoE auxiliary loss where
``with_aux=True``.

Optimizer steps: 3 steps of AdamW through ``tp_pp`` against 3 steps of a plain jitted
single-device loop. AdamW uses ``eps=1e-4`` instead of optax's 1e-8: with eps = 1e-8 Adam
divides a gradient of ~1e-8 (a few weights of this tiny random model have one) by about its own
size, so a float32 rounding difference of 3e-8 in it moves that weight by up to the learning
rate (observed: 2 of 8192 weights off by 7.7e-5 after 3 steps). eps = 1e-4 bounds how far a
gradient difference dg can move a weight to lr * dg / eps ~ 5e-7, inside ATOL.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lwjax import baselines, models
from lwjax.errors import ConfigError, InputError, LossError

RTOL, ATOL = 1e-5, 1e-6
TP, PP, MICROBATCHES = 2, 2, 2
STEPS = 3


def cross_entropy(logits_BTV, targets_BT):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def cross_entropy_with_aux(outputs, targets_BT):
    logits_BTV, aux_B = outputs
    return cross_entropy(logits_BTV, targets_BT) + aux_B.mean()


def _optimizer():
    return optax.adamw(1e-3, eps=1e-4)  # eps: see the module docstring


@functools.cache
def _setup(kind: str):
    """Model, tokens, targets, and the unsharded reference: ``value_and_grad(params)`` (jitted)
    and its (loss, grads) at the model's weights."""
    base = models.configs.tiny_moe() if kind == "moe" else models.configs.tiny_dense()
    cfg = dataclasses.replace(base, dtype=jnp.float32)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(
        jax.random.key(1), (cfg.batch_size, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
    )
    targets = jax.random.randint(
        jax.random.key(2), (cfg.batch_size, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
    )
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        m = nnx.merge(graphdef, params)
        if kind == "moe":
            return cross_entropy_with_aux(m(tokens, with_aux=True), targets)
        return cross_entropy(m(tokens), targets)

    # jitted: the same numbers as nnx.value_and_grad(...)(model), in a quarter of the time.
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    return model, tokens, targets, value_and_grad, value_and_grad(params)


@functools.cache
def _tp_pp(kind: str):
    model, tokens, *_ = _setup(kind)
    return baselines.tp_pp(
        model, tokens, devices=jax.devices()[: TP * PP], tp=TP, pp=PP, microbatches=MICROBATCHES
    )


def _assert_trees_close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    for (path, g), w in zip(got_leaves, jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path)
        )


def _check_value_and_grad(b, kind):
    model, tokens, targets, _, (want_loss, want_grads) = _setup(kind)
    loss_fn = cross_entropy_with_aux if kind == "moe" else cross_entropy
    loss, grads = b.value_and_grad(loss_fn, with_aux=kind == "moe")(tokens, targets)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=RTOL)
    # The model's own tree: every leaf, in nnx.state(model, nnx.Param)'s structure.
    assert jax.tree.structure(grads) == jax.tree.structure(nnx.state(model, nnx.Param))
    _assert_trees_close(grads, want_grads)


@pytest.mark.parametrize("kind", ["dense", pytest.param("moe", marks=pytest.mark.slow)])
def test_tp_pp_value_and_grad_matches_model(kind):
    _check_value_and_grad(_tp_pp(kind), kind)


@pytest.mark.parametrize("kind", ["dense", pytest.param("moe", marks=pytest.mark.slow)])
def test_single_device_value_and_grad_matches_model(kind):
    model, tokens, *_ = _setup(kind)
    _check_value_and_grad(baselines.single_device(model, tokens), kind)


@pytest.mark.slow
def test_moe_aux_loss_is_part_of_the_gradient():
    """The aux term is not negligible here: without it the router gradients differ."""
    _, tokens, targets, _, (_, want_grads) = _setup("moe")
    _, grads = _tp_pp("moe").value_and_grad(cross_entropy)(tokens, targets)
    router, want_router = (g["layers"][0]["mlp"]["router"][...] for g in (grads, want_grads))
    assert not np.allclose(np.asarray(router), np.asarray(want_router), rtol=RTOL, atol=ATOL)


def _reference_steps(kind: str, optimizer, steps: int) -> nnx.State:
    """A plain single-device loop on the model's own tree: the reference value_and_grad and
    optax."""
    model, _, _, value_and_grad, _ = _setup(kind)
    params = nnx.state(model, nnx.Param)
    opt_state = optimizer.init(params)

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    losses = []
    for _ in range(steps):
        loss, grads = value_and_grad(params)
        params, opt_state = update(grads, opt_state, params)
        losses.append(float(loss))
    return params, losses


@functools.cache
def _tp_pp_trained():
    _, tokens, targets, *_ = _setup("dense")
    step = _tp_pp("dense").train_step(cross_entropy, _optimizer())
    state, losses = step.init(), []
    for _ in range(STEPS):
        state, loss = step(state, tokens, targets)
        losses.append(float(loss))
    return step, state, losses


def test_tp_pp_train_steps_match_reference_loop():
    step, state, losses = _tp_pp_trained()
    want_params, want_losses = _reference_steps("dense", _optimizer(), STEPS)
    assert int(state.step) == STEPS
    np.testing.assert_allclose(losses, want_losses, rtol=RTOL)
    exported = step.export_params(state)
    _assert_trees_close(exported, want_params)
    # The export loads into a fresh model of the same config.
    model = models.build(_setup("dense")[0].cfg, rngs=nnx.Rngs(7))
    nnx.update(model, exported)
    _assert_trees_close(nnx.state(model, nnx.Param), want_params)


@pytest.mark.slow
def test_single_device_train_steps_match_reference_loop():
    model, tokens, targets, *_ = _setup("dense")
    step = baselines.single_device(model, tokens).train_step(cross_entropy, _optimizer())
    state = step.init()
    for _ in range(STEPS):
        state, _ = step(state, tokens, targets)
    _assert_trees_close(
        step.export_params(state), _reference_steps("dense", _optimizer(), STEPS)[0]
    )


def _stage_slice_elements(cfg: models.DenseConfig, tp: int, pp: int) -> int:
    """Weights one tp_pp device holds, worked out by hand: its stage's L/pp blocks with q/k/v/out
    (D x N x H each) and gate/up/down (D x F each) split over tp, the two norms whole; the
    embedding and LM head (V x D each) split over tp on every stage; the final norm whole."""
    d, n, h, f, v = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.head_dim,
        cfg.mlp_hidden_size,
        cfg.vocab_size,
    )
    block = 2 * d + (4 * d * n * h + 3 * d * f) // tp
    return cfg.num_layers // pp * block + 2 * v * d // tp + d


def _bytes_on(tree, device) -> int:
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def test_tp_pp_train_state_holds_only_the_stage_tp_slice():
    step, state, _ = _tp_pp_trained()
    cfg = _setup("dense")[0].cfg
    params_bytes = 4 * _stage_slice_elements(cfg, TP, PP)  # float32
    whole = 4 * sum(a.size for a in jax.tree.leaves(nnx.state(_setup("dense")[0], nnx.Param)))
    assert params_bytes < whole / 3  # a slice of the model, not the model
    for device in _tp_pp("dense").mesh.devices.flat:
        assert _bytes_on(state.params, device) == params_bytes
        # AdamW: mu and nu, each sharded like its parameter, plus one int32 step count.
        assert _bytes_on(state.opt_state, device) == 2 * params_bytes + 4
    mu = state.opt_state[0].mu
    for param, moment in zip(jax.tree.leaves(state.params), jax.tree.leaves(mu), strict=True):
        assert moment.sharding.is_equivalent_to(param.sharding, param.ndim)


def test_train_step_keeps_the_baseline_weights():
    """init() copies: donating the state to a step leaves the baseline runnable."""
    _tp_pp_trained()
    b = _tp_pp("dense")
    assert all(not a.is_deleted() for a in jax.tree.leaves(b.params))


# ---- errors ---------------------------------------------------------------------------------


def test_target_with_another_batch_raises_input_error():
    _, tokens, targets, *_ = _setup("dense")
    f = _tp_pp("dense").value_and_grad(cross_entropy)
    with pytest.raises(InputError, match=r"targets\[0\] has shape \(2, 16\).*\[4, \.\.\.\]"):
        f(tokens, targets[:2])
    with pytest.raises(InputError, match=r"targets\[1\] is 3 \(int\), not an array"):
        f(tokens, targets, 3)


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (
            lambda logits, t: optax.softmax_cross_entropy_with_integer_labels(logits, t),
            r"float scalar.*returned float32\[2, 16\]",
        ),
        (lambda logits, t: jnp.argmax(logits).astype(jnp.int32), r"returned int32\[\]"),
        (lambda logits, t: (cross_entropy(logits, t), logits), r"returned \(float32\[\], "),
        (
            lambda logits, t: logits @ t,
            r"loss_fn failed on one microbatch's outputs "
            r"float32\[2, 16, 256\] and targets \(int32\[2, 16\]\)",
        ),
    ],
    ids=["per-token", "integer", "tuple", "fails"],
)
def test_bad_loss_raises_loss_error(loss_fn, match):
    _, tokens, targets, *_ = _setup("dense")
    with pytest.raises(LossError, match=match):
        _tp_pp("dense").value_and_grad(loss_fn)(tokens, targets)


def test_with_aux_on_a_dense_model_raises_config_error():
    with pytest.raises(ConfigError, match="dense"):
        _tp_pp("dense").value_and_grad(cross_entropy, with_aux=True)


def test_bad_optimizer_and_state_raise():
    _, tokens, targets, *_ = _setup("dense")
    b = _tp_pp("dense")
    with pytest.raises(ConfigError, match="GradientTransformation"):
        b.train_step(cross_entropy, optax.adamw)
    step, _, _ = _tp_pp_trained()
    with pytest.raises(InputError, match="TrainState"):
        step(b.params, tokens, targets)


def test_abstract_baseline_cannot_train():
    cfg = _setup("dense")[0].cfg
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    b = baselines.tp_pp(models.abstract(cfg), tokens, devices=jax.devices()[:4], tp=2, pp=2)
    with pytest.raises(ConfigError, match="abstract"):
        b.train_step(cross_entropy, _optimizer()).init()
