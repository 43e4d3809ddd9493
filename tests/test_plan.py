"""The planner's edge-case strategies, the plan report, the CLI and replanning.

Oracles: per-device bytes of a split layer worked out by hand from tiny_dense's dimensions
(D=64, N=4 heads x H=16, F=128, V=256, float32) and passes/tp.py's rule; compression and
microbatch choices against feasibility recomputed from ``footprint`` / ``analyze`` at each
level; what an InfeasiblePlanError says would fit against planning with exactly that (it
fits) and one less (it does not); stage bottlenecks against brute force over partitions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import lwjax
from lwjax import cli, models
from lwjax.errors import CapacityError, ConfigError, DeviceError, InfeasiblePlanError
from lwjax.models import configs
from lwjax.models.transformer import Block, DenseTransformer
from lwjax.passes import compression as compression_lib
from lwjax.passes import padding
from lwjax.passes.footprint import Footprint, footprint
from lwjax.passes.planner import layer_times, numbers_from, partition_inputs
from lwjax.passes.segment import segment
from lwjax.passes.split import split_bytes, split_footprint, split_numbers
from lwjax.passes.strategies import Target
from lwjax.passes.trace import trace
from lwjax.plan import Plan

CFG = configs.tiny_dense()
D, N, H, F, V = CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.mlp_hidden_size, CFG.vocab_size
F32 = 4
# passes/tp.py splits q/k/v [D, N, H] on N, out [N, H, D] on N, gate/up [D, F] on F, down
# [F, D] on F; the two norm scales [D] stay whole.
LAYER_SPLIT = (4 * D * N * H + 3 * D * F) * F32  # 163,840
LAYER_REPLICATED = 2 * D * F32  # 512
EMBED = HEAD = V * D * F32  # 65,536 each, split over the vocabulary
FINAL_NORM = D * F32
TOKENS = jax.ShapeDtypeStruct((CFG.batch_size, CFG.seq_len), jnp.int32)
H100 = "h100"  # fused attention, like the GPU the plans are for


@pytest.fixture(scope="module")
def tiny():
    return models.abstract(CFG)


def _graph(model, microbatch_size):
    return segment(trace(model, TOKENS, microbatch_size=microbatch_size))


def _layer_peak(model, microbatch_size):
    report = lwjax.analyze(model, TOKENS, microbatch_size=microbatch_size, attention="fused")
    return report.layers[0].footprint.activation_bytes


# ---- split ----------------------------------------------------------------------------------

def test_split_footprint_by_hand():
    f = Footprint(weights_bytes=1000, activation_bytes=400, buffer_bytes=40, kv_cache_bytes=81)
    g = split_footprint(f, split_weights_bytes=960, largest_input_bytes=150, tp=4)
    assert (g.weights_bytes, g.activation_bytes, g.buffer_bytes, g.kv_cache_bytes) == \
        (960 // 4 + 40, 150, 10, 21)  # the input floor beats 400 / 4; ceil(81 / 4) = 21
    g = split_footprint(f, split_weights_bytes=960, largest_input_bytes=50, tp=2)
    assert (g.weights_bytes, g.activation_bytes) == (520, 200)
    assert split_footprint(f, split_weights_bytes=960, largest_input_bytes=50, tp=1) is f
    with pytest.raises(ConfigError, match="split_weights_bytes"):
        split_footprint(f, split_weights_bytes=1001, largest_input_bytes=0, tp=2)


def test_split_bytes_follow_tp_rule(tiny):
    graph = _graph(tiny, 1)
    none = compression_lib.get(None)
    assert split_bytes(graph, graph.layers[0], none, 2) == LAYER_SPLIT
    assert split_bytes(graph, graph.prologue, none, 4) == EMBED
    assert split_bytes(graph, graph.epilogue, none, 4) == HEAD
    # tp=16 > N: v/out split on head_dim (16); q/k stay whole, since rotary embedding slices
    # their head_dim (split there, the stage would hang: tests/test_split_safety.py). The
    # activations hit the floor: the layer's whole [1, T, D] input.
    fp = footprint(graph, None, attention="fused")
    nums = split_numbers(graph, fp, layer_times(graph, lwjax.hardware.H100_SXM,
                                                weights_on_chip=True, tp=16), 16)
    qk = 2 * D * N * H * F32
    assert nums.footprints[0].weights_bytes == (LAYER_SPLIT - qk) // 16 + LAYER_REPLICATED + qk
    assert nums.footprints[0].activation_bytes == 1 * CFG.seq_len * D * F32


# every device stores the embedding's and the head's slots beside its layer (the padding)
@pytest.mark.parametrize(("num_devices", "capacity", "tp"), [(8, 170_000, 2), (16, 100_000, 4)])
def test_split_per_device_bytes(tiny, num_devices, capacity, tp):
    p = lwjax.plan(tiny, TOKENS, num_devices=num_devices, hardware=H100, cache_bytes=capacity,
                   microbatches=4, allow=("split",))
    with pytest.raises(InfeasiblePlanError):  # one device per stage does not fit
        lwjax.plan(tiny, TOKENS, num_devices=num_devices, hardware=H100, cache_bytes=capacity,
                   microbatches=4, allow=())
    assert (p.strategy, p.tp, len(p.stages)) == ("split", tp, 4)
    assert [s.devices for s in p.stages] == [tuple(range(k * tp, (k + 1) * tp)) for k in range(4)]
    layer = LAYER_SPLIT // tp + LAYER_REPLICATED
    weights = [EMBED // tp + layer, layer, layer, layer + HEAD // tp + FINAL_NORM]
    assert [s.footprint.weights_bytes for s in p.stages] == weights
    # Activations: each segment's peak (from the analysis) / tp, but never below its input
    # (the int32 tokens for the embedding, the [1, T, D] residual for the rest).
    report = lwjax.analyze(tiny, TOKENS, microbatch_size=1, attention="fused")

    def act(f, floor):
        return max(-(-f.footprint.activation_bytes // tp), floor)

    residual = CFG.seq_len * D * F32
    layers = [act(f, residual) for f in report.layers]
    assert [s.footprint.activation_bytes for s in p.stages] == [
        max(act(report.prologue, CFG.seq_len * 4), layers[0]), layers[1], layers[2],
        max(layers[3], act(report.epilogue, residual))]
    assert all(p.resident_bytes(s) <= capacity for s in p.stages)
    # slots of (shape, dtype, split axis): the embedding's and the head's on every device,
    # the final norm [D] in a slot the layers' norms share (the last stage has one more)
    assert p.padding_bytes == (HEAD // tp + FINAL_NORM, EMBED // tp + HEAD // tp + FINAL_NORM,
                               EMBED // tp + HEAD // tp + FINAL_NORM, EMBED // tp)
    assert all(p.device_bytes(s) <= capacity for s in p.stages)
    assert any(f"m x n = {tp} x 1" in n for n in p.notes)
    assert "does not fit" in p.notes[0]


def test_split_decode_divides_kv_cache(tiny):
    new_tokens = jax.ShapeDtypeStruct((CFG.batch_size, 1), jnp.int32)
    p = lwjax.plan(tiny, new_tokens, mode="decode", num_devices=8, hardware=H100,
                   cache_bytes=135_000, microbatches=1, allow=("split",))
    # K and V [B, S, N, H] float32 per layer, plus the int32 cache length it reads.
    kv = 2 * CFG.batch_size * CFG.seq_len * N * H * F32 + 4
    assert p.tp == 4 and p.mode == "decode"
    assert all(f.kv_cache_bytes == -(-kv // 4) for f in p.numbers.footprints)
    assert any("m x n = 4 x 1" in n for n in p.notes)


# ---- compression and microbatch -------------------------------------------------------------

def _one_layer_per_stage_need(fp, graph):
    """Capacity a 4-stage plan of 4 layers needs under the planner's rule: the weights every
    device stores -- the slots' sum, the heaviest stage's weights plus the slots other
    stages' kinds of weights add (``passes/padding.py``; the embedding's, here) -- plus the
    largest activation peak."""
    w = [f.weights_bytes for f in fp.layers]
    w[0] += fp.prologue.weights_bytes
    w[-1] += fp.epilogue.weights_bytes
    numbers = numbers_from(graph, fp, [0.0] * len(fp.layers))
    stored = padding.stored_bytes(numbers, [(i, i + 1) for i in range(len(fp.layers))])
    assert stored >= max(w)
    peak = max(f.activation_bytes + f.buffer_bytes
               for f in (fp.prologue, *fp.layers, fp.epilogue))
    return stored + peak


def test_compression_escalation_picks_first_that_fits(tiny):
    graph = _graph(tiny, 1)
    needs = {c: _one_layer_per_stage_need(footprint(graph, c, attention="fused"), graph)
             for c in compression_lib.ESCALATION}
    capacity = needs["int8-2:4"]
    expected = next(c for c in compression_lib.ESCALATION if needs[c] <= capacity)
    assert expected == "int8-2:4" and needs["int8"] > capacity
    p = lwjax.plan(tiny, TOKENS, num_devices=4, hardware=H100, cache_bytes=capacity,
                   microbatches=4, allow=("compress",))
    assert (p.strategy, p.compression, p.tp) == ("compress", expected, 1)
    fp = footprint(graph, expected, attention="fused")
    assert [s.footprint.weights_bytes for s in p.stages] == [
        fp.prologue.weights_bytes + fp.layers[0].weights_bytes, fp.layers[1].weights_bytes,
        fp.layers[2].weights_bytes, fp.layers[3].weights_bytes + fp.epilogue.weights_bytes]


def test_microbatch_shrink_picks_largest_that_fits(tiny):
    needs = {mb: _one_layer_per_stage_need(footprint(_graph(tiny, mb), None, attention="fused"),
                                           _graph(tiny, mb))
             for mb in (4, 2, 1)}
    capacity = needs[2]
    assert needs[4] > capacity >= needs[1]
    p = lwjax.plan(tiny, TOKENS, num_devices=4, hardware=H100, cache_bytes=capacity,
                   microbatches=1, allow=("microbatch",))
    assert (p.strategy, p.microbatch_size, p.microbatches) == ("microbatch", 2, 2)
    assert p.stages[1].footprint.activation_bytes == _layer_peak(tiny, 2)
    assert any("microbatch: 4 -> 2" in n for n in p.notes)


def test_combination_when_no_single_strategy_fits(tiny):
    kw = dict(num_devices=8, hardware=H100, cache_bytes=100_000, microbatches=4)
    for single in (("split",), ("compress",)):
        with pytest.raises(InfeasiblePlanError):
            lwjax.plan(tiny, TOKENS, allow=single, **kw)
    p = lwjax.plan(tiny, TOKENS, allow=("split", "compress"), **kw)
    assert (p.strategy, p.tp, p.compression) == ("split+compress", 2, "int8")
    # The order is the policy's: compress-first prefers more compression over a split.
    q = lwjax.plan(tiny, TOKENS, allow=("compress", "split"), **kw)
    assert q.strategy == "compress+split"


# ---- infeasible -----------------------------------------------------------------------------

def test_infeasible_says_what_would_fit(tiny):
    kw = dict(hardware=H100, microbatches=4, allow=("split", "compress"))
    with pytest.raises(InfeasiblePlanError) as info:
        lwjax.plan(tiny, TOKENS, num_devices=8, cache_bytes=20_000, **kw)
    e = info.value
    assert e.min_devices is not None and e.min_devices > 8 and e.min_capacity > 20_000
    assert f"at least {e.min_devices} devices" in str(e)
    assert f"{e.min_capacity:,} bytes" in str(e)
    lwjax.plan(tiny, TOKENS, num_devices=e.min_devices, cache_bytes=20_000, **kw)
    lwjax.plan(tiny, TOKENS, num_devices=8, cache_bytes=e.min_capacity, **kw)
    with pytest.raises(InfeasiblePlanError):
        lwjax.plan(tiny, TOKENS, num_devices=e.min_devices - 1, cache_bytes=20_000, **kw)
    with pytest.raises(InfeasiblePlanError):
        lwjax.plan(tiny, TOKENS, num_devices=8, cache_bytes=e.min_capacity - 1, **kw)


def test_infeasible_names_compression_and_device_floor(tiny):
    kw = dict(num_devices=8, hardware=H100, microbatches=4)
    with pytest.raises(InfeasiblePlanError) as info:
        lwjax.plan(tiny, TOKENS, cache_bytes=100_000, allow=("split",), **kw)
    assert info.value.min_compression == "int8" and "compression int8" in str(info.value)
    # Below the whole [1, T, D] input no split helps: no number of devices fits.
    with pytest.raises(InfeasiblePlanError, match="no number of devices") as info:
        lwjax.plan(tiny, TOKENS, cache_bytes=CFG.seq_len * D * F32 - 1, **kw)
    assert info.value.min_devices is None


def test_target_rejects_unknown_strategy():
    with pytest.raises(ConfigError, match="allow"):
        Target(lwjax.hardware.H100_SXM, 2**20, (0,), 4, 4, compression_lib.get(None),
               allow=("split", "prune"))


# ---- variable layer sizes -------------------------------------------------------------------

def _best_bottleneck(numbers, capacity, residency, max_stages):
    sizes, room, _ = partition_inputs(numbers, capacity, residency)
    n, best = len(sizes), None
    for cuts in itertools.product((False, True), repeat=n - 1):
        bounds = [0, *(i + 1 for i, c in enumerate(cuts) if c), n]
        ranges = list(itertools.pairwise(bounds))
        if len(ranges) <= max_stages and all(sum(sizes[a:b]) <= room for a, b in ranges):
            worst = max(sum(numbers.costs_s[a:b]) for a, b in ranges)
            best = worst if best is None else min(best, worst)
    return best


def _mixed():
    m = DenseTransformer(dataclasses.replace(CFG, num_layers=6), rngs=nnx.Rngs(0))
    for i in (2, 3):
        m.layers[i] = Block(configs.tiny_moe(), rngs=nnx.Rngs(i))
    return m


@pytest.mark.parametrize(("kind", "num_devices", "capacity", "tp"), [
    ("dense+moe", 4, 900_000, 1),
    ("dense+moe", 8, 450_000, 2),  # an MoE layer (460,288 bytes of weights) alone overflows
    ("heavy ends", 4, 1_200_000, 1),  # a big vocabulary: embedding and head outweigh a layer
])
def test_variable_layer_sizes(kind, num_devices, capacity, tp):
    if kind == "dense+moe":
        model = nnx.eval_shape(_mixed)
    else:
        model = models.abstract(dataclasses.replace(CFG, vocab_size=2048))
    p = lwjax.plan(model, TOKENS, num_devices=num_devices, hardware=H100, cache_bytes=capacity,
                   microbatches=4, allow=("split",))
    assert p.tp == tp
    assert all(p.resident_bytes(s) <= capacity for s in p.stages)
    assert max(s.est_time_s for s in p.stages) == pytest.approx(
        _best_bottleneck(p.numbers, capacity, "all", num_devices // tp))
    layers = [b - a for a, b in (s.layer_range for s in p.stages)]
    if kind == "heavy ends":
        # the embedding and head live on the end stages and count in their bytes; the head's
        # time runs after the ticks (epilogue_s), so it does not shorten the last stage
        embed = head = 2048 * D * F32
        layer = p.numbers.footprints[1].weights_bytes
        assert p.stages[0].footprint.weights_bytes == embed + layers[0] * layer
        assert p.stages[-1].footprint.weights_bytes == layers[-1] * layer + head + FINAL_NORM
        assert p.numbers.epilogue_s > 0 and layers[0] < max(layers)
        return
    weights = [f.weights_bytes for f in p.numbers.footprints]
    # MoE: attention and experts [E, D, F] / [E, F, D] (split on E); the router [D, E] whole
    # (top_k runs along E: passes/axes.py).
    moe = (4 * D * N * H + 3 * 4 * D * F) * F32
    router = D * 4 * F32
    assert weights[2] == weights[3] == moe // tp + router + LAYER_REPLICATED
    assert weights[1] == LAYER_SPLIT // tp + LAYER_REPLICATED
    assert all(len(s.layers) <= 2 for s in p.stages if {"layers_2", "layers_3"} & set(s.layers))


# ---- report ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split_plan(tiny):
    # tp 2 x 4 stages: a layer's half (82,432 bytes) and the embedding's and head's halves
    # (65,536: slots on every device) fit; one device per stage does not
    return lwjax.plan(tiny, TOKENS, num_devices=8, hardware=H100, cache_bytes=170_000,
                      microbatches=4)


def test_json_round_trip(tiny, split_plan):
    plain = lwjax.plan(tiny, TOKENS, num_devices=4, hardware=H100)
    for p in (plain, split_plan):
        text = p.to_json()
        assert Plan.from_json(text) == p
        assert json.loads(text)["tp"] == p.tp
    assert split_plan.tp == 2 and Plan.from_json(split_plan.to_json()).stages[0].tp == 2


def test_summary_and_figure(split_plan, tmp_path):
    text = split_plan.summary()
    assert "tp=2" in text and "<- bottleneck" in text and "strategy: split" in text
    path = split_plan.figure(tmp_path / "plan.png")
    data = (tmp_path / "plan.png").read_bytes()
    assert path.endswith("plan.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


# ---- CLI ------------------------------------------------------------------------------------

def test_cli_prints_plan_and_json(capsys, tmp_path):
    assert cli.main(["plan", "--model", "tiny-dense", "--devices", "4", "--microbatches",
                     "4"]) == 0
    out = capsys.readouterr().out
    # the layout search: a tiny model's layers take less than a transfer's 5 us latency, so
    # one stage (4 ticks, no transfer) is projected faster than 4 (7 ticks of a transfer)
    assert out.startswith("Plan: 1 stage on 1 of 4 devices (H100 SXM5) for tiny-dense")
    assert "strategy: fits" in out
    figure = tmp_path / "cli.png"
    argv = ["plan", "--model", "tiny_moe", "--hardware", "h100", "--devices", "2", "--json",
            "--compression", "int8", "--figure", str(figure)]
    assert cli.main(argv) == 0
    p = Plan.from_json(capsys.readouterr().out)
    assert (p.compression, p.model, p.num_devices) == ("int8", "tiny_moe", 1)  # as above
    assert figure.stat().st_size > 0


@pytest.mark.parametrize("argv", [
    ["plan", "--model", "gpt-5"],
    ["plan", "--model", "tiny-dense", "--hardware", "tpu9"],
    ["plan", "--model", "tiny-dense", "--compression", "int3"],
    ["plan", "--model", "tiny-dense", "--mode", "train"],
    ["plan", "--model", "tiny-dense", "--devices", "many"],
    ["plan", "--model", "tiny-dense", "--allow", "split,prune"],
    ["plan", "--model", "tiny-dense", "--cache-mib", "inf"],
    ["plan", "--model", "tiny-dense", "--figure", "/nonexistent-folder/plan.png"],
    ["launch"],
])
def test_cli_bad_arguments_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lwjax") and "error" in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


def test_cli_infeasible_exits_1(capsys):
    assert cli.main(["plan", "--model", "tiny-dense", "--devices", "2", "--cache-mib",
                     "0.001"]) == 1
    assert "what would fit" in capsys.readouterr().err.lower()


# ---- replanning -----------------------------------------------------------------------------

def test_replan_avoids_excluded_devices(tiny, split_plan):
    plain = lwjax.plan(tiny, TOKENS, num_devices=8, hardware=H100, cache_bytes=2**20)
    new = plain.replan(exclude_devices=[0, 5])
    assert not {0, 5} & {d for s in new.stages for d in s.devices}
    assert len(new.stages) == len(plain.stages) and new.device_pool == (1, 2, 3, 4, 6, 7)
    # A split plan keeps tp: its pool minus device 3 plus spare 8 is 4 stages of 2 again.
    new = split_plan.replan(exclude_devices=[3], spare_devices=[8])
    assert new.tp == 2 and [s.devices for s in new.stages] == [(0, 1), (2, 4), (5, 6), (7, 8)]
    assert Plan.from_json(new.to_json()) == new


def test_impossible_replan_is_clear(split_plan):
    with pytest.raises(InfeasiblePlanError, match=r"Without devices \[3\]") as info:
        split_plan.replan(exclude_devices=[3])
    assert info.value.min_devices == 8 and "needs at least 8 devices" in str(info.value)
    with pytest.raises(InfeasiblePlanError, match="Without devices"):
        split_plan.replan(exclude_devices=range(8))
    with pytest.raises(lwjax.errors.DeviceError, match="not in the plan's pool"):
        split_plan.replan(exclude_devices=[99])


def test_step_time_by_hand():
    from lwjax.passes.planner import step_time

    ranges16 = [(i, i + 1) for i in range(16)]
    ranges8 = [(2 * i, 2 * i + 2) for i in range(8)]
    costs = [1.0] * 16
    # GPipe: (M + S - 1) ticks of the slowest stage
    assert step_time(ranges16, costs, microbatches=8) == (8 + 15) * 1.0
    assert step_time(ranges8, costs, microbatches=8) == (8 + 7) * 2.0
    # stages sharing one host's cores: never less than the work, 8 microbatches x 16 layers
    assert step_time(ranges16, costs, microbatches=8, concurrency=2) == 8 * 16.0
    assert step_time([(0, 8), (8, 16)], costs, microbatches=8, concurrency=2) == 8 * 16.0
    assert step_time([(0, 16)], costs, microbatches=8, concurrency=2) == 8 * 16.0
    # the epilogue runs after the ticks, once per microbatch, on the last stage
    assert step_time(ranges8, costs, microbatches=8, epilogue_s=0.5) == (8 + 7) * 2.0 + 8 * 0.5
    assert step_time(ranges16, costs, microbatches=8, concurrency=2,
                     epilogue_s=0.5) == 8 * 16.0 + 8 * 0.5


def test_epilogue_time_is_kept_out_of_the_last_layer(tiny):
    """The last layer's cost is a layer's cost; the head's time is the plan's epilogue_s."""
    from lwjax.passes.planner import epilogue_time, segment_cost

    graph = _graph(tiny, CFG.batch_size // 4)
    hw = lwjax.hardware.H100_SXM
    times = layer_times(graph, hw, weights_on_chip=True)
    assert times[-1] == pytest.approx(times[1])  # identical layers, nothing folded into the last
    head = epilogue_time(graph, hw, weights_on_chip=True)
    # the head is [1, T, D] x [D, V]: at least its matmul FLOPs at the hardware's peak
    mb_tokens = CFG.batch_size // 4 * CFG.seq_len
    assert segment_cost(graph, graph.epilogue).flops >= 2 * mb_tokens * D * CFG.vocab_size
    assert head > 0
    p = lwjax.plan(tiny, TOKENS, num_devices=4, hardware=H100, cache_bytes=2**30,
                   microbatches=4, objective="bottleneck")
    assert p.numbers.epilogue_s == pytest.approx(head)
    assert p.step_time_s == pytest.approx((4 + len(p.stages) - 1) * p.bottleneck.est_time_s
                                          + 4 * head)
    assert f"epilogue 4 x {head * 1e3:.3f} ms" in p.summary()
    assert Plan.from_json(p.to_json()).numbers.epilogue_s == p.numbers.epilogue_s


def test_replan_keeps_the_partition_method(tiny):
    p = lwjax.plan(tiny, TOKENS, num_devices=8, hardware=H100, method="greedy")
    assert p.method == "greedy"
    assert p.replan().stages == p.stages  # nothing excluded: the same plan
    assert Plan.from_json(p.to_json()).method == "greedy"


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(exclude_devices=[0], spare_devices=["x"]), "'x', which is not a device"),
    (dict(exclude_devices=[0], spare_devices=[True]), "True, which is not a device"),
    (dict(exclude_devices=[0], spare_devices=[-1]), "-1, which is not a device"),
    (dict(exclude_devices=[0], spare_devices=[0]), "both excluded and spare"),
    (dict(exclude_devices=[0], spare_devices=[1]), "already in the plan's pool"),
    (dict(exclude_devices=[99]), "not in the plan's pool"),
    (dict(exclude_devices=object()), "must be a list of device ids"),
])
def test_replan_rejects_bad_device_ids(split_plan, kwargs, match):
    with pytest.raises(DeviceError, match=match):
        split_plan.replan(**kwargs)


def test_replan_takes_jax_devices_and_single_ids(tiny):
    p = lwjax.plan(tiny, TOKENS, devices=jax.devices()[:4], hardware=H100, microbatches=4)
    q = p.replan(exclude_devices=jax.devices()[0], spare_devices=[jax.devices()[4], 4])
    assert [s.devices for s in q.stages] == [(1,), (2,), (3,), (4,)]
    assert q.notes[-1] == "replanned without devices [0], with spares [4]"
    assert all(n.startswith("before replanning: ") for n in q.notes[:-1])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(cache_bytes=float("inf")), CapacityError, "positive whole number of bytes, got inf"),
    (dict(cache_bytes=0.5), CapacityError, "positive whole number of bytes, got 0.5"),
    (dict(objective="fastest"), ConfigError, "objective must be one of"),
    (dict(attention="flash"), ConfigError, "attention must be one of"),
    (dict(devices=["gpu0"]), DeviceError, "neither a jax device nor an integer id"),
    (dict(devices=[0, 0]), DeviceError, "Duplicate devices"),
])
def test_plan_rejects_bad_options(tiny, kwargs, error, match):
    kwargs = {"num_devices": 4, **kwargs} if "devices" not in kwargs else kwargs
    with pytest.raises(error, match=match):
        lwjax.plan(tiny, TOKENS, hardware=H100, **kwargs)


def test_plan_takes_numpy_integers(tiny):
    import numpy as np

    p = lwjax.plan(tiny, TOKENS, num_devices=np.int64(4), cache_bytes=np.int64(2**20),
                   microbatches=np.int32(4), hardware=H100, objective="bottleneck")
    assert (p.num_devices, p.capacity_bytes, p.microbatches) == (4, 2**20, 4)
