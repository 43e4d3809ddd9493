"""Dense and MoE decoder-only transformers (Flax NNX) with a KV cache.

Every block runs under ``jax.named_scope(f"layers_{i}")``, the embedding under ``"embed"`` and
the final norm + LM head under ``"head"``: lwjax's passes find layer boundaries from these
name stacks.

Example:
    >>> from flax import nnx
    >>> from lwjax import models
    >>> cfg = models.configs.tiny_dense()
    >>> model = models.build(cfg, rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
    >>> model(tokens).shape
    (4, 16, 256)
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwjax.errors import InputError
from lwjax.models.configs import DenseConfig, MoEConfig
from lwjax.models.layers import Attention, GatedMLP, RMSNorm, _init
from lwjax.models.moe import MoEMLP, MoEStats


@flax.struct.dataclass
class KVCache:
    """Per-layer key/value caches and the number of positions already written.

    Attributes:
        keys: one [B, L, N, H] array per layer.
        values: one [B, L, N, H] array per layer.
        length: int32 scalar, positions 0..length-1 are filled.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)); then x + mlp(norm(x)). MLP dense or MoE."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=cfg.dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=cfg.dtype)
        is_moe = isinstance(cfg, MoEConfig)
        self.mlp = MoEMLP(cfg, rngs=rngs) if is_moe else GatedMLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, positions_T, kv=None, cache_index=None):
        """Returns (x, updated kv or None, MoEStats or None)."""
        a, kv = self.attn(self.attn_norm(x_BTD), positions_T, kv, cache_index)
        x_BTD = x_BTD + a
        m = self.mlp(self.mlp_norm(x_BTD))
        stats = None
        if isinstance(m, tuple):
            m, stats = m
        return x_BTD + m, kv, stats


class Transformer(nnx.Module):
    """Token embedding -> num_layers blocks -> final RMSNorm -> LM head.

    Call with int32 tokens [B, T] for logits [B, T, V]. ``init_cache`` / ``prefill`` /
    ``decode_step`` run the same weights against a KV cache; ``generate`` decodes greedily.
    """

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            nnx.initializers.normal(1.0)(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                         cfg.dtype))
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=cfg.dtype)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(
                _init(cfg.hidden_size)(rngs.params(), (cfg.hidden_size, cfg.vocab_size),
                                       cfg.dtype))

    # -- pieces, each under its own scope ------------------------------------------------
    def _embed(self, tokens_BT):
        with jax.named_scope("embed"):
            return jnp.take(self.embed[...], tokens_BT, axis=0)

    def _head(self, x_BTD):
        with jax.named_scope("head"):
            x_BTD = self.final_norm(x_BTD)
            w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
            return x_BTD @ w

    def _run(self, tokens_BT, positions_T, cache: KVCache | None, with_aux: bool = False):
        x = self._embed(tokens_BT)
        keys, values, stats = [], [], []
        # with_aux: a running sum of the blocks' per-sequence balancing losses, added inside
        # each block's scope so that every block is alike and one [B] value crosses stages
        aux_B = jnp.zeros((tokens_BT.shape[0],), jnp.float32) if with_aux else None
        for i, block in enumerate(self.layers):
            with jax.named_scope(f"layers_{i}"):
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                x, kv, s = block(x, positions_T, kv, None if cache is None else cache.length)
                if with_aux:
                    aux_B = aux_B + s.load_balancing_B
            if kv is not None:
                keys.append(kv[0])
                values.append(kv[1])
            if s is not None:
                stats.append(s)
        logits = self._head(x)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(keys), tuple(values),
                                cache.length + jnp.int32(tokens_BT.shape[1]))
        return logits, new_cache, stats, aux_B

    # -- public --------------------------------------------------------------------------
    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        check_tokens(tokens_BT, f"{type(self).__name__}(tokens)")
        logits, _, _, _ = self._run(tokens_BT, jnp.arange(tokens_BT.shape[1]), None)
        return logits

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache holding up to ``max_len`` positions per sequence."""
        shape = (batch_size, max_len, self.cfg.num_heads, self.cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, self.cfg.dtype) for _ in range(self.cfg.num_layers))
        return KVCache(zeros, zeros, jnp.int32(0))

    def forward_with_cache(self, tokens_BT: jax.Array, cache: KVCache):
        """Runs T new tokens at positions cache.length.. against the cache.

        Returns (logits [B, T, V], updated cache). The caller keeps length + T <= max_len.
        """
        where = f"{type(self).__name__}.forward_with_cache(tokens, cache)"
        check_tokens(tokens_BT, where)
        _check_cache(cache, tokens_BT, where)
        return self._forward(tokens_BT, cache)

    def prefill(self, tokens_BT: jax.Array, max_len: int):
        """Fills a fresh cache with a prompt. Returns (logits [B, T, V], cache)."""
        where = f"{type(self).__name__}.prefill(tokens, max_len)"
        check_tokens(tokens_BT, where)
        if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer):
            raise InputError(f"{where}: max_len must be an integer number of cache positions, "
                             f"got {max_len!r}.")
        if tokens_BT.shape[1] > max_len:
            raise InputError(
                f"{where}: prompt length {tokens_BT.shape[1]} exceeds the cache's max_len "
                f"{max_len}; raise max_len."
            )
        return self._forward(tokens_BT, self.init_cache(tokens_BT.shape[0], int(max_len)))

    def decode_step(self, token_B1: jax.Array, cache: KVCache):
        """One new token per sequence -> (logits [B, 1, V], updated cache)."""
        where = f"{type(self).__name__}.decode_step(token, cache)"
        check_tokens(token_B1, where, name="token", shape="[batch, 1]",
                     rank1_fix="add the position axis: token[:, None] (one new token per "
                               "sequence)")
        _check_cache(cache, token_B1, where)
        return self._forward(token_B1, cache)

    def _forward(self, tokens_BT: jax.Array, cache: KVCache):
        positions_T = cache.length + jnp.arange(tokens_BT.shape[1])
        logits, cache, _, _ = self._run(tokens_BT, positions_T, cache)
        return logits, cache


class DenseTransformer(Transformer):
    """Transformer with dense gated-MLP blocks (config: DenseConfig)."""


class MoETransformer(Transformer):
    """Transformer whose block MLPs are mixtures of experts (config: MoEConfig)."""

    def with_stats(self, tokens_BT: jax.Array) -> tuple[jax.Array, MoEStats]:
        """Logits and routing statistics summed over blocks.

        ``stats.load_balancing_loss`` (Switch-style, mean over blocks) times
        ``cfg.aux_loss_weight`` is the auxiliary loss to add when training; ``stats.dropped``
        counts (token, choice) pairs that exceeded expert capacity.
        """
        check_tokens(tokens_BT, f"{type(self).__name__}.with_stats(tokens)")
        logits, _, stats, _ = self._run(tokens_BT, jnp.arange(tokens_BT.shape[1]), None)
        total = MoEStats(
            load_balancing_loss=jnp.mean(jnp.stack([s.load_balancing_loss for s in stats])),
            dropped=jnp.sum(jnp.stack([s.dropped for s in stats])),
            load_balancing_B=jnp.mean(jnp.stack([s.load_balancing_B for s in stats]), axis=0),
        )
        return logits, total

    def __call__(self, tokens_BT: jax.Array, with_aux: bool = False):
        """Logits [B, T, V]; with ``with_aux=True``, ``(logits, aux_B)``: each sequence's
        auxiliary loss, ``cfg.aux_loss_weight`` times its Switch load-balancing loss averaged
        over the blocks (``moe.sequence_balancing_loss``).

        This is how a model hands a training loss its auxiliary term through a pipeline: as a
        per-example output, which splits into microbatches like the logits. A loss adds it::

            def loss_fn(outputs, targets_BT):
                logits, aux_B = outputs
                return cross_entropy(logits, targets_BT) + aux_B.mean()
        """
        if not with_aux:
            return super().__call__(tokens_BT)
        check_tokens(tokens_BT, f"{type(self).__name__}(tokens, with_aux=True)")
        logits, _, _, aux_B = self._run(tokens_BT, jnp.arange(tokens_BT.shape[1]), None,
                                        with_aux=True)
        return logits, aux_B * (self.cfg.aux_loss_weight / self.cfg.num_layers)


def check_tokens(tokens, where: str, *, name: str = "tokens", shape: str = "[batch, seq]",
                 rank1_fix: str | None = None) -> None:
    """InputError unless ``tokens`` is an integer array of rank 2 (the model's [B, T]).

    Args:
        tokens: what the caller passed.
        where: the call, for the message (``"DenseTransformer(tokens)"``).
        name: the argument's name in the message.
        shape: the expected shape in words.
        rank1_fix: how to fix a rank-1 array (default: add the batch axis, ``{name}[None]``).

    Example:
        >>> check_tokens(jnp.zeros((16,), jnp.int32), "model(tokens)")
        Traceback (most recent call last):
        lwjax.errors.InputError: model(tokens): tokens must be integers of shape [batch, seq]; ...
    """
    ndim, dtype = getattr(tokens, "ndim", None), getattr(tokens, "dtype", None)
    if ndim == 2 and dtype is not None and jnp.issubdtype(dtype, jnp.integer):
        return
    if ndim is None or dtype is None:
        got = f"a {type(tokens).__name__}"
        fix = f"pass a jax or numpy array, e.g. jnp.asarray({name}, jnp.int32) with shape {shape}"
    else:
        got = f"{dtype} of shape {tuple(tokens.shape)} (rank {ndim})"
        if ndim == 1:
            fix = rank1_fix or f"add the batch axis: {name}[None] (a batch of one sequence)"
        elif ndim == 2:
            fix = f"convert it: {name}.astype(jnp.int32)"
        else:
            fix = f"pass e.g. jnp.zeros({_example(shape)}, jnp.int32)"
    raise InputError(f"{where}: {name} must be integers of shape {shape}; got {got}. "
                     f"{fix[0].upper()}{fix[1:]}.")


def _example(shape: str) -> str:
    """'[batch, seq]' -> '(batch, seq)'."""
    return "(" + shape.strip("[]") + ")"


def _check_cache(cache, tokens_BT, where: str) -> None:
    """InputError unless ``cache`` is a KVCache for the same batch as ``tokens_BT``."""
    if not isinstance(cache, KVCache):
        raise InputError(f"{where}: cache must be the KVCache that init_cache or prefill "
                         f"returned, got a {type(cache).__name__}.")
    batch = cache.keys[0].shape[0] if cache.keys else tokens_BT.shape[0]
    if batch != tokens_BT.shape[0]:
        raise InputError(f"{where}: the cache holds {batch} sequences but the tokens have "
                         f"batch {tokens_BT.shape[0]}; pass one token row per cached sequence.")


def generate(model: Transformer, prompt_BT: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy decoding: prefill the prompt, then one decode step per new token (jitted).

    Returns the new tokens [B, max_new_tokens].

    Example:
        >>> out = generate(model, tokens, 3)
        >>> out.shape
        (4, 3)
    """
    check_tokens(prompt_BT, "generate(model, prompt, max_new_tokens)", name="prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) \
            or max_new_tokens < 1:
        raise InputError(f"generate: max_new_tokens must be a positive integer, got "
                         f"{max_new_tokens!r}.")
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, prompt_BT, max_new_tokens)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _greedy(graphdef, state, prompt_BT, max_new_tokens: int) -> jax.Array:
    """generate's program, compiled once per model structure, shapes and lengths."""
    m = nnx.merge(graphdef, state)
    logits, cache = m.prefill(prompt_BT, prompt_BT.shape[1] + max_new_tokens)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        token_B, cache = carry
        logits, cache = m.decode_step(token_B[:, None], cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, cache), token_B

    (last, _), toks = jax.lax.scan(step, (first, cache), None, length=max_new_tokens - 1)
    return jnp.concatenate([toks.T, last[:, None]], axis=1)
