"""layerwise_generate: greedy tokens equal the model's own generation (lwjax's dense and MoE
models, a transformers family), mixed prompt lengths and eos, stage-resident KV caches, one
compile per shape, and bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import greedy_under_full_forward
from flax import nnx

import lwjax
from lwjax import models
from lwjax.errors import ConfigError, InputError
from lwjax.passes import padding

NEW = 32


def _model(kind: str, num_layers: int):
    cfg = models.configs.tiny_dense() if kind == "dense" else models.configs.tiny_moe()
    cfg = dataclasses.replace(cfg, dtype=jnp.float32, num_layers=num_layers)
    return models.build(cfg, rngs=nnx.Rngs(0)), cfg


@pytest.fixture(scope="module")
def dense16():
    return _model("dense", 16)


@pytest.fixture(scope="module")
def moe16():
    return _model("moe", 16)


def _prompt(cfg, batch=4, length=8, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size,
                              jnp.int32)


def _check_equal(model, cfg, num_devices, microbatches):
    prompt = _prompt(cfg)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=NEW,
                                 devices=jax.devices()[:num_devices], microbatches=microbatches,
                                 objective="bottleneck", cache_bytes=2**30)
    got = np.asarray(g(prompt))
    want = np.asarray(models.generate(model, prompt, NEW))
    assert got.shape == (4, NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # one layer per stage up to the device count (the bottleneck objective)
    assert len(g.plan.stages) == min(num_devices, cfg.num_layers)
    assert g.plan.mode == "decode" and g.plan.microbatches == microbatches
    return g


# One representative per model in the default run (dense on 16 devices, MoE on 2); the rest slow.
@pytest.mark.parametrize("num_devices,microbatches", [
    pytest.param(1, 2, marks=pytest.mark.slow), pytest.param(2, 2, marks=pytest.mark.slow),
    pytest.param(5, 4, marks=pytest.mark.slow),
    (16, 4),
    pytest.param(1, 4, marks=pytest.mark.slow), pytest.param(2, 1, marks=pytest.mark.slow),
    pytest.param(5, 2, marks=pytest.mark.slow), pytest.param(16, 2, marks=pytest.mark.slow),
])
def test_dense_equals_models_generate(dense16, num_devices, microbatches):
    _check_equal(*dense16, num_devices, microbatches)


@pytest.mark.parametrize("num_devices,microbatches", [
    (2, 2), pytest.param(16, 4, marks=pytest.mark.slow),
    pytest.param(1, 2, marks=pytest.mark.slow), pytest.param(5, 4, marks=pytest.mark.slow),
    pytest.param(1, 4, marks=pytest.mark.slow), pytest.param(2, 1, marks=pytest.mark.slow),
    pytest.param(5, 2, marks=pytest.mark.slow), pytest.param(16, 2, marks=pytest.mark.slow),
])
def test_moe_equals_models_generate(moe16, num_devices, microbatches):
    _check_equal(*moe16, num_devices, microbatches)


def test_uneven_stages_pad_their_kv_cache_slots_as_the_plan_predicts():
    """5 layers on 2 stages (3 + 2): the cache slots are the 3-layer stage's, so the 2-layer
    stage's device allocates one layer's caches of zero rows. The plan predicts it (measured
    from the placed caches), counts it in the fit and says so in its summary."""
    model, cfg = _model("dense", 5)
    prompt = _prompt(cfg, batch=8, length=6)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=5, devices=jax.devices()[:2],
                                 microbatches=2, objective="bottleneck")
    ranges = [s.layer_range for s in g.plan.stages]
    assert sorted(b - a for a, b in ranges) == [2, 3]
    measured = g.kv_cache_bytes()
    pads = tuple(measured[s.devices[0]]["allocated"] - measured[s.devices[0]]["own"]
                 for s in g.plan.stages)
    assert padding.cache_padding(g.plan.numbers, ranges) == pads
    layer = 2 * 8 * (6 + 5) * cfg.num_heads * cfg.head_dim * 4  # K and V, all 8 sequences
    assert sorted(pads) == [0, layer]
    weights = padding.padding(dataclasses.replace(g.plan.numbers, cached=()), ranges)
    assert g.plan.padding_bytes == tuple(w + p for w, p in zip(weights, pads, strict=True))
    assert "weight and KV-cache slots" in g.plan.summary()


def test_kv_caches_stay_on_their_stage_and_compile_once():
    model, cfg = _model("dense", 4)
    prompt = _prompt(cfg, batch=8, length=6)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=5, devices=jax.devices()[:4],
                                 microbatches=4, objective="bottleneck")
    cache_len = 6 + 5
    # by hand: one layer per stage, K and V [B, cache_len, N, H] float32, plus the model's
    # int32 position counter (a copy per stage, per group)
    kv = 2 * 8 * cache_len * cfg.num_heads * cfg.head_dim * 4
    counter = 4 * 4
    measured = g.kv_cache_bytes()
    assert measured == {d: {"allocated": kv + counter, "own": kv + counter} for d in range(4)}
    # the plan counts the same KV bytes for each stage (all 4 groups)
    for stage in g.plan.stages:
        assert stage.footprint.kv_cache_bytes == kv + counter
    # every cache shard lives on its stage's device; nothing is replicated
    for c in g.caches:
        assert c.sharding.spec == jax.sharding.PartitionSpec("stage")
    first = g(prompt)
    prog = g.program(6)
    again = g(prompt)  # the donated caches come back, and nothing recompiles
    np.testing.assert_array_equal(first, again)
    assert prog.fn._cache_size() == 1
    assert set(g.compile_seconds) == {6} and g.compile_seconds[6] > 0


def test_mixed_lengths_and_left_padding_give_each_sequence_its_own_tokens():
    model, cfg = _model("dense", 4)
    prompt = np.asarray(_prompt(cfg, length=8))
    lengths = np.array([8, 3, 5, 1])
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=10, devices=jax.devices()[:4],
                                 microbatches=2, objective="bottleneck")
    got = np.asarray(g(prompt, lengths=lengths))
    # each row is its own prompt's greedy continuation (teacher-forced: one compile, not four)
    np.testing.assert_array_equal(
        got, greedy_under_full_forward(lambda s: model(s), prompt, got, lengths))
    alone = np.asarray(models.generate(model, jnp.asarray(prompt[1:2, :3]), 10))[0]
    np.testing.assert_array_equal(got[1], alone)  # and a short one by models.generate itself
    # the same prompts left-padded, with an attention mask
    left = np.zeros_like(prompt)
    mask = np.zeros_like(prompt)
    for i, n in enumerate(lengths):
        left[i, 8 - n:], mask[i, 8 - n:] = prompt[i, :n], 1
    np.testing.assert_array_equal(np.asarray(g(left, attention_mask=mask)), got)
    # the shortest prompt (1) prefills 1 token; shortest 5 and 7 share the 4-token program
    g(prompt, lengths=[8, 5, 7, 6])
    g(prompt, lengths=[7, 7, 8, 8])
    assert sorted(g.compile_seconds) == [1, 4]


def test_eos_ends_a_sequence():
    model, cfg = _model("dense", 4)
    prompt = _prompt(cfg)
    plain = np.asarray(models.generate(model, prompt, 10))
    eos = int(plain[0, 3])
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=10, devices=jax.devices()[:2],
                                 microbatches=2, eos_id=eos, pad_id=0, objective="bottleneck")
    got = np.asarray(g(prompt))
    for row, ref in zip(got, plain, strict=True):
        hits = np.flatnonzero(ref == eos)
        end = hits[0] + 1 if hits.size else len(ref)
        np.testing.assert_array_equal(row[:end], ref[:end])
        assert (row[end:] == 0).all()
    assert (got[0, 4:] == 0).all()


def test_transformers_gpt2_equals_its_own_greedy_generation():
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    cfg = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=97, n_positions=64,
                     bos_token_id=1, eos_token_id=2, initializer_range=0.3)
    model = FlaxGPT2LMHeadModel(cfg, seed=0)
    prompt = jax.random.randint(jax.random.key(1), (4, 6), 3, 97, jnp.int32)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=12, devices=jax.devices()[:4],
                                 microbatches=2, objective="bottleneck")
    got = np.asarray(g(prompt))
    # the oracle: GPT-2's own logits, one full forward (transformers' generate() is the oracle of
    # test_transformers_families_with_eos_equal_their_own_generation)
    np.testing.assert_array_equal(
        got, greedy_under_full_forward(lambda s: model(s).logits, prompt, got))
    assert len(np.unique(got)) > 4  # a continuation worth comparing, not one repeated token
    assert len(g.plan.stages) == 4
    leaves = g.program(6).cache_leaves
    # each layer's cached_key / cached_value / cache_index sits on that layer's stage only
    for leaf in leaves:
        layer = int(leaf.path.split("/")[2])
        assert leaf.stages == (layer,), leaf
    # the position limit is the model's
    with pytest.raises(InputError, match="64 positions"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=60, devices=jax.devices()[:2])


def _hf(family: str):
    import transformers as hf

    small = dict(vocab_size=97, max_position_embeddings=64, initializer_range=0.3,
                 eos_token_id=2, pad_token_id=0)
    configs = {
        "llama": (hf.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, **small),
                  hf.FlaxLlamaForCausalLM),
        "mistral": (hf.MistralConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64,
                                     sliding_window=None, **small), hf.FlaxMistralForCausalLM),
        "gpt_neo": (hf.GPTNeoConfig(num_layers=4, hidden_size=32, num_heads=2, window_size=8,
                                    attention_types=[[["global", "local"], 2]], **small),
                    hf.FlaxGPTNeoForCausalLM),
        "opt": (hf.OPTConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                             ffn_dim=64, word_embed_proj_dim=32, **small),
                hf.FlaxOPTForCausalLM),
    }
    cfg, cls = configs[family]
    return cls(cfg, seed=0)


# llama in the default run: transformers' own generate() with eos and padding is the oracle
@pytest.mark.parametrize("family", ["llama",
                                    pytest.param("mistral", marks=pytest.mark.slow),
                                    pytest.param("gpt_neo", marks=pytest.mark.slow),
                                    pytest.param("opt", marks=pytest.mark.slow)])
def test_transformers_families_with_eos_equal_their_own_generation(family):
    """Their generate stops a sequence at the config's eos (2) and pads with 0: so does
    lwjax with eos_id=2, pad_id=0 (the Llama prompt below hits eos in row 0)."""
    model = _hf(family)
    prompt = jax.random.randint(jax.random.key(1), (4, 6), 3, 97, jnp.int32)
    want = np.asarray(model.generate(prompt, max_new_tokens=10, do_sample=False)
                      .sequences[:, 6:])
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=10, devices=jax.devices()[:4],
                                 microbatches=2, objective="bottleneck", cache_bytes=2**30,
                                 eos_id=2, pad_id=0)
    np.testing.assert_array_equal(np.asarray(g(prompt)), want)
    assert len(g.plan.stages) == 4
    if family == "llama":
        assert (want == 2).any()  # the eos path is exercised


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_new_tokens=0), InputError, "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=2.5), InputError, "max_new_tokens"),
    (dict(max_new_tokens=4, cache_len=5), InputError, "cache_len=5 holds fewer positions"),
    (dict(max_new_tokens=4, eos_id=-1), InputError, "eos_id must be a non-negative"),
    (dict(max_new_tokens=4, microbatches=3), InputError, "does not divide into 3"),
])
def test_bad_arguments(kwargs, error, match):
    model, cfg = _model("dense", 2)
    with pytest.raises(error, match=match):
        lwjax.layerwise_generate(model, _prompt(cfg), devices=jax.devices()[:2], **kwargs)


def test_bad_prompts():
    model, cfg = _model("dense", 2)
    with pytest.raises(InputError, match="prompt must be integers"):
        lwjax.layerwise_generate(model, jnp.zeros((4, 8)), max_new_tokens=2)
    g = lwjax.layerwise_generate(model, _prompt(cfg), max_new_tokens=2,
                                 devices=jax.devices()[:2])
    with pytest.raises(InputError, match=r"built for \(4, 8\)"):
        g(_prompt(cfg, length=9))
    with pytest.raises(InputError, match=r"lengths\[1\] = 9 is outside 1..8"):
        g(_prompt(cfg), lengths=[8, 9, 1, 1])
    with pytest.raises(InputError, match="not one run of ones"):
        g(_prompt(cfg), attention_mask=np.array([[1, 0, 1, 1, 1, 1, 1, 1]] * 4))
    with pytest.raises(ConfigError, match="mode='prefill'"):
        lwjax.layerwise_generate(model, _prompt(cfg), max_new_tokens=2,
                                 plan=lwjax.plan(model, _prompt(cfg), num_devices=2))


@pytest.mark.slow  # default run: a given plan= through layerwise_shard (test_discovery) and a
# generator's own replanned plan (test_failover's test_generator_replan_gives_the_same_tokens)
def test_given_plan_runs_as_is(dense16):
    model, cfg = _model("dense", 4)
    prompt = _prompt(cfg)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=4, devices=jax.devices()[:4],
                                 microbatches=2, objective="bottleneck")
    p = lwjax.Plan.from_json(g.plan.to_json()).replan(exclude_devices=[1])
    g2 = lwjax.layerwise_generate(model, prompt, max_new_tokens=4, plan=p)
    np.testing.assert_array_equal(np.asarray(g2(prompt)), np.asarray(g(prompt)))
    assert 1 not in {d for s in g2.plan.stages for d in s.devices}


def test_a_causal_lm_built_by_hand_takes_the_same_route():
    """The generic contract: params, step(params, tokens, cache, positions), init_cache."""
    model, cfg = _model("dense", 4)
    graphdef, state = nnx.split(model)
    lm = lwjax.CausalLM(
        params=state,
        step=lambda p, t, c, pos: nnx.merge(graphdef, p).decode_step(t, c),
        init_cache=model.init_cache, name="by hand")
    prompt = _prompt(cfg)
    g = lwjax.layerwise_generate(lm, prompt, max_new_tokens=6, devices=jax.devices()[:2],
                                 objective="bottleneck", cache_bytes=2**30)
    np.testing.assert_array_equal(np.asarray(g(prompt)),
                                  np.asarray(models.generate(model, prompt, 6)))
    assert len(g.plan.stages) == 2


def test_a_model_without_a_cache_step_is_refused():
    with pytest.raises(lwjax.errors.TraceError, match="init_cache"):
        lwjax.layerwise_generate(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), jnp.zeros((2, 3), jnp.int32),
                                 max_new_tokens=2)


def test_models_generation_cannot_run_are_refused_with_what_to_use():
    from transformers import BertConfig, FlaxBertModel, FlaxGPT2Model, GPT2Config

    prompt = jnp.zeros((2, 4), jnp.int32)
    bert = FlaxBertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=97), seed=0)
    with pytest.raises(lwjax.errors.TraceError, match="encoder"):
        lwjax.layerwise_generate(bert, prompt, max_new_tokens=2, devices=jax.devices()[:2])
    base = FlaxGPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97), seed=0)
    with pytest.raises(lwjax.errors.TraceError, match="LMHeadModel"):
        lwjax.layerwise_generate(base, prompt, max_new_tokens=2, devices=jax.devices()[:2])
    abstract = models.abstract(_model("dense", 2)[1])
    with pytest.raises(ConfigError, match="abstract"):
        lwjax.layerwise_generate(abstract, prompt, max_new_tokens=2, devices=jax.devices()[:2])


def test_token_ids_and_plans_are_checked():
    model, cfg = _model("dense", 2)
    prompt = _prompt(cfg)
    with pytest.raises(InputError, match="eos_id=256 is not a token"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=2, eos_id=cfg.vocab_size,
                                 devices=jax.devices()[:2])
    with pytest.raises(InputError, match="eos_id must be"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=2, eos_id=2**40)
    with pytest.raises(InputError, match="cache_len must be a positive integer"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=2, cache_len="x")
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=3, devices=jax.devices()[:2],
                                 microbatches=2)
    with pytest.raises(InputError, match="token -1, outside"):
        g(prompt.at[0, 0].set(-1))
    with pytest.raises(ConfigError, match="must be an lwjax.Plan"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=3, plan=g.plan.to_json())
    with pytest.raises(ConfigError, match="KV cache's length"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=5, plan=g.plan)
    with pytest.raises(ConfigError, match="microbatches=4 but the given plan runs 2"):
        lwjax.layerwise_generate(model, prompt, max_new_tokens=3, plan=g.plan, microbatches=4)
    with pytest.raises(lwjax.errors.DeviceError, match="not device ids"):
        lwjax.baselines.tp_pp_generate(model, prompt, max_new_tokens=3, devices=list(range(4)),
                                       tp=2, pp=2)


def test_gpt2s_position_mask_is_sliced_not_stored():
    """GPT-2 builds a [1, 1, P, P] causal mask for its P positions and dynamic-slices the rows
    it needs; XLA fuses the mask into the slice (memory_analysis: no temp bytes for it), so a
    layer's footprint does not grow with P, and the default 1024 positions plan in 1 MiB."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    from lwjax.causal_lm import causal_lm
    from lwjax.generate import trace_step
    from lwjax.passes.footprint import footprint
    from lwjax.passes.segment import segment

    peaks = {}
    for positions in (64, 1024):
        model = FlaxGPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97,
                                               n_positions=positions), seed=0)
        graph = segment(trace_step(causal_lm(model), 1, 1, 16, "decode"))
        layer = footprint(graph, backend="cpu").layers[0]
        peaks[positions] = layer.activation_bytes + layer.buffer_bytes
        # the same mask, sliced as GPT-2 slices it: XLA keeps no temporary for it
        rows = jnp.arange(positions)
        step = jax.jit(lambda i, x, r=rows: jnp.where(jax.lax.dynamic_slice(
            (r[:, None] >= r[None, :])[None, None], (0, 0, i, 0), (1, 1, 1, 16)), x, 0.0))
        assert step.lower(jnp.int32(3), jnp.ones((1, 1, 1, 16))).compile() \
            .memory_analysis().temp_size_in_bytes < 2**10
    assert peaks[1024] == peaks[64] < 2**17, peaks
    model = FlaxGPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97),
                                seed=0)
    prompt = jax.random.randint(jax.random.key(1), (2, 6), 3, 97, jnp.int32)
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=4, devices=jax.devices()[:2],
                                 objective="bottleneck", cache_bytes=2**20)
    got = np.asarray(g(prompt))
    np.testing.assert_array_equal(
        got, greedy_under_full_forward(lambda s: model(s).logits, prompt, got))
