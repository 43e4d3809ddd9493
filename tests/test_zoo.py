"""Real third-party models: the `transformers` Flax families (tiny random configs) through
analyze and layerwise_shard.

Each family's blocks are found as the layers -- one layer per block, as many as the config
has -- and the pipeline's outputs equal the model's (float32, atol = rtol = 1e-5: the
pipeline runs the model's own equations, fused differently by XLA) on two device counts and
two microbatch counts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import lwjax

ATOL = RTOL = 1e-5
NUM_LAYERS = 3
VOCAB = 97
BATCH, SEQ = 4, 16

FAMILIES = {
    "gpt2": ("GPT2Config", "FlaxGPT2LMHeadModel", "transformer/h",
             dict(n_layer=NUM_LAYERS, n_embd=32, n_head=4, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", "FlaxGPTNeoForCausalLM", "transformer/h",
                dict(num_layers=NUM_LAYERS, hidden_size=32, num_heads=4,
                     max_position_embeddings=64, window_size=8,
                     attention_types=[[["global", "local"], 1], [["global"], 1]])),
    "opt": ("OPTConfig", "FlaxOPTForCausalLM", "decoder/layers",
            dict(num_hidden_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4,
                 ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32)),
    "llama": ("LlamaConfig", "FlaxLlamaForCausalLM", "model/layers",
              dict(num_hidden_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)),
    "mistral": ("MistralConfig", "FlaxMistralForCausalLM", "model/layers",
                dict(num_hidden_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                     sliding_window=8)),
    "bert": ("BertConfig", "FlaxBertModel", "encoder/layer",
             dict(num_hidden_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)),
    # pools each sequence's row at its own argmax token: x[jnp.arange(B), ids.argmax(-1)]
    "clip_text": ("CLIPTextConfig", "FlaxCLIPTextModel", "text_model/encoder/layers",
                  dict(num_hidden_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", "FlaxRobertaModel", "encoder/layer",
                dict(num_hidden_layers=NUM_LAYERS, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)),
}


def build(family: str):
    config_cls, model_cls, _, kw = FAMILIES[family]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **kw)
    return getattr(transformers, model_cls)(config, seed=0, dtype=jnp.float32)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def zoo(request):
    model = build(request.param)
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 2, VOCAB)
    return request.param, model, ids, model(ids)


def _assert_same(got, want):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) > 0
    for a, b in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=RTOL)


def test_analyze_finds_one_layer_per_block(zoo):
    family, model, ids, _ = zoo
    report = lwjax.analyze(model, ids)
    scope = FAMILIES[family][2]
    names = [layer.name for layer in report.layers]
    assert len(names) == NUM_LAYERS
    assert all(n.endswith(f"{scope}/{i}") for i, n in enumerate(names)), names
    # every block's weights are in its layer; what is outside is embeddings, norms, head
    assert 0 < report.outside_weights_share < 0.5
    sizes = {layer.footprint.weights_bytes for layer in report.layers}
    assert len(sizes) == 1 and sizes.pop() > 0


@pytest.mark.parametrize("num_devices,microbatches",
                         [(2, 2), pytest.param(4, 4, marks=pytest.mark.slow)])
def test_layerwise_shard_equals_the_model(zoo, num_devices, microbatches):
    _, model, ids, want = zoo
    sm = lwjax.layerwise_shard(model, ids, devices=jax.devices()[:num_devices],
                               microbatches=microbatches, objective="bottleneck",
                               cache_bytes=2**30, allow=())
    assert len(sm.plan.stages) == min(num_devices, NUM_LAYERS)
    assert sm.plan.microbatches == microbatches
    assert sum(len(s.layers) for s in sm.plan.stages) == NUM_LAYERS
    _assert_same(sm(ids), want)


def test_linen_module_and_variables_route():
    """The same family passed as its linen module, variables and explicit arguments."""
    model = build("gpt2")
    ids = jax.random.randint(jax.random.key(2), (BATCH, SEQ), 2, VOCAB)
    mask = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(SEQ), ids.shape)
    variables = {"params": model.params}
    want = model.module.apply(variables, ids, mask, positions)
    sm = lwjax.layerwise_shard(model.module, variables, ids, mask, positions,
                               devices=jax.devices()[:3], microbatches=2,
                               objective="bottleneck", cache_bytes=2**30, allow=())
    assert [s.layers[0].split("/")[-1] for s in sm.plan.stages] == ["0", "1", "2"]
    _assert_same(sm(ids, mask, positions), want)


def test_override_names_the_same_layers_or_others():
    model = build("llama")
    ids = jnp.ones((2, 8), jnp.int32)
    found = [layer.name for layer in lwjax.analyze(model, ids).layers]
    assert [layer.name for layer in lwjax.analyze(model, ids, layers="model/layers/*").layers] \
        == found
    # a finer segmentation on purpose: every attention and MLP is a layer of its own
    fine = [layer.name.split("/", 3)[-1] for layer in
            lwjax.analyze(model, ids, layers="layers/*/*").layers]
    assert {"0/input_layernorm", "0/self_attn", "0/post_attention_layernorm", "0/mlp",
            "2/mlp"} <= set(fine)
    assert fine.index("0/self_attn") < fine.index("0/mlp") < fine.index("1/self_attn")
    by_callable = lwjax.analyze(
        model, ids, layers=lambda stack: "/".join(stack.split("/")[:4])
        if "/layers/" in stack else None).layers
    assert [layer.name for layer in by_callable] == found


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_same_shaped_embedding_tables_are_no_layer_stack(family):
    """With the vocabulary as long as the positions, the word and position embeddings are two
    same-shaped siblings outside the blocks; tables looked up (no matmul FLOPs) are not taken
    for a repeated structure the layers missed, so the blocks are still the layers."""
    config_cls, model_cls, scope, kw = FAMILIES[family]
    positions = {"bert": "max_position_embeddings", "gpt2": "n_positions"}[family]
    config = getattr(transformers, config_cls)(vocab_size=256, **{**kw, positions: 256})
    model = getattr(transformers, model_cls)(config, seed=0, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(3), (BATCH, SEQ), 2, 256)
    report = lwjax.analyze(model, ids)
    assert [layer.name.split(scope + "/")[-1] for layer in report.layers] == ["0", "1", "2"]
    assert 0.2 < report.outside_weights_share < 0.5  # the tables: a large share, not most
    sm = lwjax.layerwise_shard(model, ids, devices=jax.devices()[:3], microbatches=2,
                               objective="bottleneck", cache_bytes=2**30, allow=())
    _assert_same(sm(ids), model(ids))
