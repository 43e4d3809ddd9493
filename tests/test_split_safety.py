"""Split stages cannot hang: every stage split over "tp" either runs and equals the model, or
is refused with ``SplitError`` before anything runs.

A split program that hangs does not raise: XLA:CPU waits 40 s for a collective-permute's
missing devices and aborts the process. So every configuration that runs a split program runs
in a child process with a timeout (``_in_child``); a hang fails the test instead of CI.
The parsing and the split rule are checked in this process (nothing runs there).

Tolerance: float32 on CPU, atol = rtol = 1e-5, as in tests/test_lower.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import SplitError
from lwjax.models import configs
from lwjax.passes.collectives import StageView, check, collectives, hanging
from lwjax.passes.lower import lower
from lwjax.passes.segment import segment
from lwjax.passes.tp import mixed_axes, split_axes, split_axis
from lwjax.passes.trace import trace

ATOL = RTOL = 1e-5
CHILD_TIMEOUT_S = 300  # a hang aborts after ~40 s; a configuration runs in ~10 s on one core


# ---- models -------------------------------------------------------------------------------------

def dense_3_heads():
    """lwjax's DenseTransformer with 3 heads of 16: no tp > 1 divides the heads, and rotary
    embedding slices the head dimension (the split used to fall there and hang)."""
    cfg = dataclasses.replace(configs.tiny_dense(), num_heads=3, hidden_size=48, head_dim=16)
    return cfg, models.build(cfg, rngs=nnx.Rngs(0))


class FusedBlock(nn.Module):
    """A GPT-2 block: one fused qkv projection [D, 3D], split into q, k, v after the matmul."""

    heads: int

    @nn.compact
    def __call__(self, x_BTD):
        b, t, d = x_BTD.shape
        qkv = nn.Dense(3 * d, name="c_attn")(nn.LayerNorm()(x_BTD))
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads) for y in jnp.split(qkv, 3, -1))
        scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(d // self.heads)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
        o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v).reshape(b, t, d)
        x_BTD = x_BTD + nn.Dense(d, name="c_proj")(o)
        h = jax.nn.gelu(nn.Dense(4 * d, name="c_fc")(nn.LayerNorm()(x_BTD)))
        return x_BTD + nn.Dense(d, name="mlp_proj")(h)


class ConvBlock(nn.Module):
    """An MLP whose hidden width is smoothed by a 1-D convolution: the convolution reads its
    neighbours along F, a primitive the split rule does not follow (the compiled check must
    refuse the split of F)."""

    @nn.compact
    def __call__(self, x_BTD):
        h = nn.Dense(64, name="up")(nn.LayerNorm()(x_BTD))
        b, t, f = h.shape
        kernel = jnp.ones((3, 1, 1), h.dtype) / 3
        h = jax.lax.conv_general_dilated(h.reshape(b * t, f, 1), kernel, (1,), "SAME",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return x_BTD + nn.Dense(x_BTD.shape[-1], name="down")(jax.nn.gelu(h.reshape(b, t, f)))


class Stack(nn.Module):
    """Embedding -> numbered blocks h_0.. -> LM head."""

    block: str
    vocab: int = 64
    width: int = 32
    layers: int = 4

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="wte")(ids)
        for i in range(self.layers):
            x = (FusedBlock(heads=4, name=f"h_{i}") if self.block == "fused" else
                 ConvBlock(name=f"h_{i}"))(x)
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def _model(name: str):
    """(call arguments for trace/layerwise_shard, reference outputs)."""
    if name in ("tiny_dense", "dense_3_heads"):
        cfg, model = (configs.tiny_dense(), None) if name == "tiny_dense" else dense_3_heads()
        model = model or models.build(cfg, rngs=nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (8, cfg.seq_len), 0, cfg.vocab_size)
        return (model, tokens), model(tokens)
    module = Stack(block=name)
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, module.vocab)
    variables = module.init(jax.random.key(1), tokens)
    return (module, variables, tokens), module.apply(variables, tokens)


# ---- the child process --------------------------------------------------------------------------

def run_case(model: str, tp: int, stages: int, via: str = "lower",
             rule: str = "split_axes") -> dict:
    """Runs one split configuration (in the child) and reports what happened.

    Args:
        model: "tiny_dense", "dense_3_heads", "fused" or "conv".
        tp: devices per stage.
        stages: stages over the 4 layers.
        via: "lower" (``passes.lower.lower`` on even ranges) or "layerwise_shard" (planned
            with ``allow=("split",)`` on 8 devices at a capacity that needs tp = 4).
        rule: "split_axes" (lwjax's rule) or "first_divisible" (the rule before mixed axes
            existed, which split dimensions the model slices: the compiled check must refuse).
    """
    if rule == "first_divisible":
        import lwjax.passes.tp as tp_rule

        tp_rule.mixed_axes = lambda graph, params=None, hidden=None, whole_below=0: {
            i: frozenset() for i in (range(len(graph.params)) if params is None else params)}
    args, want = _model(model)
    tokens = args[-1]
    try:
        if via == "layerwise_shard":
            sm = lwjax.layerwise_shard(*args, devices=jax.devices()[:8], cache_bytes=150_000,
                                       allow=("split",), microbatches=2,
                                       objective="bottleneck")
            got, plan_tp = sm(tokens), sm.plan.tp
        else:
            graph = segment(trace(*args, microbatch_size=4))
            ranges = [(s * 4 // stages, (s + 1) * 4 // stages) for s in range(stages)]
            program = lower(graph, ranges, jax.devices()[:stages * tp], 2, tp=tp)
            got, plan_tp = program(program.place_params(graph.traced.params), tokens), tp
    except SplitError as e:
        return {"outcome": "refused", "message": str(e), "stage": e.stage,
                "layers": list(e.layers), "tp": e.tp, "collective": e.collective}
    got, want = np.asarray(got), np.asarray(want)
    return {"outcome": "ran", "tp": plan_tp, "max_abs_diff": float(np.abs(got - want).max()),
            "close": bool(np.allclose(got, want, atol=ATOL, rtol=RTOL))}


def _in_child(*cases: dict) -> list[dict]:
    """``run_case(**case)`` for each case, in one fresh process with 16 CPU devices; a hang or
    a crash fails the test."""
    code = (
        "import jax, json, sys\n"
        "jax.config.update('jax_num_cpu_devices', 16)\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_split_safety as t\n"
        f"print('RESULT ' + json.dumps([t.run_case(**c) for c in {list(cases)!r}]))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=16").strip())
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cases}: the split program hung (no result in {CHILD_TIMEOUT_S} s)")
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        # SIGABRT (-6; 134 in a shell): XLA gave up on a collective that never completed
        tail = "\n".join([x for x in done.stderr.splitlines() if not x.startswith("    @")][-8:])
        pytest.fail(f"{cases}: child exited {done.returncode} (-6: XLA aborted a collective "
                    f"that never completed, i.e. a hang) without a result:\n{tail}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---- configurations that used to hang now run and equal the model ------------------------------

@pytest.mark.parametrize("cases", [
    # used to split the head dimension, which rotary embedding slices: hung
    pytest.param([dict(model="dense_3_heads", tp=2, stages=2),
                  dict(model="dense_3_heads", tp=4, stages=2)], marks=pytest.mark.slow),
    [dict(model="fused", tp=2, stages=2)],  # used to cut the fused [D, 3D] qkv: hung
    # heads divide: split over heads, as before
    pytest.param([dict(model="tiny_dense", tp=2, stages=2),
                  dict(model="tiny_dense", tp=4, stages=2)], marks=pytest.mark.slow),
    # the default run's representative of dense_3_heads: tp 4, through layerwise_shard; and
    # one stage: the vocabulary-split embedding's all-reduce over all devices stays inside it
    # (one child process for both)
    [dict(model="dense_3_heads", tp=4, stages=2, via="layerwise_shard"),
     dict(model="tiny_dense", tp=4, stages=1)],
], ids=["dense_3_heads", "fused_qkv", "tiny_dense", "layerwise_shard_and_one_stage"])
def test_split_runs_and_equals_the_model(cases):
    for case, result in zip(cases, _in_child(*cases), strict=True):
        assert result["outcome"] == "ran", (case, result)
        assert result["tp"] == case["tp"], (case, result)
        assert result["close"], (case, result)


# ---- what the rule misses, the compiled check refuses before anything runs -----------------------

@pytest.mark.parametrize("case", [
    # a convolution along the split MLP width (slow: dense_3_heads is the default's refusal)
    pytest.param(dict(model="conv", tp=2, stages=2), marks=pytest.mark.slow),
    dict(model="dense_3_heads", tp=2, stages=2, rule="first_divisible"),  # the original hang
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_split_that_would_hang_is_refused(case):
    (result,) = _in_child(case)
    assert result["outcome"] == "refused", result
    message = result["message"]
    assert result["collective"] == "collective-permute" and result["tp"] == 2
    assert result["stage"] == 0 and result["layers"][0] == "prologue"
    for part in ("Stage 0 (layers prologue", "split over tp=2 would hang",
                 "collective-permute (source_target_pairs=", "devices of stages [0, 1]",
                 "Weights split in", "on axis", "another tp", "allow=()"):
        assert part in message, (part, message)
    if case["model"] == "conv":
        assert "at 'Stack/h_0/conv_general_dilated'" in message
        assert "params/h_0/up/kernel [32, 64] on axis 1 (64 -> 32 per device)" in message
    else:
        assert "at 'layers_0/" in message and "/attn/split'" in message
        assert "layers/0/attn/q [48, 3, 16] on axis 2 (16 -> 8 per device)" in message


# ---- the split rule (in process: nothing runs) --------------------------------------------------

def test_rule_keeps_sliced_dimensions_whole():
    _, model = dense_3_heads()
    graph = segment(trace(model, jnp.zeros((4, 16), jnp.int32)))
    layer = graph.layers[0]
    paths = {graph.params[i].path.rsplit("/", 1)[-1]: i for i in layer.params}
    mixed = mixed_axes(graph, layer.params)
    # rotary slices q's and k's head dimension; v and out are never sliced
    assert mixed[paths["q"]] == mixed[paths["k"]] == {2}
    assert mixed[paths["v"]] == mixed[paths["out"]] == frozenset()
    axes = split_axes(graph, layer, tp=2)
    assert axes[paths["q"]] is None and axes[paths["k"]] is None  # 3 heads: replicated
    assert axes[paths["gate"]] == 1 and axes[paths["down"]] == 0  # the MLP splits as before
    assert split_axis((48, 3, 16), hidden=48, tp=2) == 2
    assert split_axis((48, 3, 16), hidden=48, tp=2, mixed={2}) is None

    module = Stack(block="fused")
    tokens = jnp.zeros((4, 16), jnp.int32)
    graph = segment(trace(module, module.init(jax.random.key(0), tokens), tokens))
    layer = graph.layers[0]
    axes = {graph.params[i].path: a for i, a in split_axes(graph, layer, tp=2).items()}
    assert axes["params/h_0/c_attn/kernel"] is None  # [D, 3D]: jnp.split cuts q | k | v
    assert axes["params/h_0/c_fc/kernel"] == 1 and axes["params/h_0/mlp_proj/kernel"] == 0


def test_rule_splits_tiny_dense_over_heads():
    graph = segment(trace(models.build(configs.tiny_dense(), rngs=nnx.Rngs(0)),
                          jnp.zeros((4, 16), jnp.int32)))
    layer = graph.layers[0]
    axes = {graph.params[i].path.rsplit("/", 1)[-1]: a
            for i, a in split_axes(graph, layer, tp=4).items()}
    assert axes == {"scale": None, "q": 1, "k": 1, "v": 1, "out": 0, "gate": 1, "up": 1,
                    "down": 0}



def test_rule_keeps_the_moe_router_whole_so_routing_needs_no_collective():
    """top_k and the softmax run along the router's expert axis: split there, XLA all-gathers
    the logits for top_k and all-reduces the softmax's max and sum in every layer. The rule
    keeps the router [D, E] whole and splits the experts [E, D, F] (expert parallel), so a
    split MoE layer runs Megatron's two all-reduces and nothing else."""
    model = models.build(configs.tiny_moe(), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((4, 16), jnp.int32)
    graph = segment(trace(model, tokens))
    layer = graph.layers[0]
    axes = {"/".join(graph.params[i].path.rsplit("/", 2)[-2:]): a
            for i, a in split_axes(graph, layer, tp=2).items()}
    assert axes["mlp/router"] is None
    assert axes["mlp/gate"] == axes["mlp/up"] == axes["mlp/down"] == 0  # experts
    # compiled (nothing runs): per layer of the split stage, two all-reduces of the residual
    half = len(graph.layers) // 2
    prog = lower(graph, [(0, half), (half, len(graph.layers))], jax.devices()[:4], 1, tp=2)
    hlo = prog.fn.lower(prog.place_params(graph.traced.params), tokens).compile().as_text()
    found = [c for c in collectives(hlo) if c.in_branch and "layers_0/" in c.op_name]
    assert sorted(c.kind for c in found) == ["all-reduce", "all-reduce"], found


class _RoutedBlock(nnx.Module):
    def __init__(self, d, rngs):
        self.router = nnx.Linear(d, 4, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        gate = jax.lax.top_k(jax.nn.softmax(self.router(x)), 2)[0].sum(-1, keepdims=True)
        return x + self.down(jax.nn.relu(self.up(x))) * gate


class _TopKModel(nnx.Module):
    """Blocks routing with top_k over a small router [D, 4]; an LM head [D, V] whose logits
    go through top_k (sampling)."""

    def __init__(self, d=64, v=256, blocks=2, rngs=None):
        self.embed = nnx.Embed(v, d, rngs=rngs)
        self.blocks = nnx.List([_RoutedBlock(d, rngs) for _ in range(blocks)])
        self.head = nnx.Linear(d, v, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.lax.top_k(self.head(x), 4)[0]


def test_rule_keeps_a_small_weight_whole_along_top_k_and_splits_a_large_one():
    """top_k along a split axis costs an all-gather inside the tp group, not a hang: a
    router (1 KiB, under the residual's 8 KiB) stays whole, the head (64 KiB) still splits
    over the vocabulary."""
    graph = segment(trace(_TopKModel(rngs=nnx.Rngs(0)), jnp.zeros((4, 8), jnp.int32)))
    paths = {i: p.path for i, p in enumerate(graph.params)}
    layer = {paths[i]: a for i, a in split_axes(graph, graph.layers[0], tp=2).items()}
    assert [a for p, a in layer.items() if "router" in p] == [None]
    assert [a for p, a in layer.items() if "up" in p] == [1]
    head = {paths[i]: a for i, a in split_axes(graph, graph.epilogue, tp=2).items()}
    assert [a for p, a in head.items() if "head" in p] == [1]

# ---- reading the compiled HLO ----------------------------------------------------------------

_AT = 'metadata={op_name="jit(program)/shard_map/while/body/cond/branch_0_fun/stage_0/layers_0'
HLO = "\n".join([
    "HloModule jit_program, entry_computation_layout={(f32[4]{0})->f32[4]{0}}",
    "",
    "%add (x: f32[], y: f32[]) -> f32[] {",
    "  %x = f32[] parameter(0)",
    "  %y = f32[] parameter(1)",
    "  ROOT %s = f32[] add(%x, %y)",
    "}",
    "",
    "%branch_0 (p: f32[4]) -> f32[4] {",
    "  %p = f32[4]{0} parameter(0)",
    "  %ar = f32[4]{0} all-reduce(%p), channel_id=3, replica_groups=[2,2]<=[4], "
    "use_global_device_ids=true, to_apply=%add, " + _AT + '/dot_general"}',
    "  %fusion = f32[4]{0} fusion(%ar), kind=kLoop, calls=%inner",
    "  ROOT %cp = f32[4]{0} collective-permute(%fusion), channel_id=4, "
    "source_target_pairs={{0,1},{2,3}}, " + _AT + '/attn/split"}',
    "}",
    "",
    "%inner (q: f32[4]) -> f32[4] {",
    "  %q = f32[4]{0} parameter(0)",
    "  ROOT %ag = f32[4]{0} all-gather(%q), channel_id=5, replica_groups={{0,2},{1,3}}, "
    "dimensions={0}",
    "}",
    "",
    "%branch_1 (r: f32[4]) -> f32[4] {",
    "  ROOT %r = f32[4]{0} parameter(0)",
    "}",
    "",
    "ENTRY %main (a: f32[4]) -> f32[4] {",
    "  %a = f32[4]{0} parameter(0)",
    "  %i = s32[] constant(0)",
    "  %c = f32[4]{0} conditional(%i, %a, %a), branch_computations={%branch_0, %branch_1}",
    "  ROOT %out = f32[4]{0} collective-permute(%c), channel_id=1, "
    "source_target_pairs={{0,2},{1,3}}",
    "}",
])


def test_collectives_are_read_with_their_groups_and_branches():
    found = {c.kind: c for c in collectives(HLO) if c.in_branch}
    assert found["all-reduce"].groups == ((0, 1), (2, 3))
    assert found["collective-permute"].groups == ((0, 1, 2, 3),)
    assert found["all-gather"].groups == ((0, 2), (1, 3))  # reached through a fusion
    outside = [c for c in collectives(HLO) if not c.in_branch]
    assert [c.kind for c in outside] == ["collective-permute"]  # the stage-to-stage ppermute
    # 2 stages x tp 2: the all-reduce stays inside a stage; the permute and the gather do not
    assert [c.kind for c in hanging(collectives(HLO), lambda d: d // 2)] == [
        "collective-permute", "all-gather"]
    # no replica groups: every device of the program, inside a stage only when there is one
    everyone = HLO.replace("replica_groups=[2,2]<=[4], ", "replica_groups={}, ")
    assert collectives(everyone)[0].groups is None
    assert hanging(collectives(everyone), lambda d: d // 4, num_devices=4) == ()  # one stage
    assert [c.kind for c in hanging(collectives(everyone), lambda d: d // 2, num_devices=4)] \
        == ["all-reduce", "collective-permute", "all-gather"]  # two stages: it would hang
    assert "all-reduce" in [c.kind for c in hanging(collectives(everyone), lambda d: d // 4)]
    # a transposed iota: [2,4]<=[4,2]T(1,0) = {0,2,4,6}, {1,3,5,7}
    text = HLO.replace("replica_groups=[2,2]<=[4]", "replica_groups=[2,4]<=[4,2]T(1,0)")
    assert collectives(text)[0].groups == ((0, 2, 4, 6), (1, 3, 5, 7))


def test_check_names_stage_layer_and_weights():
    views = [StageView(devices=(0, 1), layers=("prologue", "layers_0"),
                       split=(("prologue", ()), ("layers_0", ("attn/q [48, 3, 16] on axis 2 "
                                                             "(16 -> 8 per device)",)))),
             StageView(devices=(2, 3), layers=("layers_1",), split=(("layers_1", ()),))]
    with pytest.raises(SplitError, match=r"Stage 0 \(layers prologue, layers_0; devices "
                       r"\[0, 1\]\) split over tp=2 would hang: XLA put a collective-permute "
                       r"\(source_target_pairs=\{\{0,1\},\{2,3\}\}: devices of stages \[0, 1\]"
                       r"\).*at 'layers_0/attn/split'.*attn/q \[48, 3, 16\] on axis 2") as e:
        check(HLO, views, tp=2)
    assert (e.value.stage, e.value.layers, e.value.tp) == (0, ("prologue", "layers_0"), 2)
    check(HLO.replace("source_target_pairs={{0,1},{2,3}}", "source_target_pairs={{0,1}}")
          .replace("replica_groups={{0,2},{1,3}}", "replica_groups={{0,1},{2,3}}"), views, tp=2)
