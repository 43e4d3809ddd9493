"""The generation baselines against ``models.generate`` (16 simulated CPU devices).

Oracle: ``models.generate(model, prompt, 32)`` in float32, token for token. The sharded
program sums the row-parallel all-reduces in another order, so logits differ from the
reference in the last bits; on these models and prompts no argmax is that close to a tie
(a flip would show as a mismatch, not be hidden by a tolerance). KV cache bytes per device
against the hand arithmetic layers_per_stage x 2 (K, V) x B x max_len x N / tp x H x 4 and
against XLA's ``memory_analysis()`` (the donated cache is the program's aliased bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lwjax import baselines, models
from lwjax.errors import ConfigError, DeviceError, InputError

NEW_TOKENS = 32
BATCH, PROMPT_LEN = 4, 8
MAX_LEN = PROMPT_LEN + NEW_TOKENS


def _config(kind: str, **changes) -> models.DenseConfig:
    base = models.configs.tiny_moe() if kind == "moe" else models.configs.tiny_dense()
    return dataclasses.replace(base, dtype=jnp.float32, **changes)


@functools.cache
def _setup(kind: str, **changes):
    """Model, prompt [4, 8] and the reference continuation [4, 32]."""
    cfg = _config(kind, **changes)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(
        jax.random.key(1), (BATCH, PROMPT_LEN), 0, cfg.vocab_size, jnp.int32
    )
    return model, prompt, np.asarray(models.generate(model, prompt, NEW_TOKENS))


@functools.cache
def _generator(kind: str, tp: int, pp: int, microbatches: int):
    model, prompt, _ = _setup(kind)
    return baselines.tp_pp_generate(
        model,
        prompt,
        max_new_tokens=NEW_TOKENS,
        devices=jax.devices()[: tp * pp],
        tp=tp,
        pp=pp,
        microbatches=microbatches,
    )


@pytest.mark.parametrize(
    "kind, tp, pp, microbatches",
    [("dense", 2, 2, 2), pytest.param("dense", 4, 2, 4, marks=pytest.mark.slow),
     pytest.param("moe", 2, 2, 4, marks=pytest.mark.slow), ("moe", 4, 2, 2)],
)
def test_tp_pp_generate_matches_models_generate(kind, tp, pp, microbatches):
    _, prompt, want = _setup(kind)
    assert len(np.unique(want)) > 8  # a continuation worth comparing, not one repeated token
    got = _generator(kind, tp, pp, microbatches)(prompt)
    assert got.dtype == jnp.int32 and got.shape == (BATCH, NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_single_device_generate_matches_models_generate(kind):
    model, prompt, want = _setup(kind)
    ref = baselines.single_device_generate(
        model, prompt, max_new_tokens=NEW_TOKENS, device=jax.devices()[3]
    )
    got = ref(prompt)
    assert got.devices() == {jax.devices()[3]}
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(ref(prompt)), want)  # the reused cache is harmless
    # all layers: 4 x 2 (K, V) x B x max_len x N x H x 4 bytes
    cfg = model.cfg
    want_bytes = cfg.num_layers * 2 * BATCH * MAX_LEN * cfg.num_heads * cfg.head_dim * 4
    assert ref.kv_cache_bytes_per_device() == want_bytes


@pytest.mark.slow  # tied embeddings in tp_pp: tests/test_baselines.py (default run)
def test_tied_embeddings_batch_not_divisible_by_pp():
    # Batch 3 over pp=2: the head runs replicated over "pp".
    model, _, _ = _setup("dense", tie_embeddings=True)
    prompt = jax.random.randint(jax.random.key(2), (3, 5), 0, model.cfg.vocab_size, jnp.int32)
    g = baselines.tp_pp_generate(
        model, prompt, max_new_tokens=6, devices=jax.devices()[:4], tp=2, pp=2, microbatches=3
    )
    assert g.params["lm_head"] is None and "P(None, 'tp')" in g.layout
    want = np.asarray(models.generate(model, prompt, 6))
    np.testing.assert_array_equal(np.asarray(g(prompt)), want)


def test_second_call_does_not_recompile_and_reuses_the_cache(caplog):
    _, prompt, want = _setup("dense")
    g = _generator("dense", 2, 2, 2)
    # Rows reversed: each row's cache will hold another row's stale keys and values.
    reversed_prompt = jnp.asarray(np.asarray(prompt)[::-1])
    caplog.set_level(logging.WARNING)
    with jax.log_compiles():
        jax.jit(lambda x: x + 1)(jnp.arange(3.0))  # the log does report compiles here
        assert any("Compiling" in r.getMessage() for r in caplog.records)
        np.testing.assert_array_equal(np.asarray(g(prompt)), want)  # compiles if not yet
        caplog.clear()
        got = g(reversed_prompt)
        assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []
    np.testing.assert_array_equal(np.asarray(got), want[::-1])


@pytest.mark.parametrize("tp", [2, 4])
def test_kv_cache_is_stage_major_head_sharded_and_counted(tp):
    model, prompt, _ = _setup("dense")
    cfg, g = model.cfg, _generator("dense", tp, 2, 2)
    lps, heads = cfg.num_layers // 2, cfg.num_heads // tp
    g(prompt)
    keys = g.cache.keys
    assert keys.sharding.spec == P("pp", None, None, None, "tp", None)
    assert keys.shape == (2, lps, BATCH, MAX_LEN, cfg.num_heads, cfg.head_dim)
    for shard in keys.addressable_shards:
        assert shard.data.shape == (1, lps, BATCH, MAX_LEN, heads, cfg.head_dim)
    want_bytes = lps * 2 * BATCH * MAX_LEN * heads * cfg.head_dim * 4
    assert g.kv_cache_bytes_per_device() == want_bytes
    assert g.compile(prompt).memory_analysis().alias_size_in_bytes == want_bytes


def test_cache_holds_the_models_keys_and_values_layer_by_layer():
    """Layer l's cache sits at [l // layers_per_stage, l % layers_per_stage]; positions
    0 .. T + N - 2 hold the keys/values of the prompt and the fed-back tokens."""
    model, prompt, want = _setup("dense")
    g = _generator("dense", 2, 2, 2)
    g(prompt)
    filled = PROMPT_LEN + NEW_TOKENS - 1  # the last new token is never fed back
    fed = jnp.concatenate([prompt, want[:, :-1]], axis=1)
    graphdef, state = nnx.split(model)
    _, ref = jax.jit(lambda s, t: nnx.merge(graphdef, s).prefill(t, MAX_LEN))(state, fed)
    got_keys = np.asarray(g.cache.keys).reshape(-1, *g.cache.keys.shape[2:])
    got_values = np.asarray(g.cache.values).reshape(-1, *g.cache.values.shape[2:])
    for layer in range(model.cfg.num_layers):
        for got, cached in ((got_keys, ref.keys), (got_values, ref.values)):
            np.testing.assert_allclose(
                got[layer, :, :filled], np.asarray(cached[layer])[:, :filled], atol=1e-5
            )


def test_layout_and_repr_say_where_caches_live():
    g = _generator("moe", 4, 2, 2)
    text = repr(g)
    assert "pp=2 x tp=4" in text and "max_new_tokens=32" in text and "expert-parallel" in text
    assert "KV cache: keys, values [pp, 2, 4, max_len=40, 4, 16] float32" in text
    assert "prefill + 31 decode steps in a lax.scan" in text and "GPipe pass of 3 ticks" in text
    assert isinstance(g, baselines.GenerationBaseline) and g.num_microbatches == 2
    assert g.mesh.shape == {"pp": 2, "tp": 4}


def test_abstract_model_lowers_and_compiles_but_does_not_run():
    cfg = _config("dense")
    prompt = jax.ShapeDtypeStruct((BATCH, PROMPT_LEN), jnp.int32)
    # max_new_tokens=1: the prefill alone, a decode scan of length 0.
    g = baselines.tp_pp_generate(models.abstract(cfg), prompt, max_new_tokens=1, tp=4, pp=2)
    heads = cfg.num_heads // 4
    want_bytes = 2 * 2 * BATCH * (PROMPT_LEN + 1) * heads * cfg.head_dim * 4
    assert g.kv_cache_bytes_per_device() == want_bytes
    assert isinstance(g.lower(prompt), jax.stages.Lowered)
    with pytest.raises(ConfigError, match="abstract"):
        g(jnp.zeros(prompt.shape, jnp.int32))


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3, 2.0, True, None])
def test_max_new_tokens_must_be_a_positive_integer(value):
    model, prompt, _ = _setup("dense")
    for build in (
        functools.partial(baselines.tp_pp_generate, tp=2, pp=2),
        baselines.single_device_generate,
    ):
        with pytest.raises(InputError, match=f"max_new_tokens must be a positive integer.*{value}"):
            build(model, prompt, max_new_tokens=value)


def test_prompt_must_be_integer_batch_by_seq():
    model, prompt, _ = _setup("dense")
    for bad in (prompt.astype(jnp.float32), prompt[0], [[1, 2]]):
        with pytest.raises(InputError, match="integer tokens of shape"):
            baselines.tp_pp_generate(model, bad, max_new_tokens=4, tp=2, pp=2)
        with pytest.raises(InputError, match="integer tokens of shape"):
            baselines.single_device_generate(model, bad, max_new_tokens=4)


def test_prompt_of_another_shape_or_dtype_at_call():
    _, prompt, _ = _setup("dense")
    g = _generator("dense", 2, 2, 2)
    with pytest.raises(InputError, match=r"built for prompts int32 \(4, 8\), got int32 \(2, 8\)"):
        g(prompt[:2])
    with pytest.raises(InputError, match=r"got int16 \(4, 8\)"):
        g(prompt.astype(jnp.int16))
    with pytest.raises(InputError, match=r"got int32 \(4, 4\)"):
        g.lower(prompt[:, :4])


def test_degrees_that_do_not_divide():
    model, prompt, _ = _setup("dense")
    with pytest.raises(ConfigError, match=r"num_heads=4 is not divisible by tp=8"):
        baselines.tp_pp_generate(model, prompt, max_new_tokens=4, tp=8, pp=2)
    with pytest.raises(ConfigError, match=r"num_layers=4 is not divisible by pp=3"):
        baselines.tp_pp_generate(model, prompt, max_new_tokens=4, tp=1, pp=3)
    with pytest.raises(InputError, match=r"Batch 4 is not divisible by microbatches=3"):
        baselines.tp_pp_generate(model, prompt, max_new_tokens=4, tp=2, pp=2, microbatches=3)
    with pytest.raises(ConfigError, match="microbatches must be a positive integer"):
        baselines.tp_pp_generate(model, prompt, max_new_tokens=4, tp=2, pp=2, microbatches=0)
    moe = models.abstract(_config("moe", num_heads=8, head_dim=8))
    with pytest.raises(ConfigError, match=r"num_experts=4 is not divisible by tp=8"):
        baselines.tp_pp_generate(moe, prompt, max_new_tokens=4, tp=8, pp=1)


def test_wrong_devices():
    model, prompt, _ = _setup("dense")
    with pytest.raises(DeviceError, match=r"tp \* pp = 4 but 8 devices"):
        baselines.tp_pp_generate(
            model, prompt, max_new_tokens=4, devices=jax.devices()[:8], tp=2, pp=2
        )


def test_not_an_lwjax_model():
    _, prompt, _ = _setup("dense")
    with pytest.raises(ConfigError, match="lwjax.models transformer"):
        baselines.tp_pp_generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), prompt, max_new_tokens=4)
