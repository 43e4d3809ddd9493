"""Generation baselines: greedy decoding with a KV cache under TP x PP, and on one device.

``tp_pp_generate`` is the generation counterpart of ``baselines.tp_pp``: the same mesh, the
same Megatron weight shardings and the same GPipe schedule over "pp" in a ``jax.shard_map``
manual over "pp" only, now with a KV cache. ``single_device_generate`` is
``models.generate`` jitted once on one device. Both return a ``GenerationBaseline``:
``generator(prompt) -> new tokens [B, max_new_tokens] int32``, equal to
``models.generate(model, prompt, max_new_tokens)``.

Layout of ``tp_pp_generate`` (weights as in ``tp_pp``; see its module docstring):

- KV cache: keys and values each one array [pp, L/pp, B, max_len, N, H] placed
  ``P("pp", None, None, None, "tp", None)``: a device holds only its stage's layers' caches
  and, of those, only its "tp" slice of heads -- the heads its column-parallel q/k/v
  produce, so attention needs no communication beyond ``tp_pp``'s. ``max_len`` is
  prompt length + max_new_tokens, as in ``models.generate``. The cache is allocated once at
  construction, donated to every call and handed back updated, so XLA writes it in place.
- One jitted program per generator: the prefill of the prompt, then a ``lax.scan`` over the
  max_new_tokens - 1 further decode steps; Python is not re-entered per token. Prefill and
  each decode step are one GPipe pass (M + pp - 1 ticks, ``lax.ppermute`` between stages) of
  the model's own ``Block`` against the cache, M microbatches of B / M sequences each.
- At tick t stage s works on microbatch t - s; in fill and drain ticks that index is out of
  range and the stage computes on whatever it holds, as in ``tp_pp``. Such ticks must not
  touch the cache: each layer writes back only its T new positions (T = prompt length in
  the prefill, 1 per decode step), selecting the old rows on idle ticks. The cache is never
  reset between calls: attention masks every position past the one being decoded, and
  every position up to it is rewritten before it is read.
- Embedding, final norm, LM head and the greedy argmax run in the automatic part as in
  ``tp_pp``; the head reads only the last position of each sequence.

Known costs a reader should weigh: GPipe's bubble, now paid on every decode step (each step
is M + pp - 1 ticks for M microbatches of one token); each layer reads its microbatch's
whole [B / M, max_len, N / tp, H] cache slice every step (masked positions included), as
``models.generate`` does, and first copies it out of the stacked cache, since the model's
``Block`` takes and returns a whole cache (``models.generate``'s per-layer arrays need no
copy); only the T new rows are written back in place.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from lwjax import baselines, models
    >>> model = models.build(models.configs.tiny_dense(), rngs=nnx.Rngs(0))
    >>> prompt = jnp.zeros((4, 8), jnp.int32)
    >>> g = baselines.tp_pp_generate(model, prompt, max_new_tokens=5, tp=4, pp=2)
    >>> g(prompt).shape
    (4, 5)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax.baselines import (
    PP,
    TP,
    _check_divisible,
    _describe,
    _device_list,
    _divisor_near,
    _is_abstract,
    _model_config,
    _place,
    _place_params,
    _positive,
    _token_shape,
    check_example,
)
from lwjax.errors import ConfigError, InputError
from lwjax.models.transformer import KVCache

# Stacked caches [pp, L/pp, B, max_len, N, H]: stage-major over "pp", heads over "tp".
_CACHE_SPEC = P(PP, None, None, None, TP, None)


@flax.struct.dataclass
class StageKVCache:
    """``tp_pp_generate``'s cache: every layer's keys and values, stacked stage-major.

    Attributes:
        keys: [pp, L/pp, B, max_len, N, H], placed ``P("pp", None, None, None, "tp", None)``.
        values: the same for values.
    """

    keys: jax.Array
    values: jax.Array


@dataclasses.dataclass(eq=False)
class GenerationBaseline:
    """A deployed greedy decoder: ``generator(prompt) -> new tokens [B, max_new_tokens]``.

    Weights and the KV cache are placed once at construction; each call runs one compiled
    program (compiled on the first call) and hands the updated cache back to ``cache``.

    Attributes:
        name: ``"tp_pp"`` or ``"single_device"``.
        mesh: the ("pp", "tp") device mesh (1 x 1 for ``single_device``).
        params: the placed weights, as in ``baselines.Baseline.params``.
        prompt: shape and dtype of the example prompt; calls must match them.
        max_new_tokens: tokens generated per call (N).
        num_microbatches: GPipe microbatches M (1 for ``single_device``).
        layout: a few lines saying where every weight and cache lives.
        cache: the placed KV cache: a ``StageKVCache`` for ``tp_pp``, the model's
            ``KVCache`` for ``single_device`` (its ``length`` is reset by every call).
            ``jax.ShapeDtypeStruct`` leaves when built from ``models.abstract``.
    """

    name: str
    mesh: Mesh
    params: Any
    prompt: jax.ShapeDtypeStruct
    max_new_tokens: int
    num_microbatches: int
    layout: str
    cache: Any = dataclasses.field(repr=False)
    _program: Callable = dataclasses.field(repr=False)
    _prompt_sharding: NamedSharding = dataclasses.field(repr=False)

    def __call__(self, prompt_BT: jax.Array) -> jax.Array:
        """The greedy continuation of ``prompt_BT``: int32 [B, max_new_tokens]."""
        self._check_prompt(prompt_BT)
        if _is_abstract(self.params):
            raise ConfigError(
                f"This {self.name} generator was built from an abstract model (no weights); it "
                "can .lower() and .compile() but not run. Build it from models.build(cfg, "
                "rngs=...) to run it."
            )
        prompt_BT = jax.device_put(prompt_BT, self._prompt_sharding)
        tokens_BN, self.cache = self._program(self.params, self.cache, prompt_BT)
        return tokens_BN

    def lower(self, prompt_BT: jax.Array | jax.ShapeDtypeStruct) -> jax.stages.Lowered:
        """The generation program lowered for this prompt (an array or ShapeDtypeStruct)."""
        self._check_prompt(prompt_BT)
        prompt_BT = jax.ShapeDtypeStruct(
            prompt_BT.shape, prompt_BT.dtype, sharding=self._prompt_sharding
        )
        cache = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.cache
        )
        return self._program.lower(self.params, cache, prompt_BT)

    def compile(self, prompt_BT: jax.Array | jax.ShapeDtypeStruct) -> jax.stages.Compiled:
        """``lower(prompt).compile()``: e.g. ``.memory_analysis()`` or ``.as_text()``."""
        return self.lower(prompt_BT).compile()

    def kv_cache_bytes_per_device(self) -> int:
        """Bytes of KV cache (keys and values) on the device holding the most, measured from
        the placed cache's shards (from its shardings when the model is abstract)."""
        per_device: dict[Any, int] = {}
        for a in jax.tree.leaves((self.cache.keys, self.cache.values)):
            if isinstance(a, jax.ShapeDtypeStruct):
                shard = math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                for d in a.sharding.device_set:
                    per_device[d] = per_device.get(d, 0) + shard
            else:
                for s in a.addressable_shards:
                    per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
        return max(per_device.values())

    def _check_prompt(self, prompt_BT: Any) -> None:
        check_example(prompt_BT, self.prompt, f"This {self.name} generator", "prompts",
                      "generator")

    def __repr__(self) -> str:
        return (
            f"GenerationBaseline({self.name}: mesh pp={self.mesh.shape[PP]} x "
            f"tp={self.mesh.shape[TP]}, "
            f"prompt {self.prompt.dtype}{list(self.prompt.shape)}, "
            f"max_new_tokens={self.max_new_tokens}, microbatches={self.num_microbatches}\n  "
            + self.layout.replace("\n", "\n  ")
            + ")"
        )


def tp_pp_generate(
    model: nnx.Module,
    prompt: jax.Array | jax.ShapeDtypeStruct,
    *,
    max_new_tokens: int,
    devices: Sequence[jax.Device] | None = None,
    tp: int = 8,
    pp: int = 2,
    microbatches: int | None = None,
) -> GenerationBaseline:
    """Greedy decoding with Megatron TP over "tp", GPipe PP over "pp" and a sharded KV cache.

    See the module docstring for the layout. Tokens equal ``models.generate(model, prompt,
    max_new_tokens)`` unless float rounding (the row-parallel all-reduces sum in another
    order) flips an argmax between near-tied logits.

    Args:
        model: an ``lwjax.models`` DenseTransformer or MoETransformer (built or abstract).
        prompt: example int prompt [B, T]; calls must have this shape and dtype.
        max_new_tokens: tokens to generate per call (N >= 1); the cache holds T + N positions.
        devices: pp * tp distinct devices, stage-major (devices[s * tp + j] is stage s, tp
            rank j); None takes the first pp * tp of ``jax.devices()``.
        tp: tensor-parallel degree; divides the heads, the MLP width F (dense), the experts
            (MoE) and the vocabulary.
        pp: pipeline stages; divides the number of layers.
        microbatches: GPipe microbatches M; divides the batch. None means pp.

    Returns:
        A ``GenerationBaseline`` whose weights and KV cache already sit on the mesh.

    Raises:
        ConfigError: bad tp / pp / microbatches, or a model these degrees do not divide.
        DeviceError: wrong number of devices, or duplicates.
        InputError: a prompt that is not [B, T] integers, a batch M does not divide, or a
            max_new_tokens that is not a positive integer.

    Example:
        >>> model = models.build(models.configs.tiny_moe(), rngs=nnx.Rngs(0))
        >>> prompt = jnp.zeros((4, 8), jnp.int32)
        >>> g = tp_pp_generate(model, prompt, max_new_tokens=5, tp=2, pp=2, microbatches=4)
        >>> g(prompt).shape, g.kv_cache_bytes_per_device()  # 2 layers x K,V x 4 x 13 x 2 x 16 x 4
        ((4, 5), 26624)
    """
    cfg = _model_config(model)
    max_new_tokens = _max_new_tokens(max_new_tokens)
    tp, pp = _positive("tp", tp), _positive("pp", pp)
    num_microbatches = pp if microbatches is None else _positive("microbatches", microbatches)
    _check_divisible(cfg, tp, pp)
    batch, prompt_len = _token_shape(prompt)
    if batch % num_microbatches:
        raise InputError(
            f"Batch {batch} is not divisible by microbatches={num_microbatches}; pass a "
            f"microbatch count that divides {batch} (e.g. {_divisor_near(batch, pp)})."
        )
    mesh = Mesh(np.array(_device_list(devices, tp * pp)).reshape(pp, tp), (PP, TP))
    max_len = prompt_len + max_new_tokens

    params = _place_params(model, mesh)
    cache_sharding = NamedSharding(mesh, _CACHE_SPEC)
    cache_shape = (pp, cfg.num_layers // pp, batch, max_len, cfg.num_heads, cfg.head_dim)
    abstract = _is_abstract(params)
    cache = StageKVCache(
        keys=_zeros(cache_shape, cfg.dtype, cache_sharding, abstract),
        values=_zeros(cache_shape, cfg.dtype, cache_sharding, abstract),
    )
    head_batch_axis = PP if batch % pp == 0 else None
    weights = _describe(cfg, mesh, num_microbatches, batch, head_batch_axis)
    layout = weights.rsplit("; logits", 1)[0] + (  # the head's logits are [B, V] here
        f"; logits [B, V] P({head_batch_axis!r}, {TP!r}) of the last position, greedy argmax"
        f"\nKV cache: keys, values [pp, {cfg.num_layers // pp}, {batch}, max_len={max_len}, "
        f"{cfg.num_heads}, {cfg.head_dim}] {cfg.dtype.name} on {_CACHE_SPEC}, allocated once, "
        f"donated and updated in place\none program: prefill + {max_new_tokens - 1} decode "
        f"steps in a lax.scan, each a GPipe pass of {num_microbatches + pp - 1} ticks"
    )
    return GenerationBaseline(
        name="tp_pp",
        mesh=mesh,
        params=params,
        prompt=jax.ShapeDtypeStruct((batch, prompt_len), prompt.dtype),
        max_new_tokens=max_new_tokens,
        num_microbatches=num_microbatches,
        layout=layout,
        cache=cache,
        _program=_tp_pp_program(model, mesh, num_microbatches, prompt_len, max_new_tokens),
        _prompt_sharding=NamedSharding(mesh, P()),
    )


def single_device_generate(
    model: nnx.Module,
    prompt: jax.Array | jax.ShapeDtypeStruct,
    *,
    max_new_tokens: int,
    device: jax.Device | None = None,
) -> GenerationBaseline:
    """``models.generate`` jitted once on one device: the reference generators are timed
    against (a call runs the compiled program; compilation happens on the first call).

    Args:
        model: an ``lwjax.models`` transformer (built or abstract).
        prompt: example int prompt [B, T]; calls must have this shape and dtype.
        max_new_tokens: tokens to generate per call (N >= 1); the cache holds T + N positions.
        device: where weights and cache live; None means ``jax.devices()[0]``.

    Returns:
        A ``GenerationBaseline`` on a 1 x 1 ("pp", "tp") mesh.

    Raises:
        InputError: a prompt that is not [B, T] integers, or a max_new_tokens that is not a
            positive integer.

    Example:
        >>> model = models.build(models.configs.tiny_dense(), rngs=nnx.Rngs(0))
        >>> prompt = jnp.zeros((4, 8), jnp.int32)
        >>> ref = single_device_generate(model, prompt, max_new_tokens=5)
        >>> ref(prompt).shape
        (4, 5)
    """
    cfg = _model_config(model)
    max_new_tokens = _max_new_tokens(max_new_tokens)
    batch, prompt_len = _token_shape(prompt)
    device = jax.devices()[0] if device is None else device
    mesh = Mesh(np.array([device]).reshape(1, 1), (PP, TP))
    sharding = NamedSharding(mesh, P())
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda a: _place(a, sharding), state)
    max_len = prompt_len + max_new_tokens
    abstract = _is_abstract(params)
    shape = (batch, max_len, cfg.num_heads, cfg.head_dim)
    cache = KVCache(
        keys=tuple(_zeros(shape, cfg.dtype, sharding, abstract) for _ in range(cfg.num_layers)),
        values=tuple(_zeros(shape, cfg.dtype, sharding, abstract) for _ in range(cfg.num_layers)),
        length=_place(jax.ShapeDtypeStruct((), jnp.int32), sharding)
        if abstract
        else jax.device_put(jnp.int32(0), sharding),
    )

    def generate(params, cache, prompt_BT):
        # models.generate with the cache passed in: prefill is forward_with_cache from length 0.
        m = nnx.merge(graphdef, params)
        logits, cache = m.forward_with_cache(prompt_BT, cache.replace(length=jnp.int32(0)))
        first_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        def decode(carry, _):
            token_B, cache = carry
            logits, cache = m.decode_step(token_B[:, None], cache)
            return (jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache), token_B

        (last_B, cache), tokens_NB = lax.scan(
            decode, (first_B, cache), None, length=max_new_tokens - 1
        )
        return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1), cache

    return GenerationBaseline(
        name="single_device",
        mesh=mesh,
        params=params,
        prompt=jax.ShapeDtypeStruct((batch, prompt_len), prompt.dtype),
        max_new_tokens=max_new_tokens,
        num_microbatches=1,
        layout=f"all {cfg.num_layers} layers, embedding, head and KV cache (max_len={max_len}) "
        f"on {device}",
        cache=cache,
        _program=jax.jit(generate, donate_argnums=1, out_shardings=sharding),
        _prompt_sharding=sharding,
    )


# ---- the pipeline ---------------------------------------------------------------------------


def _tp_pp_program(
    model: nnx.Module, mesh: Mesh, num_microbatches: int, prompt_len: int, max_new_tokens: int
) -> Callable:
    """The jitted ``(params, cache, prompt) -> (new tokens, cache)`` of ``tp_pp_generate``,
    donating the cache: the prefill, then a ``lax.scan`` of max_new_tokens - 1 decode steps."""
    cfg = model.cfg
    pp = mesh.shape[PP]
    block_graphdef, _ = nnx.split(model.layers[0])
    norm_graphdef, _ = nnx.split(model.final_norm)
    last = pp - 1
    pipeline = jax.shard_map(
        _gpipe_with_cache(block_graphdef, pp, num_microbatches),
        mesh=mesh,
        in_specs=(P(PP), P(PP), P(), P()),  # only "pp" is manual: "tp" shardings ride along
        out_specs=(P(PP), P(PP)),
        axis_names={PP},
    )
    replicated = NamedSharding(mesh, P())

    def step(params, cache, tokens_BT, length):
        """One GPipe pass of T tokens per sequence at positions length..: (next [B], cache)."""
        b, t, d = *tokens_BT.shape, cfg.hidden_size
        head_batch_axis = PP if b % pp == 0 else None
        x_BTD = jnp.take(params["embed"], tokens_BT, axis=0)
        x_MBTD = lax.with_sharding_constraint(
            x_BTD.reshape(num_microbatches, b // num_microbatches, t, d), replicated
        )
        out_MBD, cache = pipeline(params["blocks"], cache, x_MBTD, length)
        y_BD = out_MBD[last * num_microbatches :].reshape(b, d)  # the last stage's
        y_BD = lax.with_sharding_constraint(y_BD, NamedSharding(mesh, P(head_batch_axis)))
        y_BD = nnx.merge(norm_graphdef, params["final_norm"])(y_BD)
        w_DV = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        logits_BV = lax.with_sharding_constraint(
            y_BD @ w_DV, NamedSharding(mesh, P(head_batch_axis, TP))
        )
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), cache

    def generate(params, cache, prompt_BT):
        first_B, cache = step(params, cache, prompt_BT, jnp.int32(0))

        def decode(carry, _):
            token_B, cache, length = carry
            next_B, cache = step(params, cache, token_B[:, None], length)
            return (next_B, cache, length + 1), token_B

        init = (first_B, cache, jnp.int32(prompt_len))
        (last_B, cache, _), tokens_NB = lax.scan(decode, init, length=max_new_tokens - 1)
        return jnp.concatenate([tokens_NB.T, last_B[:, None]], axis=1), cache

    cache_sharding = NamedSharding(mesh, _CACHE_SPEC)
    return jax.jit(
        generate,
        donate_argnums=1,
        out_shardings=(replicated, StageKVCache(cache_sharding, cache_sharding)),
    )


def _gpipe_with_cache(
    block_graphdef: nnx.GraphDef, num_stages: int, num_microbatches: int
) -> Callable:
    """One GPipe pass (fill, steady state, drain) against the KV cache, for ``shard_map``
    over "pp".

    Each device gets its stage's blocks [1, L/pp, ...], its stage's cache [1, L/pp, B,
    max_len, N, H], all microbatches x [M, B/M, T, D] and the cache length; it returns the
    last position's outputs [M, B/M, D] (meaningful on the last stage only) and its updated
    cache.
    """
    last = num_stages - 1
    to_next_stage = [(s, s + 1) for s in range(last)]

    def run_stage(stage_blocks, cache, x_BTD, microbatch, active, length):
        """The stage's layers on one microbatch; writes its T new cache positions if active."""
        b, t = x_BTD.shape[:2]
        positions_T = length + jnp.arange(t)
        row = microbatch * b  # the microbatch's first sequence in the cache's batch axis

        def layer(carry, inputs):
            x_BTD, keys, values = carry
            block_state, i = inputs
            # Layer i's cache for the microbatch's b sequences: [b, max_len, N, H].
            k_BLNH, v_BLNH = (
                lax.dynamic_slice(a, (i, row, 0, 0, 0), (1, b, *a.shape[2:]))[0]
                for a in (keys, values)
            )
            x_BTD, (k_BLNH, v_BLNH), _ = nnx.merge(block_graphdef, block_state)(
                x_BTD, positions_T, (k_BLNH, v_BLNH), length
            )

            def write(cache, updated_BLNH):
                # Only the T new positions change; idle (fill / drain) ticks keep the old ones.
                new = lax.dynamic_slice_in_dim(updated_BLNH, length, t, axis=1)[None]
                start = (i, row, length, 0, 0)
                old = lax.dynamic_slice(cache, start, new.shape)
                return lax.dynamic_update_slice(cache, jnp.where(active, new, old), start)

            return (x_BTD, write(keys, k_BLNH), write(values, v_BLNH)), None

        layers = jnp.arange(jax.tree.leaves(stage_blocks)[0].shape[0])
        (x_BTD, keys, values), _ = lax.scan(
            layer, (x_BTD, cache.keys, cache.values), (stage_blocks, layers)
        )
        return x_BTD, StageKVCache(keys, values)

    def pipeline(blocks, cache, x_MBTD, length):
        stage_blocks = jax.tree.map(lambda a: a[0], blocks)  # [1, L/pp, ...] -> [L/pp, ...]
        cache = jax.tree.map(lambda a: a[0], cache)
        stage = lax.axis_index(PP)

        def tick(carry, t):
            received_BTD, out_MBD, cache = carry
            # Stage 0 starts microbatch t (ticks past M only drain); the others take what
            # the previous stage sent at the end of tick t - 1.
            x_BTD = jnp.where(
                stage == 0, x_MBTD[jnp.minimum(t, num_microbatches - 1)], received_BTD
            )
            microbatch = t - stage
            active = (microbatch >= 0) & (microbatch < num_microbatches)
            microbatch = jnp.clip(microbatch, 0, num_microbatches - 1)
            y_BTD, cache = run_stage(stage_blocks, cache, x_BTD, microbatch, active, length)
            # Microbatch t - last leaves the last stage at tick t. Earlier ticks write slot 0,
            # which tick `last` overwrites; other stages' buffers are never read.
            slot = jnp.clip(t - last, 0, num_microbatches - 1)
            out_MBD = lax.dynamic_update_index_in_dim(out_MBD, y_BTD[:, -1], slot, 0)
            return (lax.ppermute(y_BTD, PP, to_next_stage), out_MBD, cache), None

        init = lax.pcast(
            (jnp.zeros_like(x_MBTD[0]), jnp.zeros_like(x_MBTD[:, :, -1])), PP, to="varying"
        )
        (_, out_MBD, cache), _ = lax.scan(tick, (*init, cache), jnp.arange(num_microbatches + last))
        return out_MBD, jax.tree.map(lambda a: a[None], cache)

    return pipeline


# ---- checks and small helpers -----------------------------------------------------------------


def _max_new_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InputError(
            f"max_new_tokens must be a positive integer (tokens to generate per call), got "
            f"{value!r}."
        )
    return int(value)


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding, abstract: bool) -> Any:
    """A zero cache buffer created in place on its devices (a ShapeDtypeStruct if abstract)."""
    if abstract:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
