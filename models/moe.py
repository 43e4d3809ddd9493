"""Mixture-of-experts MLP with real top-k dispatch and per-sequence expert capacity.

Routing happens within each sequence (a GShard "group"), so a model's answer for one sequence
never depends on which other sequences share its batch -- splitting a batch into pipeline
microbatches leaves the result unchanged.

Dispatch, per sequence of T tokens with E experts, k choices and capacity C:
1. router logits (float32) -> softmax -> top-k experts and their probabilities, renormalised
   over the k choices;
2. slots are filled choice-major (every token's first choice, in token order, then every
   second choice, ...): a choice's position in its expert's queue is a cumulative count;
3. choices at position >= C are dropped: that token gets no output from that expert (its
   residual carries it), and ``MoEStats.dropped`` counts it;
4. kept tokens are gathered into an [E, C, D] buffer (empty slots read a zero row), each
   expert runs its gated MLP on its own C rows only, and the outputs are scattered back,
   weighted by the routing probabilities.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from lwjax.models.configs import MoEConfig
from lwjax.models.layers import _init


@flax.struct.dataclass
class Routing:
    """Top-k routing of a batch of sequences.

    Attributes:
        expert_BTK: chosen expert per token and choice.
        weight_BTK: renormalised routing probability of each choice.
        position_BTK: the choice's slot in its expert's queue (within its sequence).
        kept_BTK: whether the choice fit within capacity.
        token_BEC: token index filling each expert slot; T (one past the end) marks an empty slot.
        weight_BEC: routing weight of each slot (0 for empty slots).
    """

    expert_BTK: jax.Array
    weight_BTK: jax.Array
    position_BTK: jax.Array
    kept_BTK: jax.Array
    token_BEC: jax.Array
    weight_BEC: jax.Array


@flax.struct.dataclass
class MoEStats:
    """Per-call routing statistics: load-balancing loss (over the batch, and per sequence)
    and dropped (token, choice) pairs."""

    load_balancing_loss: jax.Array
    dropped: jax.Array
    load_balancing_B: jax.Array


def route(logits_BTE: jax.Array, k: int, capacity: int) -> Routing:
    """Top-k routing with per-sequence capacity (see the module docstring).

    Example:
        >>> r = route(jnp.zeros((1, 4, 2)), k=1, capacity=2)
        >>> int(r.kept_BTK.sum())   # 4 tokens, 2 experts x 2 slots: all fit
        4
    """
    b, t, e = logits_BTE.shape
    probs = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    weight_BTK, expert_BTK = jax.lax.top_k(probs, k)
    weight_BTK = weight_BTK / jnp.sum(weight_BTK, axis=-1, keepdims=True)
    # Choice-major priority: order (choice, token), count earlier claims on the same expert.
    onehot_BKTE = jax.nn.one_hot(jnp.swapaxes(expert_BTK, 1, 2), e, dtype=jnp.int32)
    flat = onehot_BKTE.reshape(b, k * t, e)
    position_flat = jnp.sum((jnp.cumsum(flat, axis=1) - 1) * flat, axis=-1)
    position_BTK = jnp.swapaxes(position_flat.reshape(b, k, t), 1, 2)
    kept_BTK = position_BTK < capacity
    # Scatter token ids into [E*C] slots; dropped choices point past the end and are ignored.
    slot_BTK = jnp.where(kept_BTK, expert_BTK * capacity + position_BTK, e * capacity)
    token_BTK = jnp.broadcast_to(jnp.arange(t)[None, :, None], (b, t, k))
    rows = jnp.arange(b)[:, None]
    token_BS = jnp.full((b, e * capacity), t, jnp.int32).at[rows, slot_BTK.reshape(b, -1)].set(
        token_BTK.reshape(b, -1), mode="drop")
    weight_BS = jnp.zeros((b, e * capacity), weight_BTK.dtype).at[
        rows, slot_BTK.reshape(b, -1)].set(weight_BTK.reshape(b, -1), mode="drop")
    return Routing(
        expert_BTK=expert_BTK,
        weight_BTK=weight_BTK,
        position_BTK=position_BTK,
        kept_BTK=kept_BTK,
        token_BEC=token_BS.reshape(b, e, capacity),
        weight_BEC=weight_BS.reshape(b, e, capacity),
    )


def load_balancing_loss(logits_BTE: jax.Array, expert_BTK: jax.Array) -> jax.Array:
    """Switch-Transformer auxiliary loss: E * sum_e (share of choices to e) * (mean prob of e)."""
    e = logits_BTE.shape[-1]
    probs = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    share_E = jnp.mean(jax.nn.one_hot(expert_BTK, e, dtype=jnp.float32), axis=(0, 1, 2))
    return e * jnp.sum(share_E * jnp.mean(probs, axis=(0, 1)))


def sequence_balancing_loss(logits_BTE: jax.Array, expert_BTK: jax.Array) -> jax.Array:
    """The Switch loss of each sequence on its own tokens, [B]: routing is per sequence
    (module docstring), so balance is measured where it is enforced, and a batch's loss is
    the mean of its sequences' -- a per-example loss, which a pipeline can split into
    microbatches without changing it (the batch-wide ``load_balancing_loss`` cannot).

    Example:
        >>> sequence_balancing_loss(jnp.zeros((2, 4, 2)), jnp.zeros((2, 4, 1), jnp.int32))
        Array([1., 1.], dtype=float32)
    """
    e = logits_BTE.shape[-1]
    probs = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    share_BE = jnp.mean(jax.nn.one_hot(expert_BTK, e, dtype=jnp.float32), axis=(1, 2))
    return e * jnp.sum(share_BE * jnp.mean(probs, axis=1), axis=-1)


class MoEMLP(nnx.Module):
    """E gated-MLP experts (weights stacked on a leading expert axis) behind a learned router."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        d, f, e, dt = cfg.hidden_size, cfg.mlp_hidden_size, cfg.num_experts, cfg.dtype
        self.router = nnx.Param(_init(d)(rngs.params(), (d, e), dt))
        self.gate = nnx.Param(_init(d)(rngs.params(), (e, d, f), dt))
        self.up = nnx.Param(_init(d)(rngs.params(), (e, d, f), dt))
        self.down = nnx.Param(_init(f)(rngs.params(), (e, f, d), dt))
        self.cfg = cfg

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, MoEStats]:
        b, t, d = x_BTD.shape
        logits_BTE = x_BTD @ self.router[...]
        r = route(logits_BTE, self.cfg.experts_per_token, self.cfg.capacity(t))
        # Gather: a zero row at index T stands for empty slots.
        x_pad = jnp.concatenate([x_BTD, jnp.zeros((b, 1, d), x_BTD.dtype)], axis=1)
        xe_BECD = jnp.take_along_axis(x_pad[:, None], r.token_BEC[..., None], axis=2)
        h = jax.nn.silu(jnp.einsum("becd,edf->becf", xe_BECD, self.gate[...])) * jnp.einsum(
            "becd,edf->becf", xe_BECD, self.up[...])
        ye_BECD = jnp.einsum("becf,efd->becd", h, self.down[...])
        ye_BECD = ye_BECD * r.weight_BEC[..., None].astype(ye_BECD.dtype)
        rows = jnp.arange(b)[:, None]
        y_pad = jnp.zeros((b, t + 1, d), ye_BECD.dtype).at[rows, r.token_BEC.reshape(b, -1)].add(
            ye_BECD.reshape(b, -1, d))
        stats = MoEStats(
            load_balancing_loss=load_balancing_loss(logits_BTE, r.expert_BTK),
            dropped=jnp.sum(~r.kept_BTK).astype(jnp.int32),
            load_balancing_B=sequence_balancing_loss(logits_BTE, r.expert_BTK),
        )
        return y_pad[:, :t], stats
