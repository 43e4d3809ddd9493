"""What every device stores of the weights (``passes/padding.py``), predicted by the plan and
measured from the placed shards; and the planner counting it against the capacity.

Oracles: the bytes of the placed slot arrays on each device (``ShardedModel.weight_bytes``);
hand-built numbers whose padding is worked out by hand; and, on small random instances, an
enumeration of every partition checked with the padding counted.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import jax
import jax.numpy as jnp
import pytest
import transformers
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import InfeasiblePlanError
from lwjax.hardware import H100_SXM
from lwjax.models import configs
from lwjax.passes import padding
from lwjax.passes.footprint import Footprint, footprint
from lwjax.passes.lower import lower
from lwjax.passes.padding import StoredArray
from lwjax.passes.partition import bottleneck, min_capacity, partition_layers
from lwjax.passes.planner import layer_times, partition_inputs, plan_from_numbers
from lwjax.passes.segment import segment
from lwjax.passes.split import split_numbers
from lwjax.passes.strategies import requirement
from lwjax.passes.trace import trace
from lwjax.plan import LayerNumbers

BIG = 2**30


def _measured_padding(sm) -> tuple[int, ...]:
    stored = sm.weight_bytes()
    return tuple(stored[s.devices[0]]["allocated"] - stored[s.devices[0]]["own"]
                 for s in sm.plan.stages)


@pytest.mark.parametrize("kind,num_devices,compression", [
    ("dense", 5, "none"), ("moe", 3, "none"), ("dense", 5, "int8")])
def test_plan_predicts_the_padding_the_placed_shards_have(kind, num_devices, compression):
    cfg = dataclasses.replace(configs.tiny_dense() if kind == "dense" else configs.tiny_moe(),
                              num_layers=8)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((4, cfg.seq_len), jnp.int32)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:num_devices],
                               cache_bytes=BIG, microbatches=2, objective="bottleneck",
                               compression=compression)
    assert len(sm.plan.stages) == num_devices  # uneven: 8 layers over 5 or 3 stages
    assert sm.plan.padding_bytes == _measured_padding(sm)
    assert any(sm.plan.padding_bytes)
    stored = padding.stored_bytes(sm.plan.numbers, [s.layer_range for s in sm.plan.stages])
    assert {b["allocated"] for b in sm.weight_bytes().values()} == {stored}


def test_plan_predicts_the_padding_of_a_transformers_model():
    config = transformers.GPT2Config(n_layer=5, n_embd=32, n_head=4, vocab_size=128,
                                     n_positions=16)
    model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
    tokens = jnp.zeros((2, 8), jnp.int32)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:3], cache_bytes=BIG,
                               objective="bottleneck")
    assert sm.plan.padding_bytes == _measured_padding(sm)
    assert any(sm.plan.padding_bytes)



@pytest.mark.parametrize("kind", ["dense", "moe", "gpt2"])
def test_split_stages_predict_the_padding_the_placed_shards_have(kind):
    """Stages split over tp store their weights grouped by (shape, dtype, split axis)
    (``SplitStorage``): uneven stages pad like slots do, and the prediction from the split
    numbers equals each device's placed shards (lwjax's models and transformers' GPT-2,
    whose fused qkv kernel stays whole and whose MLP splits)."""
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=8, n_embd=32, n_head=4, vocab_size=128,
                                         n_positions=16)
        model = transformers.FlaxGPT2LMHeadModel(config, seed=0)
        tokens = jnp.zeros((4, 8), jnp.int32)
    else:
        cfg = dataclasses.replace(
            configs.tiny_dense() if kind == "dense" else configs.tiny_moe(), num_layers=8)
        model = models.build(cfg, rngs=nnx.Rngs(0))
        tokens = jnp.zeros((4, cfg.seq_len), jnp.int32)
    graph = segment(trace(model, tokens, microbatch_size=2))
    fp = footprint(graph)
    numbers = split_numbers(graph, fp, layer_times(graph, H100_SXM, weights_on_chip=True),
                            tp=2)
    ranges = [(0, 3), (3, 6), (6, 8)]
    prog = lower(graph, ranges, jax.devices()[:6], 2, tp=2)
    params = prog.place_params(graph.traced.params)
    devices = list(prog.mesh.devices.ravel())
    allocated = [sum(sh.data.nbytes for a in params for sh in a.addressable_shards
                     if sh.device == d) for d in devices]
    assert set(allocated) == {padding.stored_bytes(numbers, ranges)}  # every device alike
    measured = tuple(allocated[2 * s] - prog.storage.own_bytes(s) for s in range(3))
    assert padding.padding(numbers, ranges) == measured
    assert measured[2] > 0  # 2 layers + the head: a layer's slots empty
    # the plan counts it: bytes a device of the 2-layer stage holds beyond its own
    plan = plan_from_numbers(numbers, capacity_bytes=BIG, device_ids=range(6), hardware="test",
                             compression="none", microbatches=2, microbatch_size=2,
                             mode="prefill", tp=2, ranges=ranges)
    assert plan.padding_bytes == measured

# ---- hand-built numbers ---------------------------------------------------------------------

def _numbers() -> LayerNumbers:
    """An embedding of 1,200 bytes (a kind no layer has) and 4 layers of 400 bytes."""
    empty = Footprint(weights_bytes=0, activation_bytes=0, buffer_bytes=0)
    layer = Footprint(weights_bytes=400, activation_bytes=0, buffer_bytes=0)
    embed = Footprint(weights_bytes=1200, activation_bytes=0, buffer_bytes=0)
    stored = ((StoredArray(0, "float32", 300),),
              *((StoredArray(1 + i, "float32", 100),) for i in range(4)), ())
    return LayerNumbers(names=tuple(f"layers_{i}" for i in range(4)), footprints=(layer,) * 4,
                        prologue=embed, epilogue=empty, costs_s=(1.0,) * 4, stored=stored)


def _plan(devices: int):
    return plan_from_numbers(_numbers(), capacity_bytes=1600, device_ids=range(devices),
                             hardware="test", compression="none", microbatches=1,
                             microbatch_size=1, mode="prefill", objective="bottleneck")


def test_padding_by_hand():
    numbers = _numbers()
    # the embedding's slot plus the largest stage's layer slots, on every device
    assert padding.stored_bytes(numbers, [(0, 1), (1, 4)]) == 1200 + 3 * 400
    assert padding.padding(numbers, [(0, 1), (1, 4)]) == (800, 1200)
    assert padding.padding(numbers, [(0, 2), (2, 4)]) == (0, 1200)


@pytest.mark.parametrize("devices", [2, 3])
def test_a_plan_that_fits_only_without_padding_is_refused(devices):
    # embedding + layer 0 fill 1,600 bytes; any stage of two layers makes every device store
    # 1,200 + 800 = 2,000
    with pytest.raises(InfeasiblePlanError, match="padding"):
        _plan(devices)


def test_the_planner_takes_a_partition_that_fits_with_its_padding():
    plan = _plan(4)
    assert [s.layer_range for s in plan.stages] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan.padding_bytes == (0, 1200, 1200, 1200)
    assert max(plan.device_bytes(s) for s in plan.stages) == 1600
    assert "stages 1-3 +1,200 B" in plan.summary()


def test_a_given_partition_is_checked_with_its_padding():
    with pytest.raises(InfeasiblePlanError, match="1,200 B of it padding|padding"):
        plan_from_numbers(_numbers(), capacity_bytes=1600, device_ids=range(2),
                          hardware="test", compression="none", microbatches=1,
                          microbatch_size=1, mode="prefill", ranges=[(0, 1), (1, 4)])


# ---- against enumeration --------------------------------------------------------------------

class _Numbers:
    """The fields ``passes/padding.py`` reads."""

    def __init__(self, stored, n):
        self.stored, self.names, self.training = tuple(stored), tuple(map(str, range(n))), None
        self.cached = ()


def _random_case(rng: random.Random):
    n = rng.randint(1, 6)
    kinds = [[rng.choice([4, 8, 16]) for _ in range(rng.randint(1, 3))]
             for _ in range(rng.randint(1, 3))]
    stored, p = [(StoredArray(0, "float32", rng.choice([8, 16, 32])),)], 1
    for _ in range(n):
        seg = tuple(StoredArray(p + j, "float32", size)
                    for j, size in enumerate(rng.choice(kinds)))
        stored.append(seg)
        p += len(seg)
    stored.append((StoredArray(p, "float32", rng.choice([8, 16, 32])),))
    sizes = [4 * sum(a.size for a in stored[1 + i]) for i in range(n)]
    sizes[0] += 4 * stored[0][0].size
    sizes[-1] += 4 * stored[-1][0].size
    costs = [rng.choice([0.5, 1.0, 2.0, 3.0]) for _ in range(n)]
    room = rng.randint(max(sizes), 3 * sum(sizes) // 2 + 1)
    return _Numbers(stored, n), sizes, costs, room, rng.randint(1, n)


def test_fit_against_every_partition_on_random_cases():
    """The padded search never returns a partition that overflows; where the padding-blind
    optimum already fits, it returns that optimum. (Re-fitting with less room is a search,
    not an exact method: on these cases it misses a feasible partition about 1.4% of the
    time, then raising InfeasiblePlanError -- the note of issue #15 gives the rates.)"""
    rng = random.Random(0)
    for _ in range(400):
        numbers, sizes, costs, room, most = _random_case(rng)
        n = len(sizes)
        feasible = [r for k in range(1, most + 1)
                    for cuts in itertools.combinations(range(1, n), k - 1)
                    for r in [tuple(zip((0, *cuts), (*cuts, n), strict=True))]
                    if padding.overflow(numbers, r, sizes, room) <= 0]
        try:
            blind = partition_layers(sizes, costs, room, most)
        except InfeasiblePlanError:
            blind = None  # no partition fits even without padding
        try:
            got = padding.fit(lambda r: partition_layers(sizes, costs, r, most),  # noqa: B023
                              numbers, sizes, room)
        except InfeasiblePlanError:
            assert blind not in feasible
            continue
        assert blind is not None and got in feasible
        if blind in feasible:
            assert got == blind
            assert bottleneck(got, costs) == min(bottleneck(r, costs) for r in feasible)


def test_a_training_plan_pads_gradients_and_optimizer_state_as_the_weights():
    """Training keeps gradients and the optimizer's moments in the weights' slots, so they
    pad alike: adamw's two float32 moments twice the weights' padding (measured from the
    placed optimizer state), the plan counting weights + gradients + moments."""
    import optax

    cfg = dataclasses.replace(configs.tiny_dense(), num_layers=8)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((4, cfg.seq_len), jnp.int32)
    devices = jax.devices()[:3]
    sm = lwjax.layerwise_shard(model, tokens, devices=devices, cache_bytes=BIG,
                               microbatches=2, objective="bottleneck")
    train = lwjax.plan(model, tokens, devices=devices, cache_bytes=BIG, microbatches=2,
                       objective="bottleneck", mode="train", optimizer=optax.adamw(1e-3))
    assert [s.layer_range for s in train.stages] == [s.layer_range for s in sm.plan.stages]
    weights_pad = _measured_padding(sm)
    assert any(weights_pad)
    assert train.padding_bytes == tuple(4 * p for p in weights_pad)

    def loss_fn(logits, targets):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    state = sm.train_step(loss_fn, optax.adamw(1e-3)).init()
    stored = sm.weight_bytes()
    for s, pad in zip(sm.plan.stages, weights_pad, strict=True):
        d = s.devices[0]
        moments = sum(sh.data.nbytes for a in jax.tree.leaves(state.opt_state) if a.ndim == 2
                      for sh in a.addressable_shards if sh.device.id == d)
        assert moments - 2 * stored[d]["own"] == 2 * pad


def _kinds(sizes) -> LayerNumbers:
    """One float32 array per layer, of the given element counts (each count its own slot)."""
    empty = Footprint(weights_bytes=0, activation_bytes=0, buffer_bytes=0)
    return LayerNumbers(
        names=tuple(f"layers_{i}" for i in range(len(sizes))),
        footprints=tuple(Footprint(weights_bytes=4 * n, activation_bytes=0, buffer_bytes=0)
                         for n in sizes),
        prologue=empty, epilogue=empty, costs_s=(1.0,) * len(sizes),
        stored=((), *((StoredArray(i, "float32", n),) for i, n in enumerate(sizes)), ()))


@pytest.mark.parametrize("sizes,devices,capacity", [
    ([1000] * 4 + [1001] * 4, 2, 32_000),      # the search ran out of rounds: a TypeError
    ([1000] * 2 + [1001] * 2 + [1002] * 2, 3, 8_100),   # its room fell below 0: ConfigError
])
def test_a_search_that_finds_no_padded_fit_says_so(sizes, devices, capacity):
    """Where re-fitting finds nothing, the error is an InfeasiblePlanError naming the padding
    and the user's capacity -- the search is not exhaustive, and says so."""
    with pytest.raises(InfeasiblePlanError, match="padding.*not exhaustive") as e:
        plan_from_numbers(_kinds(sizes), capacity_bytes=capacity, device_ids=range(devices),
                          hardware="test", compression="none", microbatches=1,
                          microbatch_size=1, mode="prefill", residency="weights")
    assert e.value.capacity == capacity
    assert f"Capacity {capacity:,} bytes" in str(e.value)


def test_a_given_partition_that_fits_with_its_padding_is_taken():
    plan = plan_from_numbers(_kinds([1000] * 4 + [1001] * 4), capacity_bytes=32_000,
                             device_ids=range(2), hardware="test", compression="none",
                             microbatches=1, microbatch_size=1, mode="prefill",
                             residency="weights", ranges=[(0, 5), (5, 8)])
    # 5 layers of 1,000 or 1,001 elements need 4 + 1 slots; the 3-layer stage pads 2 of them
    assert plan.padding_bytes == (8008, 16000)
    assert max(plan.device_bytes(s) for s in plan.stages) <= 32_000


def _segments(segs, costs) -> LayerNumbers:
    """Numbers whose prologue, layers and epilogue store float32 arrays of the given element
    counts (``segs[0]``: the prologue, ``segs[-1]``: the epilogue)."""
    stored, p = [], 0
    for seg in segs:
        stored.append(tuple(StoredArray(p + j, "float32", n) for j, n in enumerate(seg)))
        p += len(seg)

    def fp(arrays):
        return Footprint(weights_bytes=4 * sum(a.size for a in arrays), activation_bytes=0,
                         buffer_bytes=0)

    return LayerNumbers(names=tuple(f"layers_{i}" for i in range(len(segs) - 2)),
                        footprints=tuple(map(fp, stored[1:-1])), prologue=fp(stored[0]),
                        epilogue=fp(stored[-1]), costs_s=tuple(costs), stored=tuple(stored))


def _plans(numbers, capacity, devices) -> bool:
    try:
        plan_from_numbers(numbers, capacity_bytes=capacity, device_ids=range(devices),
                          hardware="test", compression="none", microbatches=1,
                          microbatch_size=1, mode="prefill", objective="bottleneck")
        return True
    except InfeasiblePlanError:
        return False


def test_what_would_fit_counts_the_padding_and_the_planner_agrees():
    """``strategies.requirement`` ("what would fit" in an InfeasiblePlanError) counts the
    padding: the capacity it names plans, on the planner's own path; the padding-blind least
    capacity did not (a case where the partition at the padded capacity differs from the one
    at the unpadded least). On random cases both its answers plan."""
    numbers = _segments([[64], [8, 32, 4], [16, 32, 4], [8, 32], [8, 32], [16]],
                        (3.0, 1.0, 0.1, 1.0))
    sizes, _, _ = partition_inputs(numbers, BIG, "all")
    blind = min_capacity(sizes, 4)
    need = requirement(lambda tp: numbers, (1,), capacity_bytes=BIG, num_devices=4,
                       residency="all")
    assert not _plans(numbers, blind, 4) and _plans(numbers, need.min_capacity_bytes, 4)
    assert need.min_capacity_bytes == 640  # the least that plans: 636 does not (by search)
    assert not _plans(numbers, 636, 4)
    rng = random.Random(3)
    for _ in range(150):
        segs = [[rng.choice([4, 8, 16, 32, 64]) for _ in range(rng.randint(1, 3))]
                for _ in range(rng.randint(3, 7))]
        numbers = _segments(segs, [rng.choice([0.1, 1.0, 3.0]) for _ in segs[2:]])
        devices = rng.randint(1, len(segs) - 2)
        sizes, _, _ = partition_inputs(numbers, BIG, "all")
        cap = max(sizes) + rng.randint(0, 400)
        need = requirement(lambda tp, n=numbers: n, (1,), capacity_bytes=cap,
                           num_devices=devices, residency="all")
        assert _plans(numbers, need.min_capacity_bytes, devices), segs
        if need.fewest_devices is not None:
            assert _plans(numbers, cap, need.fewest_devices), segs
