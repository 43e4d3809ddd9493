"""Building blocks of lwjax's transformers (Flax NNX): RMSNorm, rotary attention, gated MLP.

Weights keep their head structure (q: D x N x H, out: N x H x D) so that a pass can split a
layer over heads and hidden dims (seed document 002's m x n scheme) by slicing axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lwjax.models.configs import DenseConfig


def _init(fan_in: int):
    return nnx.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale; statistics in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv).astype(x_BTD.dtype) * self.scale[...]


def rotary(x_BTNH: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
    """Applies rotary position embeddings (half-split form) at the given positions."""
    half = x_BTNH.shape[-1] // 2
    freq_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_TH = positions_T.astype(jnp.float32)[:, None] * freq_h[None, :]
    sin, cos = jnp.sin(angle_TH)[None, :, None, :], jnp.cos(angle_TH)[None, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        d, n, h, dt = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.dtype
        self.q = nnx.Param(_init(d)(rngs.params(), (d, n, h), dt))
        self.k = nnx.Param(_init(d)(rngs.params(), (d, n, h), dt))
        self.v = nnx.Param(_init(d)(rngs.params(), (d, n, h), dt))
        self.out = nnx.Param(_init(n * h)(rngs.params(), (n, h, d), dt))
        self.rope_theta = cfg.rope_theta
        self.implementation = cfg.attention_impl

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_T: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attends causally; with ``kv`` (K, V caches [B, L, N, H]) writes the new keys at
        ``cache_index`` and attends over the cache. Returns (output, updated kv or None)."""
        q = rotary(jnp.einsum("btd,dnh->btnh", x_BTD, self.q[...]), positions_T, self.rope_theta)
        k = rotary(jnp.einsum("btd,dnh->btnh", x_BTD, self.k[...]), positions_T, self.rope_theta)
        v = jnp.einsum("btd,dnh->btnh", x_BTD, self.v[...])
        if kv is None:
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                             implementation=self.implementation)
            new_kv = None
        else:
            k_cache, v_cache = kv
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype),
                                                          cache_index, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype),
                                                          cache_index, axis=1)
            key_pos_L = jnp.arange(k_cache.shape[1])
            mask_TL = key_pos_L[None, :] <= positions_T[:, None]
            # A padded cache needs an explicit mask; the fused cuDNN path takes no such mask.
            o = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask_TL[None, None],
                                             implementation="xla")
            new_kv = (k_cache, v_cache)
        return jnp.einsum("btnh,nhd->btd", o, self.out[...]), new_kv


class GatedMLP(nnx.Module):
    """SiLU-gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DenseConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.hidden_size, cfg.mlp_hidden_size, cfg.dtype
        self.gate = nnx.Param(_init(d)(rngs.params(), (d, f), dt))
        self.up = nnx.Param(_init(d)(rngs.params(), (d, f), dt))
        self.down = nnx.Param(_init(f)(rngs.params(), (f, d), dt))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h = jax.nn.silu(x_BTD @ self.gate[...]) * (x_BTD @ self.up[...])
        return h @ self.down[...]
