"""The TP x PP and single-device baselines against the unsharded model (16 simulated CPU devices).

Oracle: ``model(tokens)`` in float32; the sharded program sums the row-parallel all-reduces in
another order, so logits agree to ATOL = RTOL = 1e-5 (observed differences are ~3e-6 on logits
of magnitude ~5), not bitwise. With tied embeddings the normal(1) table is the head and logits
are ~10x larger (max ~50): there the absolute tolerance is TIED_ATOL_PER_LOGIT = 2e-6 times the
largest |logit| (~1e-4; observed 2.8e-5, and plain ``jax.jit`` vs eager already differs by
2.3e-5).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax import baselines, models
from lwjax import baselines_tp_pp as tp_pp_variants
from lwjax.errors import ConfigError, DeviceError, InputError

ATOL = RTOL = 1e-5
TIED_ATOL_PER_LOGIT = 2e-6


def _config(kind: str, **changes) -> models.DenseConfig:
    """tiny_dense / tiny_moe with 8 heads (and 8 experts) so that tp=8 divides them."""
    base = models.configs.tiny_moe() if kind == "moe" else models.configs.tiny_dense()
    fields = dict(batch_size=8, num_heads=8, head_dim=8)
    if kind == "moe":
        fields["num_experts"] = 8
    return dataclasses.replace(base, **(fields | changes))


@functools.cache
def _setup(kind: str, **changes):
    cfg = _config(kind, **changes)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(
        jax.random.key(1), (cfg.batch_size, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
    )
    return model, tokens, np.asarray(model(tokens))


@functools.cache
def _baseline(kind: str, tp: int, pp: int, microbatches: int, variant: str | None = None):
    model, tokens, _ = _setup(kind)
    return baselines.tp_pp(
        model, tokens, devices=jax.devices()[: tp * pp], tp=tp, pp=pp, microbatches=microbatches,
        variant=variant,
    )


@pytest.mark.parametrize(
    "kind, tp, pp, microbatches",
    [
        ("dense", 8, 2, 2),
        pytest.param("dense", 8, 2, 8, marks=pytest.mark.slow),
        pytest.param("dense", 4, 2, 4, marks=pytest.mark.slow),
        ("dense", 2, 4, 8),  # the default variant at pp = 4
        ("dense", 1, 1, 1),
        ("moe", 8, 2, 4),
        ("moe", 4, 2, 2),
        pytest.param("moe", 2, 4, 4, marks=pytest.mark.slow),
        ("moe", 1, 1, 1),
    ],
)
def test_tp_pp_matches_model(kind, tp, pp, microbatches):
    _, tokens, want = _setup(kind)
    got = _baseline(kind, tp, pp, microbatches)(tokens)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL)


# One representative per variant family in the default run (the default variant runs in
# the test above): the pre-#15 program, per-layer arrays with explicit collectives, the
# bubble skipped with GSPMD tp, split experts, pure GSPMD. Every variant on every layout
# runs with -m slow.
_VARIANT_CASES = [
    ("dense", "scan", 4, 2, 2),
    ("dense", "explicit", 2, 4, 4),
    ("dense", "shard_map", 2, 4, 8),
    ("moe", "shard_map_split", 8, 2, 4),
    ("dense", "gspmd", 8, 2, 4),
]
_SLOW_VARIANT_CASES = [
    (kind, variant, tp, pp, m)
    for kind in ("dense", "moe")
    for variant in tp_pp_variants.variants_for(_config(kind))
    for tp, pp, m in ((8, 2, 4), (2, 4, 8), (4, 2, 2))
    if (kind, variant, tp, pp, m) not in _VARIANT_CASES
]


@pytest.mark.parametrize(
    "kind, variant, tp, pp, microbatches",
    _VARIANT_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in _SLOW_VARIANT_CASES],
)
def test_every_variant_matches_model(kind, variant, tp, pp, microbatches):
    _, tokens, want = _setup(kind)
    b = _baseline(kind, tp, pp, microbatches, variant)
    assert b.variant == variant and f"variant {variant!r}" in repr(b)
    np.testing.assert_allclose(np.asarray(b(tokens)), want, atol=ATOL, rtol=RTOL)


def test_default_variant_is_the_registrys():
    for kind in ("dense", "moe"):
        b = _baseline(kind, 8, 2, 4 if kind == "moe" else 2)
        assert b.variant == tp_pp_variants.DEFAULT[kind]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["scan", "shard_map_split", "explicit_split", "gspmd"])
def test_variant_gradients_equal_the_default_variants(variant):
    model, tokens, _ = _setup("moe")

    def loss_fn(outputs, targets_BT):
        logits, aux_B = outputs
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets_BT[..., None], -1)
        return -picked.mean() + aux_B.mean()

    want_loss, want = _baseline("moe", 4, 2, 2).value_and_grad(loss_fn, with_aux=True)(
        tokens, tokens)
    loss, grads = _baseline("moe", 4, 2, 2, variant).value_and_grad(loss_fn, with_aux=True)(
        tokens, tokens)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)


def test_moe_drops_tokens_so_capacity_semantics_are_exercised():
    model, tokens, _ = _setup("moe")
    assert int(model.with_stats(tokens)[1].dropped) > 0


def test_tied_embeddings_eight_layers_batch_not_divisible_by_pp():
    # Batch 6 over pp=4: the head cannot split the batch over "pp" and runs replicated.
    model, tokens, want = _setup("dense", num_layers=8, tie_embeddings=True, batch_size=6)
    b = baselines.tp_pp(model, tokens, devices=jax.devices()[:8], tp=2, pp=4, microbatches=3)
    assert b.params["lm_head"] is None and "tied" in repr(b)
    atol = TIED_ATOL_PER_LOGIT * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(b(tokens)), want, atol=atol, rtol=RTOL)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_single_device_matches_model(kind):
    model, tokens, want = _setup(kind)
    ref = baselines.single_device(model, tokens, device=jax.devices()[3])
    got = ref(tokens)
    assert got.devices() == {jax.devices()[3]}
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL)


def test_repeated_calls_are_bitwise_identical():
    _, tokens, _ = _setup("moe")
    b = _baseline("moe", 8, 2, 4)
    first, second = np.asarray(b(tokens)), np.asarray(b(tokens))
    np.testing.assert_array_equal(first, second)


def test_params_are_placed_once_megatron_and_stage_major():
    model, _, _ = _setup("dense")
    cfg, b = model.cfg, _baseline("dense", 8, 2, 2)  # the default: stacked per stage
    tp, lps = 8, cfg.num_layers // 2
    q = b.params["blocks"]["attn"]["q"][...]
    heads = cfg.num_heads // tp
    mesh_devices = b.mesh.devices  # [pp, tp]
    for shard in q.addressable_shards:
        # Stage s holds only layers s*lps .. (s+1)*lps - 1, and of each only its heads.
        assert shard.data.shape == (1, lps, cfg.hidden_size, heads, cfg.head_dim)
        s, j = (int(i[0]) for i in np.nonzero(mesh_devices == shard.device))
        want = np.stack([model.layers[s * lps + i].attn.q[...] for i in range(lps)])
        np.testing.assert_array_equal(
            np.asarray(shard.data[0]), want[:, :, j * heads : (j + 1) * heads]
        )
    out = b.params["blocks"]["attn"]["out"][...].addressable_shards[0].data
    down = b.params["blocks"]["mlp"]["down"][...].addressable_shards[0].data
    assert out.shape == (1, lps, heads, cfg.head_dim, cfg.hidden_size)  # row-parallel
    assert down.shape == (1, lps, cfg.mlp_hidden_size // tp, cfg.hidden_size)
    assert b.params["embed"].addressable_shards[0].data.shape == (
        cfg.vocab_size // tp,
        cfg.hidden_size,
    )
    assert q.sharding.spec == jax.sharding.PartitionSpec("pp", None, None, "tp", None)


def test_unrolled_variants_hold_one_array_per_layer_slot():
    # Slot j's array [pp, ...] holds layer s * L/pp + j of each stage s, "tp"-sliced: a stage
    # reads a whole array per layer (a bitcast), no slice of a stack per tick.
    model, _, _ = _setup("dense")
    cfg, b = model.cfg, _baseline("dense", 8, 2, 2, "explicit")
    lps, heads = cfg.num_layers // 2, cfg.num_heads // 8
    assert isinstance(b.params["blocks"], tuple) and len(b.params["blocks"]) == lps
    for j, slot in enumerate(b.params["blocks"]):
        q = slot["attn"]["q"][...]
        assert q.sharding.spec == jax.sharding.PartitionSpec("pp", None, "tp", None)
        for shard in q.addressable_shards:
            assert shard.data.shape == (1, cfg.hidden_size, heads, cfg.head_dim)
            s, t = (int(i[0]) for i in np.nonzero(b.mesh.devices == shard.device))
            want = model.layers[s * lps + j].attn.q[...][:, t * heads : (t + 1) * heads]
            np.testing.assert_array_equal(np.asarray(shard.data[0]), want)


def test_split_experts_split_f_and_need_tp_to_divide_it():
    model, tokens, _ = _setup("moe")
    cfg, b = model.cfg, _baseline("moe", 8, 2, 4, "shard_map_split")
    gate = b.params["blocks"][0]["mlp"]["gate"][...].addressable_shards[0].data
    assert gate.shape == (1, cfg.num_experts, cfg.hidden_size, cfg.mlp_hidden_size // 8)
    assert "split over 'tp'" in repr(b)
    with pytest.raises(ConfigError, match=r"mlp_hidden_size=\d+ is not divisible by tp=16"):
        small = models.abstract(_config("moe", num_heads=16, head_dim=4, num_experts=16,
                                        mlp_hidden_size=120))
        baselines.tp_pp(small, tokens, tp=16, pp=1, variant="explicit_split")


@pytest.mark.parametrize(
    "kind, variant, message",
    [("dense", "fastest", r"no variant 'fastest'; choose one of scan, "),
     ("dense", "explicit_split", r"splits MoE experts; this model is dense. Use 'explicit'")],
)
def test_unknown_or_inapplicable_variant(kind, variant, message):
    model, tokens, _ = _setup(kind)
    with pytest.raises(ConfigError, match=message):
        baselines.tp_pp(model, tokens, tp=8, pp=2, variant=variant)


def test_moe_is_expert_parallel():
    model, _, _ = _setup("moe")
    cfg, b = model.cfg, _baseline("moe", 8, 2, 4, "scan")
    gate = b.params["blocks"]["mlp"]["gate"][...].addressable_shards[0].data
    router = b.params["blocks"]["mlp"]["router"][...].addressable_shards[0].data
    assert gate.shape == (1, 2, cfg.num_experts // 8, cfg.hidden_size, cfg.mlp_hidden_size)
    assert router.shape == (1, 2, cfg.hidden_size, cfg.num_experts)
    assert "expert-parallel" in repr(b)


def test_program_pipelines_over_pp_and_reduces_over_tp():
    _, tokens, _ = _setup("dense")
    b = _baseline("dense", 8, 2, 2)
    hlo = b.compile(tokens).as_text()
    assert "collective-permute(" in hlo and "all-reduce(" in hlo
    # The default variant skips a stage's fill/drain ticks: a conditional around its layers.
    assert tp_pp_variants.VARIANTS[b.variant].skip_bubble and " conditional(" in hlo
    assert isinstance(b.lower(tokens), jax.stages.Lowered)
    assert "pp=2 x tp=8" in repr(b) and "GPipe 2 microbatches" in repr(b)


def test_abstract_model_lowers_and_compiles_but_does_not_run():
    cfg = _config("dense")
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    b = baselines.tp_pp(models.abstract(cfg), tokens, tp=8, pp=2)
    assert b.num_microbatches == 2  # default: pp
    assert b.compile(tokens).memory_analysis() is not None
    with pytest.raises(ConfigError, match="abstract"):
        b(jnp.zeros(tokens.shape, jnp.int32))


# ---- bad input ------------------------------------------------------------------------------


def test_wrong_device_count():
    model, tokens, _ = _setup("dense")
    with pytest.raises(DeviceError, match=r"tp \* pp = 16 but 8 devices"):
        baselines.tp_pp(model, tokens, devices=jax.devices()[:8], tp=8, pp=2)


def test_duplicate_devices():
    model, tokens, _ = _setup("dense")
    devices = jax.devices()[:3] + jax.devices()[:1]
    with pytest.raises(DeviceError, match="more than once"):
        baselines.tp_pp(model, tokens, devices=devices, tp=2, pp=2)


def test_layers_not_divisible_by_pp():
    model, tokens, _ = _setup("dense")
    with pytest.raises(ConfigError, match=r"num_layers=4 is not divisible by pp=3"):
        baselines.tp_pp(model, tokens, devices=jax.devices()[:3], tp=1, pp=3)


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        ("dense", {}, r"num_heads=8 is not divisible by tp=16"),
        (
            "dense",
            {"num_heads": 16, "head_dim": 4, "mlp_hidden_size": 120},
            r"mlp_hidden_size=120 is not divisible by tp=16",
        ),
        ("moe", {"num_heads": 16, "head_dim": 4}, r"num_experts=8 is not divisible by tp=16"),
        (
            "dense",
            {"num_heads": 16, "head_dim": 4, "vocab_size": 250},
            r"vocab_size=250 is not divisible by tp=16",
        ),
    ],
)
def test_tp_must_divide_what_it_splits(kind, changes, message):
    cfg = _config(kind, **changes)
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len), jnp.int32)
    with pytest.raises(ConfigError, match=message):
        baselines.tp_pp(models.abstract(cfg), tokens, tp=16, pp=1)


def test_batch_not_divisible_by_microbatches():
    model, tokens, _ = _setup("dense")
    with pytest.raises(InputError, match=r"Batch 8 is not divisible by microbatches=3"):
        baselines.tp_pp(model, tokens, tp=8, pp=2, microbatches=3)


@pytest.mark.parametrize("name, value", [("tp", 0), ("pp", -1), ("microbatches", 1.5)])
def test_degrees_must_be_positive_integers(name, value):
    model, tokens, _ = _setup("dense")
    kwargs = dict(tp=8, pp=2) | {name: value}
    with pytest.raises(ConfigError, match=f"{name} must be a positive integer"):
        baselines.tp_pp(model, tokens, **kwargs)


def test_tokens_of_another_shape_or_dtype_at_call():
    _, tokens, _ = _setup("dense")
    b = _baseline("dense", 8, 2, 2)
    with pytest.raises(InputError, match=r"built for tokens int32 \(8, 16\), got int32 \(4, 16\)"):
        b(tokens[:4])
    with pytest.raises(InputError, match="got float32"):
        b(tokens.astype(jnp.float32))
    ref = baselines.single_device(_setup("dense")[0], tokens)
    with pytest.raises(InputError, match=r"got int32 \(8, 8\)"):
        ref.lower(tokens[:, :8])


def test_tokens_must_be_integer_batch_by_seq():
    model, tokens, _ = _setup("dense")
    with pytest.raises(InputError, match="integer tokens of shape"):
        baselines.tp_pp(model, tokens.astype(jnp.float32), tp=8, pp=2)
    with pytest.raises(InputError, match="integer tokens of shape"):
        baselines.single_device(model, tokens[0])


def test_not_an_lwjax_model():
    _, tokens, _ = _setup("dense")
    with pytest.raises(ConfigError, match="lwjax.models transformer"):
        baselines.tp_pp(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tokens, tp=8, pp=2)
