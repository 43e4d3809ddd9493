"""Layer discovery on users' own models, the layers= override, refusal of a segmentation that
would leave most of the model outside the layers, and running a given Plan (plan=).

Outputs are compared at float32 atol = rtol = 1e-5 (the pipeline runs the model's own
equations, fused differently by XLA).
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import (
    ConfigError,
    DeviceError,
    InputError,
    LayerSegmentationError,
    TraceError,
)
from lwjax.models import configs

ATOL = RTOL = 1e-5
BIG = 2**30
GREEK = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


class Block(nn.Module):
    width: int = 16

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.width)(x)  # Dense_0, Dense_1: numbered, but inside one block
        return x + nn.Dense(self.width)(jax.nn.gelu(h))


class GreekModel(nn.Module):
    """Blocks named alpha, beta, ...: no numbers to find them by."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="embed")(x)
        for name in GREEK:
            x = Block(name=name)(x)
        return nn.Dense(4, name="head")(x)


def _run(module_or_model, *args, devices=4, microbatches=2, **kw):
    return lwjax.layerwise_shard(module_or_model, *args, devices=jax.devices()[:devices],
                                 microbatches=microbatches, objective="bottleneck",
                                 cache_bytes=BIG, allow=(), **kw)


def test_unnumbered_linen_blocks_are_the_layers():
    m, x = GreekModel(), jnp.ones((4, 8))
    variables = m.init(jax.random.key(0), x)
    report = lwjax.analyze(m, variables, x)
    assert [r.name for r in report.layers] == [f"GreekModel/{g}" for g in GREEK]
    assert "repeated" in report.layers_found
    sm = _run(m, variables, x)
    assert sum((s.layers for s in sm.plan.stages), ()) == tuple(f"GreekModel/{g}" for g in GREEK)
    np.testing.assert_allclose(sm(x), m.apply(variables, x), atol=ATOL, rtol=RTOL)
    with pytest.raises(InputError, match=r"sm\(\*args, \*\*kwargs\), not sm\(variables"):
        sm(variables, x)


class GPT2(nn.Module):
    """A class name ending in a digit: its scope 'GPT2' wraps everything."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="embed")(x)
        for i in range(3):
            x = Block(name=f"h_{i}")(x)
        return nn.Dense(4, name="head")(x)


def test_a_numbered_model_name_is_not_a_layer():
    m, x = GPT2(), jnp.ones((2, 8))
    variables = m.init(jax.random.key(0), x)
    assert [r.name for r in lwjax.analyze(m, variables, x).layers] == [
        f"GPT2/h_{i}" for i in range(3)]


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.relu(self.up(x)))


class AttributeBlocks(nnx.Module):
    """Blocks as attributes block0 .. block5 (no list, no scopes)."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 16, rngs=rngs)
        for i in range(6):
            setattr(self, f"block{i}", NNXBlock(rngs))
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for i in range(6):
            x = getattr(self, f"block{i}")(x)
        return self.head(x)


class NamedBlocks(nnx.Module):
    """Unnumbered NNX attribute blocks that compute the same thing."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 16, rngs=rngs)
        self.first, self.second, self.third = (NNXBlock(rngs) for _ in range(3))

    def __call__(self, x):
        return self.third(self.second(self.first(self.embed(x))))


@pytest.mark.parametrize("make,names", [
    (AttributeBlocks, [f"block{i}" for i in range(6)]),
    (NamedBlocks, ["first", "second", "third"]),
])
def test_nnx_attribute_blocks_are_the_layers(make, names):
    model, x = make(nnx.Rngs(0)), jnp.ones((4, 8))
    assert [r.name for r in lwjax.analyze(model, x).layers] == names
    sm = _run(model, x)
    np.testing.assert_allclose(sm(x), model(x), atol=ATOL, rtol=RTOL)


class Mlp(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(jax.nn.gelu(nn.Dense(self.width)(x)))


class Uneven(nn.Module):
    """Three blocks of different widths (no repeated structure among them), each with
    numbered Dense_0 / Dense_1 inside: the best numbered family is one block's two Denses."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64, name="embed")(x)
        for name, width in (("first", 96), ("second", 128), ("third", 112)):
            x = Mlp(width=width, name=name)(x)
        return x


def test_a_family_that_leaves_most_weights_outside_is_refused():
    m, x = Uneven(), jnp.ones((2, 96))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(LayerSegmentationError, match=r"(?s)layers=.*outside|outside.*layers="):
        lwjax.analyze(m, variables, x)
    with pytest.raises(LayerSegmentationError):
        _run(m, variables, x)
    # named by the user, the blocks are taken as they are
    report = lwjax.analyze(m, variables, x, layers="Uneven/*")
    assert [r.name for r in report.layers] == [f"Uneven/{n}" for n in
                                              ("embed", "first", "second", "third")]


class TinyLayers(nnx.Module):
    """Two small numbered layers next to a big embedding and head: the layers hold under a
    tenth of the weights and of the FLOPs."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(4096, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 4096, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_layers_holding_a_small_share_must_be_confirmed():
    model, ids = TinyLayers(nnx.Rngs(0)), jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(LayerSegmentationError, match="confirm with layers='layers_"):
        lwjax.analyze(model, ids)
    report = lwjax.analyze(model, ids, layers="layers_*")
    assert [r.name for r in report.layers] == ["layers_0", "layers_1"]
    assert report.outside_weights_share > 0.99
    assert "99" in report.summary() or "100" in report.summary()


def test_override_errors_are_lwjax_errors():
    model, x = AttributeBlocks(nnx.Rngs(0)), jnp.ones((2, 8))
    with pytest.raises(LayerSegmentationError, match="matches no equation"):
        lwjax.analyze(model, x, layers="nothing/*")
    with pytest.raises(LayerSegmentationError, match="scope pattern"):
        lwjax.analyze(model, x, layers=3)


# ---- running a given plan -------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense():
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=6)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (4, cfg.seq_len), 0, cfg.vocab_size)
    return cfg, model, tokens, model(tokens)


def test_json_loaded_and_replanned_plans_run_and_equal_the_model(dense):
    cfg, model, tokens, want = dense
    planned = lwjax.plan(model, tokens, devices=jax.devices()[:4], microbatches=2,
                         cache_bytes=BIG, objective="bottleneck", allow=())
    loaded = lwjax.Plan.from_json(planned.to_json())
    assert loaded == planned and len(loaded.numbers.signatures) == cfg.num_layers
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices(), plan=loaded)
    assert sm.plan is loaded
    np.testing.assert_allclose(sm(tokens), want, atol=ATOL, rtol=RTOL)

    moved = planned.replan(exclude_devices=[1, 3], spare_devices=[9])
    sm2 = lwjax.layerwise_shard(model, tokens, devices=jax.devices(), plan=moved)
    used = {d for s in sm2.plan.stages for d in s.devices}
    assert not used & {1, 3}
    np.testing.assert_allclose(sm2(tokens), want, atol=ATOL, rtol=RTOL)


def test_a_plan_for_another_model_or_call_is_refused(dense):
    cfg, model, tokens, _ = dense
    planned = lwjax.plan(model, tokens, devices=jax.devices()[:4], microbatches=2,
                         cache_bytes=BIG, objective="bottleneck", allow=())
    other = models.build(dataclasses.replace(cfg, num_layers=4), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="6 layers.*4"):
        lwjax.layerwise_shard(other, tokens, plan=planned)
    wider = dataclasses.replace(cfg, seq_len=cfg.seq_len * 2)
    longer = jnp.zeros((4, wider.seq_len), jnp.int32)
    with pytest.raises(ConfigError, match="other shapes or dtypes"):
        lwjax.layerwise_shard(models.build(wider, rngs=nnx.Rngs(0)), longer, plan=planned)
    with pytest.raises(ConfigError, match="microbatches=4 but the given plan runs 2"):
        lwjax.layerwise_shard(model, tokens, microbatches=4, plan=planned)
    with pytest.raises(InputError, match="batch 4.*batch is 8"):
        lwjax.layerwise_shard(model, jnp.concatenate([tokens, tokens]), plan=planned)
    with pytest.raises(DeviceError, match="not in devices="):
        lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], plan=planned)
    with pytest.raises(ConfigError, match="lwjax.Plan"):
        lwjax.layerwise_shard(model, tokens, plan=planned.to_json())
    compressed = dataclasses.replace(planned, compression="int8")  # runs as it says
    run = lwjax.layerwise_shard(model, tokens, plan=compressed)
    assert "int8" in {str(p.dtype) for p in run.params}
    broken = dataclasses.replace(planned, stages=planned.stages[:-1])
    with pytest.raises(ConfigError, match="cover every layer"):
        lwjax.layerwise_shard(model, tokens, plan=broken)
    # the ends count too: another vocabulary, or tokens of another dtype
    bigger_vocab = models.build(dataclasses.replace(cfg, vocab_size=cfg.vocab_size * 2),
                                rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="prologue.*epilogue"):
        lwjax.layerwise_shard(bigger_vocab, tokens, plan=planned)
    # a plan without signatures (older, or edited) cannot be checked: refused
    unsigned = json.loads(planned.to_json())
    del unsigned["numbers"]["signatures"]
    with pytest.raises(ConfigError, match="no structural signatures"):
        lwjax.layerwise_shard(model, tokens, plan=lwjax.Plan.from_json(json.dumps(unsigned)))


# ---- errors from tracing, in the user's terms -----------------------------------------------

def test_trace_errors_name_what_was_passed(dense):
    cfg, model, tokens, _ = dense
    with pytest.raises(InputError, match=r"shape \(0, 16\): an empty batch"):
        lwjax.layerwise_shard(model, jnp.zeros((0, cfg.seq_len), jnp.int32))
    with pytest.raises(InputError, match="empty batch"):
        lwjax.analyze(model, jnp.zeros((0, cfg.seq_len), jnp.int32))
    with pytest.raises(InputError, match="cache_len must be a positive whole number"):
        lwjax.analyze(model, jnp.zeros((2, 1), jnp.int32), mode="decode", cache_len=float("nan"))
    floats = jnp.zeros((8, cfg.seq_len), jnp.float32)
    with pytest.raises(InputError, match=rf"float32.*\(8, {cfg.seq_len}\)"):
        lwjax.layerwise_shard(model, floats, microbatches=4)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], microbatches=2,
                               cache_bytes=BIG)
    with pytest.raises(InputError, match="^positional argument 0 is float32"):
        sm(tokens.astype(jnp.float32))


def test_linen_variables_that_do_not_fit_are_input_errors():
    m, x = GreekModel(), jnp.ones((4, 8))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(InputError, match="variables do not match"):
        lwjax.analyze(m, {"params": {}}, x)
    with pytest.raises(InputError, match="variables do not match.*shape"):
        lwjax.analyze(m, jax.tree.map(lambda a: a[..., :2], variables), x)
    with pytest.raises(InputError, match="variables missing"):
        lwjax.analyze(m, x)


# ---- structures the discovery must not get wrong silently -----------------------------------

class Alternating(nnx.Module):
    """Two numbered kinds that run in turn: attns_i then mlps_i make layer i."""

    def __init__(self, rngs):
        self.attns = nnx.List([NNXBlock(rngs) for _ in range(4)])
        self.mlps = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(4)])

    def __call__(self, x):
        for a, m in zip(self.attns, self.mlps, strict=True):
            x = m(a(x))
        return x


def test_alternating_kinds_pair_up_into_layers():
    model, x = Alternating(nnx.Rngs(0)), jnp.ones((4, 8, 16))
    report = lwjax.analyze(model, x)
    assert [r.name for r in report.layers] == [f"attns_{i}+mlps_{i}" for i in range(4)]
    assert len({r.footprint.weights_bytes for r in report.layers}) == 1
    assert report.outside_weights_share == 0
    sm = _run(model, x)
    np.testing.assert_allclose(sm(x), model(x), atol=ATOL, rtol=RTOL)


class Reuse(nn.Module):
    def setup(self):
        self.layers = [Block() for _ in range(2)]

    def __call__(self, x):
        return self.layers[0](self.layers[1](self.layers[0](x)))


def test_a_block_called_twice_is_refused_not_split_inside():
    m, x = Reuse(), jnp.ones((2, 16))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(LayerSegmentationError, match="called twice"):
        lwjax.analyze(m, variables, x)


class RematNNX(nnx.Module):
    """Blocks called through nnx.remat of a lambda: the transform calls a copy of each block,
    so lwjax's scopes do not reach them."""

    def __init__(self, rngs):
        self.embed = nnx.Linear(16, 16, rngs=rngs)
        self.layers = nnx.List([NNXBlock(rngs) for _ in range(3)])
        self.head = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.layers:
            x = nnx.remat(lambda m, y: m(y))(block, x)
        return self.head(x)


def test_blocks_hidden_by_a_transform_are_refused():
    model, x = RematNNX(nnx.Rngs(0)), jnp.ones((2, 16))
    with pytest.raises(LayerSegmentationError, match="nnx.remat"):
        lwjax.analyze(model, x)


class RematLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = nn.remat(Block)(name=f"h_{i}")(x)
        return x


def test_linen_remat_blocks_are_found_inside_the_checkpoint():
    m, x = RematLinen(), jnp.ones((4, 16))
    variables = m.init(jax.random.key(0), x)
    assert [r.name for r in lwjax.analyze(m, variables, x).layers] == [
        f"RematLinen/h_{i}" for i in range(3)]
    sm = _run(m, variables, x)
    np.testing.assert_allclose(sm(x), m.apply(variables, x), atol=ATOL, rtol=RTOL)


class Stack(nn.Module):
    n: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.n):
            x = Block(name=f"layers_{i}")(x)
        return x


class EncDec(nn.Module):
    @nn.compact
    def __call__(self, x):
        memory = Stack(2, name="encoder")(x)
        return Stack(3, name="decoder")(x + memory)


def test_a_large_stack_outside_the_layers_is_refused_with_a_pattern_for_both():
    m, x = EncDec(), jnp.ones((2, 16))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(LayerSegmentationError, match=r"layers='EncDec/\*/layers_\*'"):
        lwjax.analyze(m, variables, x)
    both = lwjax.analyze(m, variables, x, layers="EncDec/*/layers_*")
    assert len(both.layers) == 5


class TrainModeBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.BatchNorm(use_running_average=False, name=f"h_{i}")(x)
        return x


def test_a_call_that_updates_variables_or_draws_rngs_says_so():
    m, x = TrainModeBatchNorm(), jnp.ones((4, 8))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(TraceError, match="updates its variables.*inference mode"):
        lwjax.analyze(m, variables, x)

    class Dropping(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = nn.Dropout(0.5, deterministic=False, name=f"h_{i}")(nn.Dense(8)(x))
            return x

    d = Dropping()
    params = d.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    with pytest.raises(TraceError, match="draws random numbers.*dropout"):
        lwjax.analyze(d, params, x)


def test_a_layers_callable_that_misbehaves_is_reported():
    m, x = GreekModel(), jnp.ones((4, 8))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(LayerSegmentationError, match="returned 3.*str"):
        lwjax.analyze(m, variables, x, layers=lambda stack: 3)
    with pytest.raises(LayerSegmentationError, match="callable raised TypeError"):
        lwjax.analyze(m, variables, x, layers=lambda stack, other: stack)


class TrainModeNNX(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([NNXBlock(rngs) for _ in range(2)])
        self.norm = nnx.BatchNorm(16, rngs=rngs)

    def __call__(self, x):
        for block in self.layers:
            x = self.norm(block(x))
        return x


def test_nnx_batch_statistics_in_training_mode_are_refused():
    model, x = TrainModeNNX(nnx.Rngs(0)), jnp.ones((4, 16))
    with pytest.raises(TraceError, match=r"writes its variables.*model\.eval\(\)"):
        lwjax.layerwise_shard(model, x, devices=jax.devices()[:2])
    model.eval()  # running averages: no statistics change, the pipeline equals the model
    sm = _run(model, x, devices=2)
    np.testing.assert_allclose(sm(x), model(x), atol=ATOL, rtol=RTOL)


class Unpaired(nnx.Module):
    """Two numbered kinds that interleave but do not pair one to one: a0 m0 a1 m1 a2 m2 a3."""

    def __init__(self, rngs):
        self.attns = nnx.List([NNXBlock(rngs) for _ in range(4)])
        self.mlps = nnx.List([NNXBlock(rngs) for _ in range(3)])

    def __call__(self, x):
        for a, m in zip(self.attns, self.mlps, strict=False):
            x = m(a(x))
        return self.attns[3](x)


def test_interleaved_kinds_that_do_not_pair_up_say_so():
    model, x = Unpaired(nnx.Rngs(0)), jnp.ones((2, 16))
    with pytest.raises(LayerSegmentationError, match="do not pair up one to one"):
        lwjax.analyze(model, x)


class EncDec31(nn.Module):
    @nn.compact
    def __call__(self, x):
        memory = Stack(3, name="encoder")(x)
        return Stack(1, name="decoder")(x + memory)


def test_a_one_layer_stack_beside_the_layers_is_refused():
    m, x = EncDec31(), jnp.ones((2, 16))
    variables = m.init(jax.random.key(0), x)
    with pytest.raises(LayerSegmentationError, match=r"layers='EncDec31/\*/layers_\*'"):
        lwjax.analyze(m, variables, x)
    assert len(lwjax.analyze(m, variables, x, layers="EncDec31/*/layers_*").layers) == 4


def test_an_edited_plan_with_impossible_counts_is_refused(dense):
    cfg, model, tokens, _ = dense
    planned = lwjax.plan(model, tokens, devices=jax.devices()[:4], microbatches=2,
                         cache_bytes=BIG, objective="bottleneck", allow=())
    with pytest.raises(ConfigError, match="microbatches=0 is not a positive integer"):
        lwjax.layerwise_shard(model, tokens, plan=dataclasses.replace(planned, microbatches=0))


class TwoToOne(nnx.Module):
    """Two attns per mlp (attn, attn, mlp, ...): the kinds interleave without pairing."""

    def __init__(self, rngs):
        self.attns = nnx.List([NNXBlock(rngs) for _ in range(6)])
        self.mlps = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for j, m in enumerate(self.mlps):
            x = m(self.attns[2 * j + 1](self.attns[2 * j](x)))
        return x


def test_two_kinds_in_a_two_to_one_ratio_are_refused_not_lopsided():
    model, x = TwoToOne(nnx.Rngs(0)), jnp.ones((2, 16))
    with pytest.raises(LayerSegmentationError, match="do not pair up"):
        lwjax.analyze(model, x)
    # the callable the message asks for: one layer per mlp and its two attns
    def block(stack):
        head = stack.split("/")[0]
        kind, _, i = head.rpartition("_")
        if kind == "attns":
            return f"block_{int(i) // 2}"
        return f"block_{i}" if kind == "mlps" else None
    report = lwjax.analyze(model, x, layers=block)
    assert [r.name for r in report.layers] == ["block_0", "block_1", "block_2"]
    sm = _run(model, x, layers=block)
    np.testing.assert_allclose(sm(x), model(x), atol=ATOL, rtol=RTOL)
