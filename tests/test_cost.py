"""The roofline cost model and hardware specs, against arithmetic worked out by hand."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.experimental import roofline as jax_roofline
from jax.extend.core import Primitive
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lwjax import hardware, models
from lwjax.errors import ConfigError, LwjaxError, UnknownPresetError
from lwjax.hardware import HardwareSpec
from lwjax.passes import cost

# A device with round numbers, so every figure below can be checked on paper.
ROUND = HardwareSpec(
    name="round",
    kind="gpu",
    l2_bytes=64 * 2**20,
    persisting_l2_bytes=None,
    hbm_bytes=10**11,
    hbm_bandwidth=2e12,  # 2 TB/s off chip
    l2_bandwidth=10e12,  # 10 TB/s on chip
    peak_bf16_flops=100e12,
    peak_fp32_flops=10e12,
    peak_int8_ops=200e12,
    link_bandwidth=100e9,  # 100 GB/s per direction
    link_latency=1e-6,
)


# ---- layer_time ----------------------------------------------------------------------------


def test_layer_time_worked_example():
    # 1e11 FLOPs, 4 GB of weights, 1 GB of activations, on ROUND in bf16:
    #   compute               = 1e11 / 100e12                 = 1.0 ms
    #   all off chip: memory  = max(5e9 / 2e12, 5e9 / 10e12)  = max(2.5, 0.5) ms = 2.5 ms
    #                 -> memory bound, 2.5 ms
    #   weights in L2: memory = max(1e9 / 2e12, 5e9 / 10e12)  = max(0.5, 0.5) ms = 0.5 ms
    #                 -> compute bound, 1.0 ms
    #   everything in L2:      = max(0, 5e9 / 10e12)          = 0.5 ms -> compute bound
    #   float32 (10 TFLOP/s):  compute = 10 ms                 -> compute bound
    c = cost.LayerCost(flops=1e11, weight_bytes=4 * 10**9, activation_bytes=10**9)
    off = cost.layer_time(c, ROUND, weights_on_chip=False)
    assert off.compute_s == pytest.approx(1e-3)
    assert off.memory_s == pytest.approx(2.5e-3)
    assert off.total_s == pytest.approx(2.5e-3)
    assert off.bound == "memory"

    on = cost.layer_time(c, ROUND, weights_on_chip=True)
    assert on.memory_s == pytest.approx(0.5e-3)
    assert (on.total_s, on.bound) == (pytest.approx(1e-3), "compute")

    all_on = cost.layer_time(c, ROUND, weights_on_chip=True, activations_on_chip=True)
    assert all_on.memory_s == pytest.approx(0.5e-3)

    f32 = cost.layer_time(c, ROUND, weights_on_chip=False, dtype="float32")
    assert (f32.total_s, f32.bound) == (pytest.approx(10e-3), "compute")
    assert cost.layer_time(c, ROUND, weights_on_chip=False, dtype=jnp.float16).compute_s == (
        pytest.approx(1e-3)
    )


def test_layer_cost_rejects_negative_or_nan():
    with pytest.raises(ConfigError, match="weight_bytes"):
        cost.LayerCost(flops=1.0, weight_bytes=-1, activation_bytes=0)
    with pytest.raises(ConfigError, match="flops"):
        cost.LayerCost(flops=float("nan"), weight_bytes=0, activation_bytes=0)


# ---- links and pipelines -------------------------------------------------------------------


def test_transfer_and_allreduce():
    # 1 GB over 100 GB/s + 1 us = 10 ms + 1 us.
    assert cost.transfer_time(1e9, ROUND) == pytest.approx(0.010001)
    assert cost.transfer_time(0, ROUND) == 0.0
    # Ring over 4: 2 * 3/4 * 1e9 / 100e9 = 15 ms, plus 2 * 3 latencies = 6 us.
    assert cost.allreduce_time(1e9, 4, ROUND) == pytest.approx(0.015006)
    assert cost.allreduce_time(1e9, 1, ROUND) == 0.0
    # H100: 450 GB/s per direction; 8-way all-reduce of 8 GB = 14 GB / 450 GB/s + 14 * 5 us.
    assert cost.allreduce_time(8e9, 8, hardware.H100_SXM) == pytest.approx(14 / 450 + 70e-6)
    with pytest.raises(ConfigError, match="nbytes"):
        cost.transfer_time(-1, ROUND)
    with pytest.raises(ConfigError, match="devices"):
        cost.allreduce_time(1e9, 0, ROUND)


def test_bubble_fraction():
    assert cost.bubble_fraction(2, 8) == pytest.approx(1 / 9)  # TP=8 x PP=2, 8 microbatches
    assert cost.bubble_fraction(16, 8) == pytest.approx(15 / 23)  # 16 stages, 8 microbatches
    assert cost.bubble_fraction(1, 5) == 0.0
    with pytest.raises(ConfigError, match="microbatches"):
        cost.bubble_fraction(2, 0)


def test_pipeline_throughput():
    # Stages of 2 s and 3 s, 0.5 s transfer, 4 microbatches of 100 tokens:
    # tick = 3 + 0.5 = 3.5 s; 4 + 2 - 1 = 5 ticks -> 17.5 s for 400 tokens
    # -> 22.857 tokens/s, 43.75 ms per token.
    p = cost.pipeline_throughput([2.0, 3.0], 0.5, 4, 100)
    assert p.step_s == pytest.approx(17.5)
    assert p.tps == pytest.approx(400 / 17.5)
    assert p.tpot_ms == pytest.approx(43.75)
    assert p.bubble == pytest.approx(1 / 5)
    assert p.tokens_per_step == 400
    assert "projected" in p.summary()
    # One stage sends nothing: 3 ticks of 2 s.
    assert cost.pipeline_throughput([2.0], 0.5, 3, 10).step_s == pytest.approx(6.0)
    with pytest.raises(ConfigError, match="empty"):
        cost.pipeline_throughput([], 0.0, 1, 1)


# ---- cost_from_jaxpr -----------------------------------------------------------------------


def test_matmul_flops_and_bytes():
    m, k, n = 8, 32, 16
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    c = cost.cost_from_jaxpr(jax.make_jaxpr(jax.jit(jnp.matmul))(a, b), weight_invars=[1])
    assert c.flops == 2 * m * n * k
    assert c.hbm_bytes == 4 * (m * k + k * n + m * n)
    assert c.weight_bytes == c.weight_read_bytes == 4 * k * n
    assert c.activation_bytes == 4 * (m * k + m * n)
    assert c.complete
    # Batched: 3 independent matmuls.
    bmm = jax.make_jaxpr(jnp.matmul)(jnp.ones((3, m, k)), jnp.ones((3, k, n)))
    assert cost.cost_from_jaxpr(bmm).flops == 3 * 2 * m * n * k


def test_scan_counts_every_iteration_unlike_jax_roofline():
    layers, d, batch = 3, 8, 4

    def f(ws, x):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    ws = jax.ShapeDtypeStruct((layers, d, d), jnp.float32)
    x = jax.ShapeDtypeStruct((batch, d), jnp.float32)
    c = cost.cost_of(f, ws, x, weight_argnums=(0,))
    assert c.flops == layers * 2 * batch * d * d
    assert c.weight_read_bytes == c.weight_bytes == layers * d * d * 4  # each slice read once
    _, theirs = jax_roofline.roofline(f)(ws, x)
    assert theirs.flops == 2 * batch * d * d  # jax 0.10.2 counts the body once


def test_cond_counts_costliest_branch_and_while_is_reported():
    x = jnp.ones((4, 4))
    cond = jax.make_jaxpr(lambda x: jax.lax.cond(x.sum() > 0, lambda y: y @ y, lambda y: y, x))
    c = cost.cost_from_jaxpr(cond(x))
    assert c.flops == 2 * 4**3
    assert any("cond" in note for note in c.notes)

    loop = jax.make_jaxpr(lambda x: jax.lax.while_loop(lambda y: y.sum() < 0, lambda y: y @ y, x))
    w = cost.cost_from_jaxpr(loop(x))
    assert not w.complete
    assert "while" in w.unsupported[0][0]
    assert w.flops == 2 * 4**3  # body counted once: a lower bound
    assert "NOT COUNTED" in w.summary()


def test_primitive_without_rule_is_reported_not_zero():
    mystery = Primitive("mystery")
    mystery.def_abstract_eval(lambda x: x)
    c = cost.cost_from_jaxpr(jax.make_jaxpr(lambda x: mystery.bind(x) @ x)(jnp.ones((4, 4))))
    assert c.unsupported == (("mystery (no roofline rule)", 1),)
    assert not c.complete
    assert c.flops == 2 * 4**3  # the rest is still counted


def test_collectives_in_shard_map_use_its_mesh():
    # A ring shift over 16 devices: each device sends its [2, 8] f32 shard (64 bytes) over
    # one link; the matmul is counted per device.
    mesh = Mesh(jax.devices()[:16], ("stage",))
    perm = [(i, (i + 1) % 16) for i in range(16)]

    def body(w, x):
        return jax.lax.ppermute(x @ w[0], "stage", perm)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P("stage"), P()), out_specs=P("stage"))
    c = cost.cost_of(f, jnp.ones((16, 8, 8)), jnp.ones((2, 8)), weight_argnums=(0,))
    assert c.complete
    assert c.flops == 2 * 2 * 8 * 8
    assert c.ici_bytes == 2 * 8 * 4


def _block_cost_from_jaxpr(cfg):
    """cost_from_jaxpr of block 0, traced abstractly; weights = the block's parameters."""
    block = models.abstract(cfg).layers[0]  # parameters are ShapeDtypeStructs: no weights
    graph, state = nnx.split(block)

    def run(state, x_BTD):
        return nnx.merge(graph, state)(x_BTD, jnp.arange(x_BTD.shape[1]))[0]

    x = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len, cfg.hidden_size), cfg.dtype)
    return cost.cost_of(run, state, x, weight_argnums=(0,)), run, state, x


@pytest.mark.parametrize(
    "cfg",
    [
        models.configs.tiny_dense(),
        models.configs.tiny_moe(),
        dataclasses.replace(models.configs.tiny_dense(), dtype=jnp.bfloat16),
        dataclasses.replace(models.configs.tiny_moe(), dtype=jnp.float16, capacity_factor=None),
    ],
    ids=["dense-f32", "moe-f32", "dense-bf16", "moe-f16-dropless"],
)
def test_closed_form_block_equals_jaxpr_roofline(cfg):
    # Tolerance: none. The model's matmuls are exactly the closed form's (the XLA attention
    # computes the full T x T square, so scores are not halved); everything else in the
    # block (norms, rotary, softmax, routing, gathers, scatters) is elementwise or data
    # movement, which the fused roofline counts as 0 FLOPs.
    jaxpr_cost, run, state, x = _block_cost_from_jaxpr(cfg)
    closed = cost.block_cost(cfg, attention="materialized")
    assert jaxpr_cost.flops == cost.block_flops(cfg).total == closed.flops
    assert jaxpr_cost.weight_bytes == closed.weight_bytes
    assert closed.weight_bytes == cfg.block_param_count() * cfg.dtype.itemsize
    assert jaxpr_cost.activation_bytes == closed.activation_bytes
    assert jaxpr_cost.complete
    # And jax's own interpreter agrees where it applies (no control flow here).
    assert jax_roofline.roofline(run)(state, x)[1].flops == jaxpr_cost.flops


def test_block_flops_by_hand():
    cfg = models.configs.tiny_dense()  # B=4 T=16 D=64 N=4 H=16 F=128
    f = cost.block_flops(cfg)
    assert f.attention_projections == 4 * 2 * 4 * 16 * 64 * 4 * 16 == 2_097_152
    assert f.attention_scores == 2 * 2 * 4 * 16 * 16 * 4 * 16 == 262_144
    assert f.mlp == 3 * 2 * 4 * 16 * 64 * 128 == 3_145_728
    assert f.total == 5_505_024
    # Causal skipping keeps T(T+1)/2 = 136 of the 256 query-key pairs.
    assert cost.block_flops(cfg, causal_skip=True).attention_scores == 2 * 2 * 4 * 4 * 16 * 136
    # TP=2 halves every term of a dense block.
    assert cost.block_flops(cfg, tp=2).total == f.total // 2
    with pytest.raises(ConfigError, match="tp=3"):
        cost.block_flops(cfg, tp=3)

    moe = models.configs.tiny_moe()  # E=4, k=2, capacity ceil(1.25 * 16 * 2 / 4) = 10
    assert moe.capacity(16) == 10
    assert cost.block_flops(moe).mlp == 2 * 4 * 16 * 64 * 4 + 3 * 2 * 4 * 4 * 10 * 64 * 128


def test_flash_attention_bytes_drop_the_scores():
    cfg = models.configs.tiny_dense()
    b, t, n = cfg.batch_size, cfg.seq_len, cfg.num_heads
    flash = cost.block_cost(cfg).activation_bytes
    materialized = cost.block_cost(cfg, attention="materialized").activation_bytes
    assert materialized - flash == b * n * t * t * (4 + 4)  # f32 logits + f32 probs


# ---- projections ---------------------------------------------------------------------------


def test_projections_compose_the_pieces():
    cfg = dataclasses.replace(models.configs.tiny_dense(), batch_size=8)
    m, mb = 4, 2
    act = mb * cfg.seq_len * cfg.hidden_size * 4
    lw = cost.project_layerwise(cfg, ROUND, [1, 3], m)
    block = cost.layer_time(
        cost.block_cost(cfg, batch_size=mb), ROUND, weights_on_chip=True, dtype="float32"
    )
    assert lw.stage_s == pytest.approx((block.total_s, 3 * block.total_s))
    assert lw.transfer_s == pytest.approx(cost.transfer_time(act, ROUND))
    assert lw.step_s == pytest.approx((m + 1) * (3 * block.total_s + lw.transfer_s))

    tp = cost.project_tp_pp(cfg, ROUND, 2, 2, m)
    shard = cost.layer_time(
        cost.block_cost(cfg, batch_size=mb, tp=2), ROUND, weights_on_chip=True, dtype="float32"
    )
    per_block = shard.total_s + 2 * cost.allreduce_time(act, 2, ROUND)
    assert tp.stage_s == pytest.approx((2 * per_block, 2 * per_block))
    # A 1-byte cache puts every weight in HBM, which is never faster.
    assert cost.project_layerwise(cfg, ROUND, [2, 2], m, cache_bytes=1).tps <= (
        cost.project_layerwise(cfg, ROUND, [2, 2], m).tps
    )
    with pytest.raises(ConfigError, match="does not divide"):
        cost.project_tp_pp(cfg, ROUND, 2, 2, 3)
    with pytest.raises(ConfigError, match="num_layers"):
        cost.project_layerwise(cfg, ROUND, [1, 1], m)


def test_decode_block_cost_by_hand():
    cfg = models.configs.tiny_dense()  # B=4 D=64 N=4 H=16 F=128, float32
    b, d, n, h, f, length = 4, 64, 4, 16, 128, 100
    c = cost.decode_block_cost(cfg, cache_len=length)
    # one token per sequence: q/k/v/out and the MLP on B tokens, the scores over the cache
    assert c.flops == 4 * 2 * b * d * n * h + 3 * 2 * b * d * f + 2 * 2 * b * n * h * length
    assert c.weight_bytes == cost.block_cost(cfg).weight_bytes
    one_token = cost.block_cost(cfg, seq_len=1).activation_bytes
    assert c.activation_bytes == one_token + 4 * (2 * b * length * n * h + 2 * b * n * h)
    # tp=2 halves the heads each device attends with
    c2 = cost.decode_block_cost(cfg, cache_len=length, tp=2)
    assert c2.flops == 4 * 2 * b * d * 2 * h + 3 * 2 * b * d * 64 + 2 * 2 * b * 2 * h * length


def _decode_time(c, *, on_chip=True):
    return cost.layer_time(c, ROUND, weights_on_chip=on_chip, dtype="float32").total_s


def test_embedding_and_head_cost_by_hand():
    cfg = models.configs.tiny_dense()  # D=64 V=256, float32
    e = cost.embedding_cost(cfg, tokens=3)  # a gather: 3 rows of 64 read, 3 written
    assert (e.flops, e.weight_bytes, e.activation_bytes) == (0.0, 4 * 3 * 64, 4 * 3 * 64)
    h = cost.head_cost(cfg, tokens=3, tp=2)  # vocab split: 128 columns per device
    assert h.flops == 2 * 3 * 64 * 128
    assert h.weight_bytes == 4 * (64 * 128 + 64)  # head columns + the final-norm scale
    assert h.activation_bytes == 4 * 3 * (64 + 128)  # normed input read, logits written
    with pytest.raises(ConfigError, match="tp=3 does not divide vocab_size=256"):
        cost.head_cost(cfg, tokens=1, tp=3)


def test_ring_decode_by_hand():
    # tiny_dense with batch 8, S = 4 stages of one block, tp = 1, KV cache of 64 positions,
    # prompt of 16; ROUND holds every weight in L2.
    cfg = dataclasses.replace(models.configs.tiny_dense(), batch_size=8)
    length, prompt = 64, 16
    for m, period, bubble in ((2, 4, 0.5), (4, 4, 0.0), (8, 8, 0.0)):
        mb = 8 // m
        block = _decode_time(cost.decode_block_cost(cfg, batch_size=mb, cache_len=length))
        embed = _decode_time(cost.embedding_cost(cfg, tokens=mb))
        head = _decode_time(cost.head_cost(cfg, tokens=mb))
        p = cost.project_decode(cfg, ROUND, [1] * 4, 1, m, cache_len=length, prompt_len=prompt)
        assert (p.schedule, p.period_ticks, p.bubble) == ("ring", period, bubble)
        # embedding on stage 0, final norm + head + argmax on stage 3, inside the tick
        assert p.stage_s == pytest.approx((block + embed, block, block, block + head))
        assert p.transfer_s == pytest.approx(1e-6 + mb * 64 * 4 / 100e9)
        tick = block + head + p.transfer_s
        assert p.tick_s == pytest.approx(tick)
        assert p.outside_s == 0.0
        assert p.tpot_ms == pytest.approx(period * tick * 1e3)
        assert p.tps == pytest.approx(8 / (period * tick))
        # prefill: M + S - 1 GPipe ticks at prompt length; the head on the last position only
        pre_block = _decode_time(cost.block_cost(cfg, batch_size=mb, seq_len=prompt))
        pre_head = _decode_time(cost.head_cost(cfg, tokens=mb))
        pre_tick = pre_block + pre_head + 1e-6 + mb * prompt * 64 * 4 / 100e9
        assert p.prefill_ms == pytest.approx((m + 3) * pre_tick * 1e3)
        assert (p.cache_len, p.prompt_len) == (length, prompt)
        assert p.kv_bytes_per_device == 2 * 8 * length * 4 * 16 * 4  # one layer, all 8 seqs
    # The head's bytes by hand for M = 4 (mb = 2): 2*2*64*256 FLOPs at 10 TFLOP/s = 6.5536
    # ns; 65,792 weight bytes on chip + 2,560 activation bytes: max(2560 / 2e12,
    # 68,352 / 10e12) = 6.8352 ns -> memory bound.
    assert _decode_time(cost.head_cost(cfg, tokens=2)) == pytest.approx(6.8352e-9)
    # cache_len defaults to the prompt, which defaults to seq_len
    assert cost.project_decode(cfg, ROUND, [4], 1, 1, prompt_len=40).cache_len == 40
    assert cost.project_decode(cfg, ROUND, [4], 1, 1).cache_len == cfg.seq_len


def test_gpipe_decode_by_hand():
    # TP=2 x PP=2 over tiny_dense (batch 8): M + S - 1 ticks per token, embedding and head
    # after the pipeline on every device.
    cfg = dataclasses.replace(models.configs.tiny_dense(), batch_size=8)
    length = 64
    d, s = 64, 4
    embed = _decode_time(cost.embedding_cost(cfg, tokens=8)) + cost.allreduce_time(
        s * 8 * d, 2, ROUND)  # every device embeds all 8 tokens, vocab-parallel
    head = (cost.transfer_time(s * 4 * d, ROUND)  # last stage sends 4 of 8 rows to stage 0
            + _decode_time(cost.head_cost(cfg, tokens=4, tp=2))  # B / pp = 4 sequences
            + cost.allreduce_time(8 * 4, 2, ROUND))  # argmax (value, index) over tp
    for m in (2, 4, 8):
        mb = 8 // m
        block = _decode_time(cost.decode_block_cost(cfg, batch_size=mb, cache_len=length, tp=2))
        stage = 2 * (block + 2 * cost.allreduce_time(s * mb * d, 2, ROUND))
        p = cost.project_decode(cfg, ROUND, [2, 2], 2, m, cache_len=length, schedule="gpipe")
        assert (p.period_ticks, p.bubble) == (m + 1, pytest.approx(1 / (m + 1)))
        assert p.bubble == pytest.approx(cost.bubble_fraction(2, m))
        assert p.stage_s == pytest.approx((stage, stage))
        tick = stage + cost.transfer_time(s * mb * d, ROUND)
        assert p.tick_s == pytest.approx(tick)
        assert p.outside_s == pytest.approx(embed + head)
        assert p.tpot_ms == pytest.approx(((m + 1) * tick + embed + head) * 1e3)
        assert p.tps == pytest.approx(8 / ((m + 1) * tick + embed + head))
        assert p.kv_bytes_per_device == 2 * 2 * 8 * length * 2 * 16 * 4  # 2 layers, 2 heads


def test_ring_beats_gpipe_when_every_stage_is_busy():
    # Equal stage times: at M >= S the ring's period is M ticks, GPipe's M + S - 1.
    for stages in range(2, 9):
        for m in range(stages, 3 * stages):
            ring = cost.DECODE_SCHEDULES["ring"].period_ticks(stages, m)
            gpipe = cost.DECODE_SCHEDULES["gpipe"].period_ticks(stages, m)
            assert (ring, gpipe) == (m, m + stages - 1)
    cfg = dataclasses.replace(models.configs.tiny_dense(), batch_size=8)
    for m in (4, 8):
        ring = cost.project_decode(cfg, ROUND, [1] * 4, 1, m, schedule="ring")
        gpipe = cost.project_decode(cfg, ROUND, [1] * 4, 1, m, schedule="gpipe")
        assert ring.tps > gpipe.tps
        assert ring.tpot_ms < gpipe.tpot_ms


def test_decode_weights_leave_l2_when_a_device_holds_too_much():
    # A cache one byte over a block: the middle stages keep their block in L2; stage 0 also
    # holds the embedding table and stage 3 the head, so both read from HBM.
    cfg = models.configs.tiny_dense()
    c = cost.decode_block_cost(cfg, batch_size=1)
    head, embed = cost.head_cost(cfg, tokens=1), cost.embedding_cost(cfg, tokens=1)
    p = cost.project_decode(cfg, ROUND, [1] * 4, 1, 4, cache_bytes=c.weight_bytes + 1)
    on, off = _decode_time(c), _decode_time(c, on_chip=False)
    assert p.stage_s == pytest.approx((
        off + _decode_time(embed, on_chip=False), on, on, off + _decode_time(head, on_chip=False)
    ))


def test_project_decode_keeps_its_old_call_and_checks_input():
    cfg = dataclasses.replace(models.configs.tiny_dense(), batch_size=8)
    p = cost.project_decode(cfg, ROUND, [1, 3], 1, 4, cache_len=64)  # positional, as before
    assert p.schedule == "ring" and p.layers_per_stage == (1, 3) and p.tp == 1
    assert p.tpot_ms == pytest.approx(4 * p.tick_s * 1e3)
    assert "ring decode" in p.summary()
    with pytest.raises(ConfigError, match="schedule='1f1b' is not one of"):
        cost.project_decode(cfg, ROUND, [4], 1, 1, schedule="1f1b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="divisor of batch_size"):
        cost.project_decode(cfg, ROUND, [4], 1, 3)
    with pytest.raises(ConfigError, match="num_layers"):
        cost.project_decode(cfg, ROUND, [1, 1], 1, 2)
    with pytest.raises(ConfigError, match="prompt_len"):
        cost.project_decode(cfg, ROUND, [4], 1, 1, prompt_len=0)


def test_decode_comparison_picks_the_best_microbatches():
    cfg = dataclasses.replace(models.configs.tiny_dense(), batch_size=8)
    lw, base = cost.project_decode_comparison(cfg, ROUND, tp=2, pp=2, cache_len=64)
    for record, stages, tp, schedule in ((lw, [1] * 4, 1, "ring"), (base, [2, 2], 2, "gpipe")):
        brute = [cost.project_decode(cfg, ROUND, stages, tp, m, cache_len=64, schedule=schedule)
                 for m in (1, 2, 4, 8)]
        best = min(brute, key=lambda p: p.tpot_ms)
        assert record == cost.DecodeComparison.of(record.method, ROUND, best)
        assert (record.schedule, record.tp, record.layers_per_stage) == (
            schedule, tp, tuple(stages))
        assert record.tps == pytest.approx(8 / (record.tpot_ms / 1e3))
        assert record.tpot_ms == pytest.approx(
            record.period_ticks * record.tick_ms + record.outside_ms)
    assert (lw.method, base.method) == ("layerwise", "tp_pp")
    assert "tokens/s" in lw.summary()
    with pytest.raises(ConfigError, match="divides"):
        cost.project_decode_comparison(cfg, ROUND, tp=2, pp=2, microbatch_counts=[3])


def test_seed_decode_comparison_layouts():
    # The seed layouts: 16 one-block stages vs TP=8 x PP=2; memory bound, the ring's best M is
    # S (no bubble, fewest weight reads).
    for cfg in (models.configs.seed_dense(), models.configs.seed_moe()):
        lw, base = cost.project_decode_comparison(cfg, hardware.H100_SXM)
        assert (lw.layers_per_stage, lw.tp, lw.microbatches, lw.bubble) == ((1,) * 16, 1, 16, 0)
        assert (base.layers_per_stage, base.tp) == ((8, 8), 8)
        assert cfg.batch_size % base.microbatches == 0
        assert lw.kv_bytes_per_device == base.kv_bytes_per_device  # 1 layer x 32 heads = 8 x 4


# ---- hardware ------------------------------------------------------------------------------


def test_presets_carry_the_datasheet_figures():
    h100 = hardware.H100_SXM
    assert h100.l2_bytes == 50 * 2**20
    assert h100.persisting_l2_bytes == 37.5 * 2**20
    assert (h100.hbm_bytes, h100.hbm_bandwidth) == (80e9, 3.35e12)
    assert h100.link_bandwidth == 900e9 / 2
    assert h100.peak_flops("bfloat16") == h100.peak_flops("float16") == 989e12
    assert (h100.peak_flops("float32"), h100.peak_flops("int8")) == (67e12, 1979e12)
    h200 = hardware.H200
    assert (h200.hbm_bytes, h200.hbm_bandwidth) == (141e9, 4.8e12)
    assert h200.peak_bf16_flops == h100.peak_bf16_flops
    with pytest.raises(ConfigError, match="float64"):
        h100.peak_flops("float64")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("l2_bytes", 0),
        ("l2_bytes", 1.5),
        ("hbm_bytes", True),
        ("hbm_bandwidth", -1.0),
        ("l2_bandwidth", float("nan")),
        ("peak_bf16_flops", float("inf")),
        ("link_latency", -1e-6),
        ("persisting_l2_bytes", 128 * 2**20),  # more than the 64 MiB L2
        ("num_cores", 0),
        ("kind", "tpu"),
    ],
)
def test_hardware_spec_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(ROUND, **{field: value})


def test_zero_link_latency_is_allowed():
    assert dataclasses.replace(ROUND, link_latency=0.0).link_latency == 0.0


def test_by_name():
    assert hardware.by_name("h100") is hardware.H100_SXM
    assert hardware.by_name("H100_SXM") is hardware.H100_SXM
    assert hardware.by_name("h200") is hardware.H200
    assert hardware.by_name("cpu") is hardware.by_name("host") is hardware.host_cpu()
    with pytest.raises(UnknownPresetError, match="h100-sxm.*h200.*cpu") as info:
        hardware.by_name("a100")
    assert isinstance(info.value, KeyError)
    assert "'a100'" in str(info.value)


def test_host_cpu_reads_caches_and_measures_positive_figures():
    spec = hardware.host_cpu()
    assert spec.kind == "cpu" and spec.measured
    for name in ("l2_bytes", "hbm_bytes", "hbm_bandwidth", "l2_bandwidth", "peak_fp32_flops"):
        assert getattr(spec, name) > 0, name
    assert spec.link_bandwidth == spec.hbm_bandwidth  # simulated devices share RAM
    sysfs = "/sys/devices/system/cpu/cpu0/cache/index2/size"
    if os.path.exists(sysfs):
        with open(sysfs) as f:
            assert spec.l2_bytes == hardware._parse_size(f.read())
    assert hardware.host_cpu() is spec  # measured once per process


def test_host_cpu_refuses_to_guess(monkeypatch):
    for reader in ("_caches_from_sysfs", "_caches_from_sysconf", "_caches_from_lscpu"):
        monkeypatch.setattr(hardware, reader, dict)
    with pytest.raises(LwjaxError, match="L2 cache size"):
        hardware.host_cpu.__wrapped__()  # bypass the per-process cache


# ---- energy (projected tokens per joule) ---------------------------------------------------

POWERED = dataclasses.replace(ROUND, board_power_w=500.0, idle_power_w=50.0)


def test_pipeline_energy_by_hand():
    # 2 stages x tp 2, M = 3, stage times 1 s and 2 s, a step of 8 s, 60 tokens: the first
    # stage's devices compute 3 s and wait 5 s, the second's compute 6 s and wait 2 s
    e = cost.pipeline_energy([1.0, 2.0], 2, step_s=8.0, microbatches=3, tokens=60, hw=POWERED)
    joules = 2 * (3 * 500 + 5 * 50) + 2 * (6 * 500 + 2 * 50)
    assert e.joules == pytest.approx(joules) and e.tokens_per_j == pytest.approx(60 / joules)
    assert e.busy_share == pytest.approx((2 * 3 + 2 * 6) / (4 * 8))
    assert cost.pipeline_energy([1.0], 1, step_s=1.0, microbatches=1, tokens=1, hw=ROUND) is None


def test_projection_tokens_per_joule_equals_the_energy_of_its_stages():
    cfg = models.configs.seed_dense()
    p = cost.project_tp_pp(cfg, POWERED, 8, 2, 8)
    e = cost.pipeline_energy(p.stage_s, 8, step_s=p.step_s, microbatches=8,
                             tokens=p.tokens_per_step, hw=POWERED)
    assert p.tokens_per_j == pytest.approx(e.tokens_per_j)
    assert "tokens/J" in p.summary()
    assert cost.project_tp_pp(cfg, ROUND, 8, 2, 8).tokens_per_j is None  # no power figures
    # every device busy the whole step: the seed documents' flat formula
    one = cost.project_layerwise(dataclasses.replace(cfg, num_layers=1), POWERED, [1], 1)
    assert one.tokens_per_j == pytest.approx(cost.flat_tokens_per_j(one.tps, 1, 500.0))
    assert cost.flat_tokens_per_j(12_800, 16, 700.0) == pytest.approx(1.142857, rel=1e-6)


def test_decode_tokens_per_joule_counts_the_outside_work_on_every_device():
    cfg = models.configs.seed_dense()
    d = cost.project_decode(cfg, POWERED, [8, 8], 8, 8, schedule="gpipe")
    tpot = d.tpot_ms / 1e3
    busy = [min(tpot, 8 * t + d.outside_s) for t in d.stage_s]
    joules = 8 * sum(b * 500 + (tpot - b) * 50 for b in busy)
    assert d.tokens_per_j == pytest.approx(cfg.batch_size / joules)


@pytest.mark.parametrize(("board", "idle"), [(700.0, None), (-1.0, 0.0), (100.0, 200.0)])
def test_power_figures_are_checked(board, idle):
    with pytest.raises(ConfigError, match="power"):
        dataclasses.replace(ROUND, board_power_w=board, idle_power_w=idle)


def test_h100_power_figures():
    assert hardware.H100_SXM.board_power_w == 700.0  # datasheet max TDP
    assert 0 < hardware.H100_SXM.idle_power_w < hardware.H100_SXM.board_power_w
