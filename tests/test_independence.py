"""Models that mix the examples of a batch: found in the jaxpr (``passes/independence.py``),
planned at M = 1 with a note, refused (``InputError``) when microbatches are asked for; models
that keep every example on its own are not flagged (our models here, the ``transformers``
families in tests/test_zoo.py, which pins M > 1)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import InputError
from lwjax.passes.independence import batch_mixing
from lwjax.passes.trace import trace

B, D = 8, 16


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.linear(x))


class Stack(nnx.Module):
    """Four blocks, ``between`` applied after each."""

    def __init__(self, between, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(4)])
        self.between = between

    def __call__(self, x):
        for block in self.blocks:
            x = self.between(block(x))
        return x


def _scan_rows(x):  # a loop over the examples: each row's result carries the previous rows
    return jax.lax.scan(lambda c, row: (c + row, c + row), jnp.zeros(x.shape[1:]), x)[1]


MIXING = {  # between -> the primitive found
    "batch mean": (lambda x: x - x.mean(0, keepdims=True), "reduce_sum"),
    "first example": (lambda x: x + x[:1], "slice"),
    "gram over the batch": (lambda x: x @ (x.T @ x) / B, "dot_general"),
    "cumsum over the batch": (lambda x: jnp.cumsum(x, axis=0), "cumsum"),
    "sorted over the batch": (lambda x: jnp.sort(x, axis=0), "sort"),
    "rolled over the batch": (lambda x: jnp.roll(x, 1, axis=0), "slice"),
    "next example's row": (lambda x: x[(jnp.arange(B) + 1) % B, jnp.argmax(x, -1)][:, None]
                           + x, "gather"),
    "scan over the examples": (_scan_rows, "scan"),
}

INDEPENDENT = {
    "feature mean": lambda x: x - x.mean(-1, keepdims=True),
    "tokens merged": lambda x: jax.nn.softmax(x.reshape(B, 4, D // 4).reshape(B * 4, D // 4),
                                              axis=-1).reshape(B, D),
    "per-example gather": lambda x: jnp.take_along_axis(
        x, jnp.argsort(x, axis=-1), axis=-1),
    "dropped batch statistic": lambda x: (x.mean(0), x)[1] + 1.0,
    "feature sort": lambda x: jnp.sort(x, axis=-1),
    # CLIP's pooling: each example's row at its own argmax (an index that counts the batch)
    "own row picked": lambda x: x[jnp.arange(B), jnp.argmax(x, -1)][:, None] + x,
}


def _x():
    return jax.random.normal(jax.random.key(0), (B, D))


@pytest.mark.parametrize("case", sorted(MIXING))
def test_mixing_equations_are_found(case):
    between, primitive = MIXING[case]
    found = batch_mixing(trace(Stack(between, nnx.Rngs(0)), _x())).mixing
    assert found is not None and found.primitive == primitive, found
    assert found.shape[found.dim] == B  # the operand's batch dimension
    assert "test_independence.py" in found.where  # the model's own source line


@pytest.mark.parametrize("case", sorted(INDEPENDENT))
def test_independent_models_are_not_flagged(case):
    assert batch_mixing(trace(Stack(INDEPENDENT[case], nnx.Rngs(0)), _x())).mixing is None


@pytest.mark.parametrize("cfg", [models.configs.tiny_dense(), models.configs.tiny_moe()],
                         ids=["dense", "moe"])
def test_our_models_keep_examples_apart(cfg):
    # the MoE layer also computes a batch-wide load-balancing statistic that reaches no
    # output (dead code): it changes no answer and is not flagged
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((4, cfg.seq_len), jnp.int32)
    assert batch_mixing(trace(model, tokens)).mixing is None


def test_a_mixing_model_is_planned_at_one_microbatch_and_gives_its_answers():
    model = Stack(MIXING["batch mean"][0], nnx.Rngs(0))
    x = _x()
    sm = lwjax.layerwise_shard(model, x, devices=jax.devices()[:4], objective="bottleneck")
    assert sm.plan.microbatches == 1
    note = [n for n in sm.plan.notes if "mixes the examples" in n]
    assert len(note) == 1 and "reduce_sum" in note[0] and "test_independence.py" in note[0]
    assert "mixes the examples" in sm.plan.summary()
    np.testing.assert_allclose(np.asarray(sm(x)), np.asarray(model(x)), atol=1e-5, rtol=1e-5)


def test_a_mixing_model_refuses_microbatches():
    model = Stack(MIXING["batch mean"][0], nnx.Rngs(0))
    x = _x()
    with pytest.raises(InputError, match=r"microbatches= 2 microbatches.*'reduce_sum' on a "
                                         r"\[8, 16\] value reduces along its dimension 0.*"
                                         r"Pass microbatches=1"):
        lwjax.layerwise_shard(model, x, devices=jax.devices()[:4], microbatches=2)
    # a plan made for M > 1 (from a model that did not mix) is refused as well
    plan = lwjax.plan(Stack(INDEPENDENT["feature mean"], nnx.Rngs(0)), x, num_devices=4,
                      microbatches=2, objective="bottleneck")
    with pytest.raises(InputError, match="the given plan runs 2 microbatches"):
        lwjax.layerwise_shard(model, x, devices=jax.devices()[:4], plan=plan)


class BatchCentred(nnx.Module):
    """The final norm, then the batch's mean subtracted: one sequence's logits see the others."""

    def __init__(self, norm):
        self.norm = norm

    def __call__(self, x):
        x = self.norm(x)
        return x - x.mean(0, keepdims=True)


def test_generation_of_a_mixing_model_runs_one_group_and_gives_its_tokens():
    cfg = dataclasses.replace(models.configs.tiny_dense(), dtype=jnp.float32, num_layers=4)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    model.final_norm = BatchCentred(model.final_norm)
    prompt = jax.random.randint(jax.random.key(1), (4, 8), 0, cfg.vocab_size, jnp.int32)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=6, devices=jax.devices()[:4],
                                 objective="bottleneck", cache_bytes=2**30)
    assert g.plan.microbatches == 1
    assert any("mixes the examples" in n and "reduce_sum" in n for n in g.plan.notes)
    np.testing.assert_array_equal(np.asarray(g(prompt)),
                                  np.asarray(models.generate(model, prompt, 6)))
    with pytest.raises(InputError, match="microbatches= 2 microbatches, but the model mixes"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=6, devices=jax.devices()[:4],
                                 microbatches=2, cache_bytes=2**30)


def test_more_patterns():
    """A [B, B] score (in-batch negatives) pairs the examples; lax.map over the examples
    does not; a model that prints while it runs (an equation without results) is followed
    past the print."""
    def gram(x):
        return x @ x.T @ jnp.ones((B, D))

    def pairwise(x):
        return jnp.abs(x[:, None] - x[None]).sum(1)

    def printed(x):
        jax.debug.print("{}", x.sum(-1))
        return x - x.mean(0)

    for between, want in ((gram, "pairing the examples"), (pairwise, "pairing the examples"),
                          (printed, "reduces along its dimension 0")):
        found = batch_mixing(trace(Stack(between, nnx.Rngs(0)), _x())).mixing
        assert found is not None and want in found.describe(), found
    def printed_apart(x):
        jax.debug.print("{}", x.sum(-1))
        return x - x.mean(-1)[:, None]

    assert batch_mixing(trace(Stack(printed_apart, nnx.Rngs(0)), _x())).mixing is None
    mapped = Stack(lambda x: jax.lax.map(lambda row: row / jnp.linalg.norm(row), x),
                   nnx.Rngs(0))
    assert batch_mixing(trace(mapped, _x())).mixing is None
    x = _x()
    sm = lwjax.layerwise_shard(mapped, x, devices=jax.devices()[:2], microbatches=2,
                               cache_bytes=2**30)
    np.testing.assert_allclose(np.asarray(sm(x)), np.asarray(mapped(x)), atol=1e-5, rtol=1e-5)
