"""Models and configs: parameter counts, shapes, causality, KV cache, MoE routing, validation."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import greedy_under_full_forward
from flax import nnx

from lwjax import models
from lwjax.errors import ConfigError, InputError
from lwjax.models import configs

# float32 models on CPU: different op orders (cache vs full sequence) differ by rounding only.
ATOL = 2e-5
RTOL = 2e-5


def _param_count(module) -> int:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return sum(int(np.prod(x.shape)) for x in leaves)


def _tokens(cfg, seed=0, batch=None, seq=None):
    shape = (batch or cfg.batch_size, seq or cfg.seq_len)
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size, jnp.int32)


# ---- parameter counts against closed forms -------------------------------------------------

def test_seed_dense_block_count_is_the_issue_figure():
    cfg = configs.seed_dense()
    block = _param_count(models.abstract(cfg).layers[0])
    # 4*4096^2 (q, k, v, out) + 3*4096*16384 (gate, up, down) + 2*4096 (two RMSNorm scales)
    assert block == 4 * 4096**2 + 3 * 4096 * 16384 + 2 * 4096
    assert block - 2 * 4096 == 268_435_456


@pytest.mark.parametrize("name", ["seed_dense", "seed_moe", "seed004_dense", "seed004_moe",
                                  "seed002_dense", "tiny_dense", "tiny_moe"])
def test_param_counts_match_closed_form(name):
    cfg = getattr(configs, name)()
    model = models.abstract(cfg)
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    f, v = cfg.mlp_hidden_size, cfg.vocab_size
    if cfg.is_moe:
        mlp = d * cfg.num_experts + cfg.num_experts * 3 * d * f
    else:
        mlp = 3 * d * f
    block = 4 * d * n * h + mlp + 2 * d
    expected = v * d + cfg.num_layers * block + d + d * v
    assert _param_count(model) == expected == cfg.param_count()
    # Abstract parameters are shapes, not arrays.
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_seed_dimensions():
    s, m, s4 = configs.seed_dense(), configs.seed_moe(), configs.seed004_dense()
    assert (s.num_layers, s.hidden_size, s.num_heads, s.head_dim, s.mlp_hidden_size,
            s.batch_size, s.seq_len, s.dtype) == (16, 4096, 32, 128, 16384, 128, 10_000,
                                                  jnp.float16)
    assert (m.num_experts, m.experts_per_token) == (8, 2)
    assert (s4.hidden_size, s4.num_heads, s4.head_dim, s4.mlp_hidden_size, s4.batch_size) == (
        8192, 16, 512, 32768, 1024)
    assert configs.seed002_dense().num_layers == 2


def test_abstract_seed_dense_allocates_no_weights():
    # A fresh interpreter, so the figure is this model's alone. FP16 weights would be 8.6 GB.
    # VmHWM (peak resident set) is reset by exec; ru_maxrss can carry the parent's peak.
    code = (
        "import jax\n"
        "from lwjax import models\n"
        "m = models.abstract(models.configs.seed_dense())\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak_bytes = int(out.stdout.split()[-1]) * 1024  # VmHWM is in kB
    weights_bytes = configs.seed_dense().param_count() * 2
    assert weights_bytes > 8.5e9
    assert peak_bytes < 1.5e9, f"peak RSS {peak_bytes / 1e9:.2f} GB"


# ---- forward pass ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [configs.tiny_dense, configs.tiny_moe])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16,
                                   pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_output_shape_and_dtype(make, dtype):
    cfg = dataclasses.replace(make(), dtype=dtype)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    logits = model(_tokens(cfg))
    assert logits.shape == (cfg.batch_size, cfg.seq_len, cfg.vocab_size)
    assert logits.dtype == jnp.dtype(dtype)
    assert bool(jnp.all(jnp.isfinite(logits.astype(jnp.float32))))


@pytest.mark.parametrize("make", [configs.tiny_dense, configs.tiny_moe])
def test_causal(make):
    cfg = dataclasses.replace(make(), capacity_factor=None) if make is configs.tiny_moe else make()
    model = models.build(cfg, rngs=nnx.Rngs(1))
    tokens = _tokens(cfg)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % cfg.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def test_moe_sequences_are_routed_independently():
    # Per-sequence routing: a sequence's logits do not depend on its batch neighbours.
    cfg = configs.tiny_moe()
    model = models.build(cfg, rngs=nnx.Rngs(2))
    tokens = _tokens(cfg)
    full = model(tokens)
    np.testing.assert_allclose(full[:2], model(tokens[:2]), atol=ATOL, rtol=RTOL)


def test_tied_embeddings_share_the_table():
    cfg = dataclasses.replace(configs.tiny_dense(), tie_embeddings=True)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    assert _param_count(model) == cfg.param_count()
    assert model(_tokens(cfg)).shape[-1] == cfg.vocab_size


# ---- KV cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [configs.tiny_dense, configs.tiny_moe])
def test_decode_reproduces_full_forward(make):
    cfg = make()
    if cfg.is_moe:  # prefill must not drop tokens, or it could not match token-by-token decode
        cfg = dataclasses.replace(cfg, capacity_factor=None)
    model = models.build(cfg, rngs=nnx.Rngs(3))
    tokens = _tokens(cfg)
    full = model(tokens)
    prompt = 5
    logits, cache = model.prefill(tokens[:, :prompt], max_len=cfg.seq_len)
    np.testing.assert_allclose(logits, full[:, :prompt], atol=ATOL, rtol=RTOL)
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    for pos in range(prompt, cfg.seq_len):
        logits, cache = step(model, tokens[:, pos:pos + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, pos], atol=ATOL, rtol=RTOL,
                                   err_msg=f"position {pos}")
    assert int(cache.length) == cfg.seq_len


def test_generate_is_greedy_over_full_forward():
    cfg = configs.tiny_dense()
    model = models.build(cfg, rngs=nnx.Rngs(4))
    prompt = _tokens(cfg, seq=6)
    new = models.generate(model, prompt, 4)
    # oracle: one full forward over prompt + new tokens; the model is causal (test_causal)
    np.testing.assert_array_equal(
        np.asarray(new), greedy_under_full_forward(lambda s: model(s), prompt, new))


def test_prefill_longer_than_cache_is_an_error():
    cfg = configs.tiny_dense()
    model = models.build(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="max_len"):
        model.prefill(_tokens(cfg), max_len=4)


def test_bad_tokens_are_an_error():
    cfg = configs.tiny_dense()
    model = models.build(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        model(jnp.zeros((4, 16), jnp.float32))


RANK1 = ("must be integers of shape [batch, seq]; got int32 of shape (16,) (rank 1). Add the "
         "batch axis: {name}[None] (a batch of one sequence).")


@pytest.mark.parametrize("cfg", [configs.tiny_dense(), configs.tiny_moe()], ids=["dense", "moe"])
def test_rank1_tokens_are_an_input_error_everywhere(cfg):
    model = models.build(cfg, rngs=nnx.Rngs(0))
    kind = type(model).__name__
    tokens = jnp.zeros((16,), jnp.int32)
    calls = {
        f"{kind}(tokens): tokens ": lambda: model(tokens),
        f"{kind}.prefill(tokens, max_len): tokens ": lambda: model.prefill(tokens, 32),
        f"{kind}.forward_with_cache(tokens, cache): tokens ":
            lambda: model.forward_with_cache(tokens, model.init_cache(1, 32)),
        "generate(model, prompt, max_new_tokens): prompt ":
            lambda: models.generate(model, tokens, 2),
    }
    if cfg.is_moe:
        calls[f"{kind}.with_stats(tokens): tokens "] = lambda: model.with_stats(tokens)
    for head, call in calls.items():
        name = head.split(": ")[1].strip()
        with pytest.raises(InputError) as e:
            call()
        assert str(e.value) == head + RANK1.format(name=name)


def test_decode_step_and_generate_arguments_are_checked():
    cfg = configs.tiny_dense()
    model = models.build(cfg, rngs=nnx.Rngs(0))
    cache = model.init_cache(4, 32)
    with pytest.raises(InputError) as e:
        model.decode_step(jnp.zeros((4,), jnp.int32), cache)
    assert str(e.value) == (
        "DenseTransformer.decode_step(token, cache): token must be integers of shape [batch, 1]; "
        "got int32 of shape (4,) (rank 1). Add the position axis: token[:, None] (one new token "
        "per sequence).")
    with pytest.raises(InputError, match="the cache holds 4 sequences but the tokens have batch 2"):
        model.decode_step(jnp.zeros((2, 1), jnp.int32), cache)
    with pytest.raises(InputError, match="cache must be the KVCache that init_cache or prefill"):
        model.decode_step(jnp.zeros((4, 1), jnp.int32), None)
    with pytest.raises(InputError, match=r"prompt must be .*got a list\. Pass a jax or numpy"):
        models.generate(model, [[1, 2]], 2)
    with pytest.raises(InputError, match=r"prompt\.astype\(jnp\.int32\)"):
        models.generate(model, jnp.zeros((2, 4)), 2)
    for n in (0, None, 1.5, True):
        with pytest.raises(InputError, match="max_new_tokens must be a positive integer"):
            models.generate(model, jnp.zeros((2, 4), jnp.int32), n)
    with pytest.raises(InputError, match="max_len must be an integer"):
        model.prefill(jnp.zeros((2, 4), jnp.int32), None)


# ---- MoE routing -------------------------------------------------------------------------------

@pytest.mark.parametrize("capacity", [1, 3, 8])
def test_routing_k_experts_and_capacity(capacity):
    b, t, e, k = 3, 8, 4, 2
    logits = jax.random.normal(jax.random.key(0), (b, t, e))
    r = models.route(logits, k, capacity)
    expert = np.asarray(r.expert_BTK)
    kept = np.asarray(r.kept_BTK)
    # k distinct experts per token, the top-k by logit
    assert all(len(set(row)) == k for row in expert.reshape(-1, k))
    np.testing.assert_array_equal(np.sort(expert, -1),
                                  np.sort(np.argsort(-np.asarray(logits), -1)[..., :k], -1))
    # capacity respected: at most `capacity` kept choices per (sequence, expert)
    for bi in range(b):
        counts = np.bincount(expert[bi][kept[bi]], minlength=e)
        assert counts.max(initial=0) <= capacity
    # dispatch table holds exactly the kept (token, expert) pairs
    token = np.asarray(r.token_BEC)
    for bi in range(b):
        pairs = {(ti, ex) for ex in range(e) for ti in token[bi, ex] if ti < t}
        expected = {(ti, expert[bi, ti, c]) for ti in range(t) for c in range(k) if kept[bi, ti, c]}
        assert pairs == expected
    # renormalised weights
    np.testing.assert_allclose(np.asarray(r.weight_BTK).sum(-1), 1.0, rtol=1e-6)
    # choice-major priority: a first choice is never dropped while a second choice is kept
    for bi in range(b):
        for ex in range(e):
            first = kept[bi][expert[bi][:, 0] == ex, 0]
            second = kept[bi][expert[bi][:, 1] == ex, 1]
            if second.any():
                assert first.all()


def test_moe_layer_matches_per_token_reference():
    # Oracle: for each token, sum over its kept choices of weight * expert_mlp(x).
    cfg = dataclasses.replace(configs.tiny_moe(), capacity_factor=0.5)
    model = models.build(cfg, rngs=nnx.Rngs(5))
    mlp = model.layers[0].mlp
    x = jax.random.normal(jax.random.key(1), (2, cfg.seq_len, cfg.hidden_size))
    y, stats = mlp(x)
    r = models.route(x @ mlp.router[...], cfg.experts_per_token, cfg.capacity(cfg.seq_len))
    ref = np.zeros(x.shape, np.float32)
    for bi in range(x.shape[0]):
        for ti in range(x.shape[1]):
            for c in range(cfg.experts_per_token):
                if not r.kept_BTK[bi, ti, c]:
                    continue
                ex = int(r.expert_BTK[bi, ti, c])
                h = jax.nn.silu(x[bi, ti] @ mlp.gate[ex]) * (x[bi, ti] @ mlp.up[ex])
                ref[bi, ti] += float(r.weight_BTK[bi, ti, c]) * np.asarray(h @ mlp.down[ex])
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
    dropped = int((~np.asarray(r.kept_BTK)).sum())
    assert dropped > 0  # capacity 0.5 must drop something, so the count is tested
    assert int(stats.dropped) == dropped


def test_moe_stats_and_aux_loss():
    cfg = configs.tiny_moe()
    model = models.build(cfg, rngs=nnx.Rngs(6))
    logits, stats = model.with_stats(_tokens(cfg))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(_tokens(cfg))))
    # Switch loss is >= 1 with equality at perfect balance; bounded by E.
    assert 1.0 - 1e-5 <= float(stats.load_balancing_loss) <= cfg.num_experts
    assert 0 <= int(stats.dropped) <= cfg.num_layers * cfg.batch_size * cfg.seq_len * 2


def test_capacity_formula():
    cfg = configs.seed_moe()  # cf 1.25, k 2, E 8: ceil(1.25 * 10000 * 2 / 8) = 3125
    assert cfg.capacity(10_000) == 3125
    assert cfg.capacity(1) == 1
    assert dataclasses.replace(cfg, capacity_factor=None).capacity(77) == 77


# ---- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("num_layers", 0), ("hidden_size", -1), ("num_heads", 0), ("head_dim", 3),
    ("mlp_hidden_size", 0), ("vocab_size", 0), ("batch_size", 0), ("seq_len", 0),
    ("dtype", jnp.int32), ("attention_impl", "flash"), ("num_layers", 2.5),
])
def test_invalid_dense_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field) as info:
        dataclasses.replace(configs.tiny_dense(), **{field: value})
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(("field", "value"), [
    ("num_experts", 0), ("experts_per_token", 9), ("capacity_factor", 0.0),
])
def test_invalid_moe_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(configs.seed_moe(), **{field: value})


def test_unknown_preset():
    from lwjax.errors import UnknownPresetError

    with pytest.raises(UnknownPresetError, match="seed-dense"):
        configs.by_name("seed-dens")
    assert configs.by_name("seed_moe") == configs.seed_moe()
