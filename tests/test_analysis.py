"""Analysis passes: trace, segment, footprint -- against hand arithmetic and XLA."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import (
    ConfigError,
    InputError,
    LayerSegmentationError,
    TraceError,
    UnsupportedOnBackendError,
)
from lwjax.models import configs
from lwjax.passes.backend import check_runnable
from lwjax.passes.footprint import footprint
from lwjax.passes.segment import segment
from lwjax.passes.trace import trace
from lwjax.passes.validate import validate

F32 = 4
BF16 = 2


def sds(*shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


# ---- hand-built layers ------------------------------------------------------------------------

class Linear2(nnx.Module):
    """Two layers: x @ W0, then tanh(x @ W1) * 2 + 1 (a fused elementwise tail)."""

    def __init__(self, d, rngs, dtype=jnp.float32):
        self.w = nnx.List([nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype))
                           for _ in range(2)])

    def __call__(self, x):
        with jax.named_scope("layers_0"):
            x = x @ self.w[0][...]
        with jax.named_scope("layers_1"):
            x = jnp.tanh(x @ self.w[1][...]) * 2.0 + 1.0
        return x


def test_hand_arithmetic_matmul_layers():
    b, d = 8, 32
    model = nnx.eval_shape(lambda: Linear2(d, nnx.Rngs(0)))
    g = segment(trace(model, sds(b, d, dtype=jnp.float32)))
    fp = footprint(g)
    # layer 0: W = d*d*4; live at the dot: x (input) + y (output) = 2*b*d*4; no workspace.
    assert fp.layers[0].weights_bytes == d * d * F32
    assert fp.layers[0].activation_bytes == 2 * b * d * F32
    assert fp.layers[0].buffer_bytes == 0
    # layer 1: the dot's output is materialised; tanh, *2, +1 fuse into one output: at most
    # two [b, d] values are live at once (x + dot, then dot + result).
    assert fp.layers[1].activation_bytes == 2 * b * d * F32
    assert fp.layers[1].total_bytes == d * d * F32 + 2 * b * d * F32


def test_bf16_matmul_layers_per_backend():
    """A GPU holds the bf16 values as traced; XLA:CPU multiplies through float32 copies of x
    and W and keeps the float32 result (the bf16 one is converted where it is read)."""
    b, d = 256, 128
    model = nnx.eval_shape(lambda: Linear2(d, nnx.Rngs(0), jnp.bfloat16))
    g = segment(trace(model, sds(b, d, dtype=jnp.bfloat16)))
    gpu, cpu = footprint(g, backend="gpu"), footprint(g, backend="cpu")
    for f in (*gpu.layers, *cpu.layers):
        assert (f.weights_bytes, f.activation_bytes) == (d * d * BF16, 2 * b * d * BF16)
    assert {f.buffer_bytes for f in gpu.layers} == {0}  # no float32 copies on a GPU
    # at the dot: copies of W and x in float32, and the result in float32 instead of bf16
    copies = d * d * F32 + b * d * F32 + b * d * (F32 - BF16)
    assert {f.buffer_bytes for f in cpu.layers} == {copies}
    assert (gpu.backend, cpu.backend, cpu.layers[0].backend) == ("gpu", "cpu", "cpu")
    for row in validate(g, cpu):
        assert 0.95 <= row.ratio <= 1.05, row
    with pytest.raises(ConfigError, match="backend='cpu'"):
        validate(g, gpu)  # GPU bytes are not comparable with XLA:CPU's


def test_compressed_sizes_are_exact():
    cfg = configs.tiny_dense()  # D=64, N*H=64, F=128, float32
    g = segment(trace(models.abstract(cfg), sds(4, 16)))
    d, nh, f = 64, 64, 128
    norms = 2 * d * F32  # RMSNorm scales are not matmul weights: stored as is
    # (elements, output channels) of q, k, v, out, gate, up, down
    mats = [(d * nh, nh)] * 3 + [(nh * d, d), (d * f, f), (d * f, f), (f * d, d)]
    expected = {
        None: sum(n * F32 for n, _ in mats) + norms,
        "int8": sum(n + 2 * c for n, c in mats) + norms,
        "int4": sum(n // 2 + 2 * c for n, c in mats) + norms,
        # 2:4 on MLP (gate, up, down): n/2 kept int8 values + n/8 metadata bytes
        "int8-2:4": sum(n + 2 * c for n, c in mats[:4])
        + sum(n // 2 + n // 8 + 2 * c for n, c in mats[4:]) + norms,
        # 1:4 on MLP: n/4 kept int4 values (n/8 bytes) + n/16 metadata bytes
        "int4-75%": sum(n // 2 + 2 * c for n, c in mats[:4])
        + sum(n // 8 + n // 16 + 2 * c for n, c in mats[4:]) + norms,
    }
    for policy, want in expected.items():
        assert footprint(g, policy).layers[0].weights_bytes == want, policy


def test_moe_expert_scales_per_expert_channel():
    cfg = configs.tiny_moe()  # E=4 experts [E, D, F]: E*F output channels for gate/up
    g = segment(trace(models.abstract(cfg), sds(4, 16)))
    w = footprint(g, "int8").layers[0].weights_bytes
    d, nh, f, e = 64, 64, 128, 4
    attn = 3 * (d * nh + 2 * nh) + (nh * d + 2 * d)
    experts = 2 * (e * d * f + 2 * e * f) + (e * f * d + 2 * e * d)
    router = d * e + 2 * e
    assert w == attn + experts + router + 2 * d * F32


# ---- estimate vs XLA ---------------------------------------------------------------------------

def _medium(moe: bool):
    base = dataclasses.replace(configs.tiny_dense(), hidden_size=256, num_heads=4, head_dim=64,
                               mlp_hidden_size=1024, seq_len=256, batch_size=2, vocab_size=512)
    if not moe:
        return base
    return configs.MoEConfig(**{f.name: getattr(base, f.name)
                                for f in dataclasses.fields(configs.DenseConfig)}, num_experts=4)


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe", "medium_dense", "medium_moe"])
def test_estimate_within_10_percent_of_xla(name, mode):
    cfg = {"tiny_dense": configs.tiny_dense(), "tiny_moe": configs.tiny_moe(),
           "medium_dense": _medium(False), "medium_moe": _medium(True)}[name]
    t = cfg.seq_len if mode == "prefill" else 1
    g = segment(trace(models.abstract(cfg), sds(cfg.batch_size, t), mode=mode))
    rows = validate(g, footprint(g, backend="cpu"))
    assert len(rows) == 1  # identical layers are compiled once
    assert rows[0].layers == tuple(f"layers_{i}" for i in range(cfg.num_layers))
    assert 0.9 <= rows[0].ratio <= 1.1, rows[0]


@pytest.mark.parametrize(("mode", "seq"), [("prefill", 16), ("decode", 1024)])
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_bf16_estimate_within_10_percent_of_xla_cpu(name, mode, seq):
    """bf16 on XLA:CPU: the float32 copies of its matmuls are counted (without them the
    estimate was half of XLA's). ``seq`` is the prompt (prefill) or the KV cache (decode)."""
    cfg = dataclasses.replace(getattr(configs, name)(), dtype=jnp.bfloat16, seq_len=seq)
    g = segment(trace(models.abstract(cfg), sds(cfg.batch_size, seq if mode == "prefill" else 1),
                      mode=mode))
    (row,) = validate(g, footprint(g, backend="cpu"))
    assert 0.9 <= row.ratio <= 1.1, row


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_bf16_long_prefill_matches_xla_live_buffers(name):
    """At S=256 XLA:CPU's heap packs bf16 prefill with ~50% gaps (memory_analysis 13.3 MB for
    8.98 MB of live buffers, dense), so the estimate is held to XLA's own live buffers."""
    cfg = dataclasses.replace(getattr(configs, name)(), dtype=jnp.bfloat16, seq_len=256)
    g = segment(trace(models.abstract(cfg), sds(cfg.batch_size, 256)))
    (row,) = validate(g, footprint(g, backend="cpu"), peak=True)
    assert 0.95 <= row.estimate_bytes / row.xla_peak_bytes <= 1.05, row


def test_float16_on_cpu_is_refused_before_anything_compiles():
    cfg = dataclasses.replace(configs.tiny_dense(), dtype=jnp.float16)
    model, tokens = models.abstract(cfg), jnp.zeros((4, 16), jnp.int32)
    hw = dataclasses.replace(lwjax.hardware.H100_SXM, name="a CPU", kind="cpu")  # not measured
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.raises(UnsupportedOnBackendError,
                           match=r"layers_0: dot_general .*F16_F16_F32.*'cpu'.*bfloat16"):
            lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:2], hardware=hw,
                                  cache_bytes=2**30)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    traced = trace(models.abstract(cfg), sds(4, 16))
    with pytest.raises(UnsupportedOnBackendError, match="float16"):
        check_runnable(traced, "cpu")
    check_runnable(traced, "gpu")  # planning for a GPU from here is fine
    assert lwjax.analyze(models.abstract(cfg), sds(4, 16), backend="gpu").backend == "gpu"
    bf16 = dataclasses.replace(cfg, dtype=jnp.bfloat16)
    check_runnable(segment(trace(models.abstract(bf16), sds(4, 16))), "cpu")


def test_fused_attention_drops_the_scores():
    cfg = dataclasses.replace(configs.tiny_dense(), seq_len=512)
    g = segment(trace(models.abstract(cfg), sds(2, 512)))
    as_traced, fused = footprint(g).layers[0], footprint(g, attention="fused").layers[0]
    assert as_traced.attention == "materialized" and fused.attention == "fused"
    scores = 2 * cfg.num_heads * 512 * 512 * F32
    assert as_traced.activation_bytes - fused.activation_bytes >= scores


# ---- segmentation ------------------------------------------------------------------------------

def test_lwjax_models_segment_into_their_layers():
    for cfg in (configs.tiny_dense(), configs.tiny_moe()):
        g = segment(trace(models.abstract(cfg), sds(4, 16)))
        assert [s.name for s in g.layers] == [f"layers_{i}" for i in range(cfg.num_layers)]
        assert len(g.distinct_layers()) == 1
        paths = {p.path for p in g.params}
        assert {p.path for p in g.params if p.users == ("prologue",)} == {"embed"}
        assert {p.path for p in g.params if p.users == ("epilogue",)} == {
            "final_norm/scale", "lm_head"}
        assert len(paths) == len(g.params)


class GPTBlock(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln_1")(x)
        h = nn.Dense(self.d, name="c_attn")(h) * mask[..., None]
        x = x + h
        return x + nn.Dense(self.d, name="c_proj")(nn.gelu(nn.Dense(2 * self.d, name="c_fc")(x)))


class GPT(nn.Module):
    """A linen model in another style: h_0..h_N blocks, a mask argument, tied embeddings."""

    vocab: int = 50
    d: int = 16
    n: int = 3

    @nn.compact
    def __call__(self, tokens, mask, *, deterministic=True):
        wte = nn.Embed(self.vocab, self.d, name="wte")
        x = wte(tokens)
        for i in range(self.n):
            x = GPTBlock(self.d, name=f"h_{i}")(x, mask)
        x = nn.LayerNorm(name="ln_f")(x)
        return wte.attend(x)


def test_linen_gpt_style_segments_with_tied_embedding():
    m = GPT()
    toks, mask = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5))
    variables = jax.eval_shape(lambda: m.init(jax.random.key(0), toks, mask))
    g = segment(trace(m, variables, toks, mask, deterministic=True))
    assert [s.name for s in g.layers] == ["GPT/h_0", "GPT/h_1", "GPT/h_2"]
    tied = [p for p in g.params if p.path.endswith("wte/embedding")]
    assert len(tied) == 1 and tied[0].users == ("prologue", "epilogue")
    assert all(p.users for p in g.params)
    # the mask is an activation input of every layer, batch-shaped for microbatching
    assert g.traced.batch_shaped == (True, True)
    assert all(g.arg_vars[1] in layer.inputs for layer in g.layers)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(8, name="fc")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="embed")(x)
        stack = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=5)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x)


def test_scanned_stack_splits_into_iterations():
    m = Scanned()
    x = jnp.ones((4, 8))
    variables = m.init(jax.random.key(0), x)
    g = segment(trace(m, variables, x))
    assert [s.name for s in g.layers] == [f"Scanned/blocks_{i}" for i in range(5)]
    kernels = [p for p in g.params if "blocks/fc/kernel" in p.path]
    assert [p.slice_index for p in kernels] == list(range(5))
    assert all(p.shape == (8, 8) for p in kernels)
    assert [p.users for p in kernels] == [(f"Scanned/blocks_{i}",) for i in range(5)]
    fp = footprint(g)
    assert all(f.weights_bytes == (8 * 8 + 8) * F32 for f in fp.layers)
    assert len(g.distinct_layers()) == 1


class Unscoped(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 8, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = jax.nn.relu(b(x))
        return self.out(x)


def test_nnx_without_scopes_gets_them_from_the_module_tree():
    g = segment(trace(Unscoped(nnx.Rngs(0)), jnp.ones((2, 4))))
    assert [s.name for s in g.layers] == ["blocks_0", "blocks_1", "blocks_2"]
    assert g.traced.scoped_by_lwjax
    assert [p.path for p in g.params if p.users == ("blocks_1",)] == [
        "blocks/1/bias", "blocks/1/kernel"]


class NoLayers(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.a(x)


def test_no_layers_is_an_error_that_says_how_to_mark_them():
    with pytest.raises(LayerSegmentationError, match="named_scope"):
        segment(trace(NoLayers(nnx.Rngs(0)), jnp.ones((2, 4))))


class Interleaved(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jnp.ones((4, 4)))

    def __call__(self, x):
        with jax.named_scope("layers_0"):
            x = x @ self.w[...]
        with jax.named_scope("layers_1"):
            x = x @ self.w[...]
        with jax.named_scope("layers_0"):
            x = x @ self.w[...]
        return x


def test_interleaved_layers_are_ambiguous():
    with pytest.raises(LayerSegmentationError, match="layers_0.*again"):
        segment(trace(Interleaved(nnx.Rngs(0)), jnp.ones((2, 4))))


def test_unknown_primitive_is_reported_not_zero():
    class FFTLayer(nnx.Module):
        def __call__(self, x):
            for i in range(2):
                with jax.named_scope(f"layers_{i}"):
                    x = jnp.fft.fft(x).real
            return x

    g = segment(trace(FFTLayer(), jnp.ones((4, 64))))
    f = footprint(g).layers[0]
    assert "fft" in f.unknown_primitives
    assert f.buffer_bytes > 0


# ---- analyze ----------------------------------------------------------------------------------

def test_analyze_report_summary_and_json():
    cfg = configs.tiny_moe()
    report = lwjax.analyze(models.abstract(cfg), sds(4, 16), compression="int8",
                           microbatch_size=2)
    assert report.microbatch_size == 2 and report.compression == "int8"
    assert [r.name for r in report.layers] == [f"layers_{i}" for i in range(4)]
    text = report.summary(capacity_bytes=2**20)
    assert "fill %" in text and "layers_3" in text
    data = json.loads(report.to_json())
    assert data["layers"][0]["total_bytes"] == report.layers[0].footprint.total_bytes


def test_analyze_decode_counts_the_kv_cache():
    cfg = configs.tiny_dense()
    report = lwjax.analyze(models.abstract(cfg), sds(4, 1), mode="decode", cache_len=64)
    # K and V caches [B=4, L=64, N=4, H=16] float32 per layer, plus the int32 length
    assert report.layers[0].footprint.kv_cache_bytes == 2 * 4 * 64 * 4 * 16 * F32 + 4
    assert report.cache_len == 64


def test_real_and_abstract_models_agree():
    cfg = configs.tiny_dense()
    real = lwjax.analyze(models.build(cfg, rngs=nnx.Rngs(0)), jnp.zeros((4, 16), jnp.int32))
    abstract = lwjax.analyze(models.abstract(cfg), sds(4, 16))
    assert real == abstract


def test_bad_inputs():
    cfg = configs.tiny_dense()
    m = models.abstract(cfg)
    with pytest.raises(InputError, match="microbatch_size 3"):
        lwjax.analyze(m, sds(4, 16), microbatch_size=3)
    with pytest.raises(TraceError, match="mode"):
        lwjax.analyze(m, sds(4, 16), mode="train")
    with pytest.raises(InputError, match=r"\[batch, seq\]"):
        lwjax.analyze(m, sds(4, 16, dtype=jnp.float32))
    with pytest.raises(TraceError, match="NNX or linen"):
        lwjax.analyze(lambda x: x, sds(4, 16))
    with pytest.raises(lwjax.errors.UnknownPresetError, match="int8"):
        lwjax.analyze(m, sds(4, 16), compression="int7")


def test_a_block_shared_by_the_layers_is_neither_a_layers_nor_outside():
    """Three numbered blocks, each followed by one block they share: the family holds 3/4 of
    the weight bytes, nothing is outside (every layer reads the shared block), and the
    summary says where the last quarter is instead of leaving the shares short of 100%."""

    class Blk(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(32, 32, rngs=rngs)

        def __call__(self, x):
            return jax.nn.gelu(self.linear(x))

    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Blk(rngs) for _ in range(3)])
            self.shared = Blk(rngs)

        def __call__(self, x):
            for block in self.blocks:
                x = self.shared(block(x))
            return x

    report = lwjax.analyze(Shared(nnx.Rngs(0)), jnp.ones((4, 32)))
    assert len(report.layers) == 3 and "75% of the weights" in report.layers_found
    assert report.outside_weights_share == 0.0
    assert report.shared_weights_share == pytest.approx(0.25)
    assert "25.0% sit outside the layers' scopes but every layer that reads them holds " \
        "them" in report.summary()
    assert json.loads(report.to_json())["shared_weights_share"] == pytest.approx(0.25)


@pytest.mark.parametrize("case", ["exp", "affine", "mask"])
def test_dynamic_slice_of_a_producer_against_memory_analysis(case):
    """XLA:CPU computes a cheap producer (an iota mask, x * 2 + 1) per element of the
    dynamic slice that reads it, but writes an expensive one (exp) whole first; the peak
    (``peak_live_bytes``, the arguments live throughout) equals memory_analysis' arguments +
    outputs + temporaries."""
    from lwjax.passes.footprint import peak_live_bytes

    p = 512
    rows = jnp.arange(p)
    producers = {"exp": jnp.exp, "affine": lambda x: x * 2 + 1,
                 "mask": lambda x: jnp.where(rows[:, None] >= rows[None], x, 0.0)}

    def f(i, x):
        return jax.lax.dynamic_slice(producers[case](x), (i, 0), (8, p)) + 1

    args = (jnp.int32(3), jnp.ones((p, p)))
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    ma = jax.jit(f).lower(*args).compile().memory_analysis()
    xla = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    # XLA keeps the (undonated) arguments to the end: so does the count here
    assert peak_live_bytes(jaxpr.eqns, jaxpr.invars, jaxpr.outvars,
                           live_through=jaxpr.invars) == pytest.approx(xla, abs=64)
    assert (ma.temp_size_in_bytes >= p * p * 4) == (case == "exp")
