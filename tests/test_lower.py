"""layerwise_shard: the pipeline program equals the model, stores each stage's weights on
its own device, and rejects bad input with lwjax errors.

Tolerance: float32 on CPU. The pipeline runs the model's own equations, but XLA fuses a
stage's program differently from the whole model's, so results agree to rounding:
atol = rtol = 1e-5 (observed differences are ~2e-6 on logits of magnitude ~1).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import (
    CapacityError,
    DeviceError,
    InfeasiblePlanError,
    InputError,
    LayerSegmentationError,
)
from lwjax.models import configs

ATOL = RTOL = 1e-5
BIG = 2**30  # a capacity every tiny model fits, to exercise the pipeline itself


def _tokens(cfg, batch=8, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, cfg.seq_len), 0, cfg.vocab_size)


@pytest.fixture(scope="module")
def dense():
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=16)
    return cfg, models.build(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def moe():
    cfg = configs.tiny_moe()
    return cfg, models.build(cfg, rngs=nnx.Rngs(1))


@pytest.mark.parametrize(("num_devices", "microbatches", "largest_stage"), [
    (16, 8, 1),
    pytest.param(8, 4, 2, marks=pytest.mark.slow),
    (5, 2, 4),  # 16 layers on 5 stages: uneven, at best 4 layers in the slowest stage
    pytest.param(2, 8, 8, marks=pytest.mark.slow),
    (1, 1, 16),
])
def test_dense_matches_model(dense, num_devices, microbatches, largest_stage):
    cfg, model = dense
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:num_devices],
                               cache_bytes=BIG, microbatches=microbatches,
                               objective="bottleneck")
    sizes = [b - a for a, b in (s.layer_range for s in sm.plan.stages)]
    assert len(sizes) == num_devices and max(sizes) == largest_stage and sum(sizes) == 16
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("num_devices", "microbatches"),
                         [(4, 4), pytest.param(3, 2, marks=pytest.mark.slow), (2, 1)])
def test_moe_matches_model(moe, num_devices, microbatches):
    cfg, model = moe
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:num_devices],
                               cache_bytes=BIG, microbatches=microbatches,
                               objective="bottleneck")
    assert len(sm.plan.stages) == min(num_devices, cfg.num_layers)
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)


def test_repeated_calls_are_bitwise_identical(moe):
    cfg, model = moe
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=BIG)
    a, b = np.asarray(sm(tokens)), np.asarray(sm(tokens))
    np.testing.assert_array_equal(a, b)


def test_each_device_stores_only_its_stage(dense):
    cfg, model = dense
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=BIG,
                               microbatches=4, objective="bottleneck")
    embed, head = cfg.vocab_size * cfg.hidden_size, cfg.hidden_size * (cfg.vocab_size + 1)
    layer_elems = cfg.block_param_count()
    # one [4, n] array per weight slot; 4 layers per stage, the first adds the embedding, the
    # last the final norm + head (the embedding and head, of equal size, share a slot, and
    # the final norm takes one the other stages leave zero)
    for array in sm.params:
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.device for s in shards] == list(jax.devices()[:4])
        assert [s.data.shape for s in shards] == [(1, array.shape[1])] * 4
    assert sum(a.shape[1] for a in sm.params) == 4 * layer_elems + max(embed, head)
    # a stage reads each weight as a reshape of its local [1, n] row (a bitcast), no slice
    storage = sm.program.storage
    local = [jax.ShapeDtypeStruct((1, a.shape[1]), a.dtype) for a in sm.params]
    for s in range(4):
        jaxpr = jax.make_jaxpr(lambda rows, s=s: storage.unpack(rows, s))(local)
        assert {e.primitive.name for e in jaxpr.eqns} == {"reshape"}
    # the stored bytes per device are its stage's weights (padding to the largest stage aside)
    assert sm.plan.stages[1].footprint.weights_bytes == 4 * layer_elems * 4
    # outputs are spread over the stages, a quarter each (tests/test_outputs_memory.py)
    logits = sm(tokens)
    assert logits.devices() == set(jax.devices()[:4])
    assert {s.data.size for s in logits.addressable_shards} == {logits.size // 4}
    assert sm.plan.stages[3].footprint.weights_bytes == (4 * layer_elems + head) * 4


def test_stored_weight_bytes_are_measured_with_their_padding(dense):
    cfg, model = dense
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:5], cache_bytes=BIG,
                               microbatches=2, objective="bottleneck")
    assert [b - a for a, b in (s.layer_range for s in sm.plan.stages)] == [3, 4, 4, 4, 1]
    stored = sm.weight_bytes()
    # own: what the plan counts per stage; allocated: every device's shards of every slot
    assert [stored[s.devices[0]]["own"] for s in sm.plan.stages] == \
        [s.footprint.weights_bytes for s in sm.plan.stages]
    slots = sum(a.shape[1] * a.dtype.itemsize for a in sm.params)
    assert {b["allocated"] for b in stored.values()} == {slots}
    layer = cfg.block_param_count() * 4
    embed = cfg.vocab_size * cfg.hidden_size * 4
    # 4 blocks' slots (the largest stages) and the embedding's, which the head shares; the
    # final norm fills a block norm's slot that the 1-block stage leaves free
    assert slots == 4 * layer + embed
    assert stored[4]["own"] == layer + embed + cfg.hidden_size * 4  # block, head, final norm
    # the plan predicted the padding, measured here from the placed shards, and says it
    assert sm.plan.padding_bytes == tuple(
        stored[s.devices[0]]["allocated"] - stored[s.devices[0]]["own"] for s in sm.plan.stages)
    assert sm.plan.padding_bytes[4] == slots - stored[4]["own"] > 0
    assert f"stage 4 +{(slots - stored[4]['own']) / 2**20:.2f} MiB" in repr(sm)
    even = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:4], cache_bytes=BIG,
                                 microbatches=2, objective="bottleneck")
    assert all(b["allocated"] - b["own"] <= cfg.hidden_size * 4 + embed
               for b in even.weight_bytes().values())


def test_outputs_are_not_carried_through_the_ticks():
    """The epilogue (LM head) runs once per microbatch after the loop, on the last stage:
    no device keeps a [mb, T, vocab] output slot per tick (M + S - 1 of them)."""
    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=8, vocab_size=4096)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg)
    m, s = 4, 8
    # planned with H100 costs: the host CPU's speeds are measured at run time, and its
    # bottleneck plan had 4, 5 or 8 stages; at H100 costs the embedding, folded into the
    # first layer, sets the bottleneck and the fewest stages that meet it are 4
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:s], cache_bytes=BIG,
                               microbatches=m, objective="bottleneck", hardware="h100")
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)
    s = len(sm.plan.stages)
    assert s == 4
    logits_per_microbatch = (8 // m) * cfg.seq_len * cfg.vocab_size * 4
    memory = sm.compile(tokens).memory_analysis()
    # per device: its 1/S of the outputs, temporaries well under one slot per tick
    assert memory.output_size_in_bytes == m * logits_per_microbatch // s
    assert memory.temp_size_in_bytes < (m + s - 1) * logits_per_microbatch / 2


def test_lower_and_compile_expose_jax_stages(moe):
    cfg, model = moe
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], cache_bytes=BIG,
                               objective="bottleneck")
    lowered = sm.lower(tokens)
    assert isinstance(lowered, jax.stages.Lowered)
    text = lowered.as_text()
    assert "collective_permute" in text or "collective-permute" in text
    assert isinstance(sm.compile(tokens), jax.stages.Compiled)
    assert "2 stages" in repr(sm)



def test_a_tick_sends_one_ppermute_whatever_the_carry_dtypes(dense):
    """The dense model's first cut carries int32 positions and the float32 residual: both
    cross in one uint8 buffer, so the compiled program has one collective-permute (the tick's),
    and the pipeline still equals the model."""
    import re

    from lwjax.passes.lower import cut_values, lower
    from lwjax.passes.segment import segment
    from lwjax.passes.trace import trace

    cfg, model = dense
    tokens = _tokens(cfg)
    graph = segment(trace(model, tokens, microbatch_size=4))
    ranges = [(0, 1), (1, cfg.num_layers)]
    assert {np.dtype(v.aval.dtype).name for v in cut_values(graph, ranges)[0]} == {
        "int32", "float32"}
    prog = lower(graph, ranges, jax.devices()[:2], num_microbatches=2)
    params = prog.place_params(graph.traced.params)
    hlo = prog.fn.lower(params, tokens).compile().as_text()
    assert len(re.findall(r"collective-permute(-start)?\(", hlo)) == 1
    np.testing.assert_allclose(prog(params, tokens), model(tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("dtypes", [("float32", "int32"), ("bfloat16", "bool", "int8"),
                                    ("float32",), ("complex64", "float32"), ()])
def test_wire_round_trips_every_dtype_bit_for_bit(dtypes):
    from lwjax.passes.carry import from_wire, to_wire

    rng = np.random.default_rng(0)
    values = {"bool": rng.normal(size=5) > 0,
              "complex64": rng.normal(size=5) + 1j * rng.normal(size=5)}
    bufs = {dt: jnp.asarray(values.get(dt, rng.normal(size=5) * 100)).astype(dt)
            for dt in dtypes}
    wire = to_wire(bufs)
    assert wire.dtype == jnp.uint8
    assert wire.shape == (sum(5 * np.dtype(dt).itemsize for dt in dtypes),)
    back = from_wire(wire, bufs)
    for dt in dtypes:
        assert back[dt].dtype == bufs[dt].dtype
        np.testing.assert_array_equal(np.asarray(back[dt]), np.asarray(bufs[dt]))

# ---- other model styles -----------------------------------------------------------------------

class Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, mask, *, deterministic):
        h = nn.LayerNorm(name="ln")(x)
        h = nn.Dense(self.d, name="c_attn")(h) * mask[..., None]
        x = x + (h if deterministic else 0.5 * h)
        return x + nn.Dense(self.d, name="c_proj")(nn.gelu(nn.Dense(2 * self.d, name="c_fc")(x)))


class GPT(nn.Module):
    """Linen, GPT style: h_0..h_N, a mask argument, a static flag, tied embeddings."""

    vocab: int = 64
    d: int = 32
    n: int = 6

    @nn.compact
    def __call__(self, tokens, mask, *, deterministic=True):
        wte = nn.Embed(self.vocab, self.d, name="wte")
        x = wte(tokens)
        for i in range(self.n):
            x = Block(self.d, name=f"h_{i}")(x, mask, deterministic=deterministic)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


def test_linen_model_with_extra_args_and_tied_embeddings():
    m = GPT()
    tokens = jax.random.randint(jax.random.key(0), (8, 5), 0, 64)
    mask = jax.random.uniform(jax.random.key(1), (8, 5))
    variables = m.init(jax.random.key(2), tokens, mask)
    sm = lwjax.layerwise_shard(m, variables, tokens, mask, deterministic=False,
                               devices=jax.devices()[:3], cache_bytes=BIG, microbatches=4,
                               objective="bottleneck")
    want = m.apply(variables, tokens, mask, deterministic=False)
    np.testing.assert_allclose(sm(tokens, mask, deterministic=False), want, atol=ATOL,
                               rtol=RTOL)
    # the tied table is stored on the first stage (embedding) and the last (logits)
    assert len(sm.plan.stages) == 3
    with pytest.raises(InputError, match="deterministic"):
        sm(tokens, mask, deterministic=True)


class Unscoped(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(5)])
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + jax.nn.relu(b(x))
        return self.out(x)


def test_nnx_model_without_scopes():
    model = Unscoped(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (6, 4))
    sm = lwjax.layerwise_shard(model, x, devices=jax.devices()[:5], cache_bytes=BIG,
                               microbatches=3)
    # stages cover blocks_0..blocks_4 in order (how many stages: the exact partition decides)
    assert sum((s.layers for s in sm.plan.stages), ()) == tuple(f"blocks_{i}" for i in range(5))
    np.testing.assert_allclose(sm(x), model(x), atol=ATOL, rtol=RTOL)



class MaskedSeq(nnx.Module):
    """Unscoped NNX blocks over a sequence, a [T, T] mask argument, dropout with its rngs."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(32, 16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(4)])
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, tokens, mask, deterministic=True):
        x = self.emb(tokens)
        for b in self.blocks:
            x = x + jnp.einsum("st,btd->bsd", mask, jax.nn.relu(b(x)))
        return self.emb.attend(self.drop(x, deterministic=deterministic))


class PerExampleMask(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(32, 16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])

    def __call__(self, tokens, rows):
        x = self.emb(tokens)
        for b in self.blocks:
            x = x + jax.nn.relu(b(x)) * rows[..., None]
        return x

def test_unbatched_argument_is_passed_whole():
    model = MaskedSeq(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (8, 8), 0, 32)  # batch == seq == 8
    causal = jnp.tril(jnp.ones((8, 8))) / 8
    want = model(tokens, mask=causal)
    for m in (2, 8):
        sm = lwjax.layerwise_shard(model, tokens, mask=causal, unbatched=("mask",),
                                   devices=jax.devices()[:2], cache_bytes=BIG, microbatches=m)
        np.testing.assert_allclose(sm(tokens, mask=causal), want, atol=ATOL, rtol=RTOL)
    # taken for per-example rows, the [8, 8] mask cannot trace at microbatch 4: lwjax says so
    with pytest.raises(InputError, match=r"split keyword argument 'mask' into.*unbatched="):
        lwjax.layerwise_shard(model, tokens, mask=causal, devices=jax.devices()[:2],
                              cache_bytes=BIG, microbatches=2)
    # at microbatch 1 its rows would broadcast silently; the model also takes it whole, so
    # lwjax asks rather than guess
    with pytest.raises(InputError,
                       match=r"keyword argument 'mask': leading size.*whole.*unbatched="):
        lwjax.layerwise_shard(model, tokens, mask=causal, devices=jax.devices()[:2],
                              cache_bytes=BIG, microbatches=8)
    # a per-example [B, T] mask is not ambiguous: whole, it would change the output's batch
    rows = jnp.ones((8, 8))
    sm = lwjax.layerwise_shard(PerExampleMask(nnx.Rngs(0)), tokens, rows,
                               devices=jax.devices()[:2], cache_bytes=BIG, microbatches=8)
    assert sm.program.graph.traced.batch_shaped == (True, True)
    lwjax.analyze(model, tokens, mask=causal, batched=("mask",), microbatch_size=1)  # told
    with pytest.raises(InputError, match="both batched= and unbatched="):
        lwjax.analyze(model, tokens, mask=causal, batched=("mask",), unbatched=("mask",))
    with pytest.raises(InputError, match="not an array keyword argument"):
        lwjax.layerwise_shard(model, tokens, mask=causal, unbatched=("maks",),
                              devices=jax.devices()[:2], cache_bytes=BIG)


def test_rng_state_is_no_weight_and_active_dropout_is_refused():
    model = MaskedSeq(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
    mask = jnp.ones((8, 8)) / 8
    sm = lwjax.layerwise_shard(model, tokens, mask, unbatched=(1,), devices=jax.devices()[:2],
                               cache_bytes=BIG, microbatches=2)
    np.testing.assert_allclose(sm(tokens, mask), model(tokens, mask), atol=ATOL, rtol=RTOL)
    report = lwjax.analyze(model, tokens, mask, unbatched=(1,))
    assert report.layers[0].footprint.weights_bytes == (16 * 16 + 16) * 4
    with pytest.raises(lwjax.errors.TraceError, match="draws random numbers"):
        lwjax.analyze(model, tokens, mask, unbatched=(1,), deterministic=False)


def test_sharded_model_under_jit_and_options(dense):
    cfg, model = dense
    tokens = _tokens(cfg)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], cache_bytes=BIG,
                               microbatches=2, allow="split")
    np.testing.assert_allclose(jax.jit(sm)(tokens), model(tokens), atol=ATOL, rtol=RTOL)
    with pytest.raises(lwjax.errors.ConfigError, match="schedule='1f1b' is not one of"):
        lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], schedule="1f1b")


# ---- bad input -------------------------------------------------------------------------------

def test_bad_inputs(moe):
    cfg, model = moe
    tokens = _tokens(cfg)
    devs = jax.devices()
    sm = lwjax.layerwise_shard(model, tokens, devices=devs[:2], cache_bytes=BIG)
    with pytest.raises(InputError, match=r"int32 \(8, 16\)"):
        sm(tokens[:, :8])
    with pytest.raises(InputError, match="float32"):
        sm(tokens.astype(jnp.float32))
    with pytest.raises(InputError, match="does not divide into 3 microbatches"):
        lwjax.layerwise_shard(model, tokens, devices=devs[:2], cache_bytes=BIG, microbatches=3)
    with pytest.raises(DeviceError, match="empty"):
        lwjax.layerwise_shard(model, tokens, devices=[], cache_bytes=BIG)
    with pytest.raises(DeviceError, match="Duplicate devices"):
        lwjax.layerwise_shard(model, tokens, devices=[devs[0], devs[0]], cache_bytes=BIG)
    for bad in (0, -5, float("nan")):
        with pytest.raises(CapacityError, match="cache_bytes"):
            lwjax.layerwise_shard(model, tokens, devices=devs[:2], cache_bytes=bad)
    # a layer is 0.5 MiB of weights + 0.54 MiB of activation peak: 2 MiB holds two layers,
    # so four layers need two devices
    with pytest.raises(InfeasiblePlanError, match="at least 2 stages.*Use at least 2 devices"):
        lwjax.layerwise_shard(model, tokens, devices=devs[:1], cache_bytes=2 * 2**20,
                              allow=())
    with pytest.raises(InfeasiblePlanError, match=r"Layer 'layers_\d'.*No number of stages"):
        lwjax.layerwise_shard(model, tokens, devices=devs[:4], cache_bytes=3 * 2**20 // 4,
                              microbatches=1, allow=())
    with pytest.raises(lwjax.errors.UnknownPresetError, match="'int3'.*int8"):
        lwjax.layerwise_shard(model, tokens, devices=devs[:4], compression="int3")


def test_no_layers_is_an_error():
    class Flat(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.a(x)

    with pytest.raises(LayerSegmentationError, match="named_scope"):
        lwjax.layerwise_shard(Flat(nnx.Rngs(0)), jnp.ones((2, 4)), cache_bytes=BIG)


# ---- stages split over "tp" ------------------------------------------------------------------

@pytest.mark.parametrize(("make", "ranges", "tp"), [
    (configs.tiny_dense, ((0, 2), (2, 4)), 4),
    (configs.tiny_moe, ((0, 1), (1, 2), (2, 3), (3, 4)), 2),
])
def test_stage_split_over_tp_matches_model(make, ranges, tp):
    from lwjax.passes.lower import lower
    from lwjax.passes.segment import segment
    from lwjax.passes.trace import trace

    cfg = make()
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg)
    m = 2
    graph = segment(trace(model, tokens, microbatch_size=8 // m))
    prog = lower(graph, ranges, jax.devices()[:len(ranges) * tp], m, tp=tp)
    params = prog.place_params(graph.traced.params)
    np.testing.assert_allclose(prog(params, tokens), model(tokens), atol=ATOL, rtol=RTOL)
    # q [D, N, H] is split over heads: each device holds N / tp heads of its stage's layers
    q_group = [a for a in params if a.shape[2:] == (cfg.hidden_size, cfg.num_heads,
                                                     cfg.head_dim)]
    assert q_group, [a.shape for a in params]
    shard = q_group[0].addressable_shards[0].data
    assert shard.shape[2:] == (cfg.hidden_size, cfg.num_heads // tp, cfg.head_dim)
    text = prog.fn.lower(params, tokens).compile().as_text()
    assert "all-reduce" in text  # the row-parallel halves are summed over tp


def test_layerwise_shard_splits_a_layer_that_does_not_fit_one_device(dense):
    cfg, model = dense
    tokens = _tokens(cfg)
    # The last layer with the head needs 0.28 MiB (weights and activation peak at microbatch
    # 2). A 0.25 MiB capacity holds it only split: a share of the split weights, the
    # activations and the embedding's and head's slots every device stores (padding).
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:16],
                               cache_bytes=int(0.25 * 2**20), microbatches=4,
                               allow=("split",), objective="bottleneck")
    assert sm.plan.tp > 1 and "split" in sm.plan.strategy
    assert all(len(s.devices) == sm.plan.tp for s in sm.plan.stages)
    assert all(sm.plan.device_bytes(s) <= sm.plan.capacity_bytes for s in sm.plan.stages)
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)


def test_step_objective_counts_the_cores_simulated_devices_share(dense):
    cfg, model = dense
    tokens = _tokens(cfg)
    cpu = dataclasses.replace(lwjax.hardware.host_cpu(), num_cores=2)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:16], hardware=cpu,
                               cache_bytes=BIG, microbatches=8)
    # 16 equal layers whose stages share the host's cores: every stage count costs the same
    # work (8 microbatches x 16 layers), so the fewest stages win the tie; the capacity here
    # holds the whole model on one device.
    assert len(sm.plan.stages) == 1 and sm.plan.concurrency == 2
    assert any(n.startswith("layout search") and "1 x tp 1, M=8" in n for n in sm.plan.notes)
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("key", ["mode", "cache_len", "microbatch_size"])
def test_plan_only_options_are_refused_by_name(dense, key):
    """mode= (or cache_len=, microbatch_size=) reached the tracer beside its own argument of
    that name: a raw TypeError. Now a ConfigError that says what to use instead."""
    cfg, model = dense
    with pytest.raises(lwjax.errors.ConfigError, match=f"{key}=.*not an option of layerwise_shard"):
        lwjax.layerwise_shard(model, _tokens(cfg), devices=jax.devices()[:2],
                              cache_bytes=BIG, **{key: "train" if key == "mode" else 4})
