"""Model configurations: frozen, validated dataclasses and the seed documents' presets.

Vocabulary size: the source documents never state one. lwjax uses 32,000 (the size of the
Llama / Llama-2 SentencePiece vocabulary), a common choice for 4k-8k hidden transformers.
It only affects the embedding (prologue) and LM head (epilogue), never a transformer block.

Example:
    >>> import dataclasses, jax.numpy as jnp
    >>> from lwjax.models import configs
    >>> cfg = dataclasses.replace(configs.seed_dense(), num_layers=8, dtype=jnp.float32)
    >>> cfg.num_layers, cfg.dtype.name
    (8, 'float32')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
import numpy as np

from lwjax.errors import ConfigError

DEFAULT_VOCAB_SIZE = 32_000
AttentionImpl = Literal["xla", "cudnn"]


def _check_positive(cfg: object, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(
                f"{type(cfg).__name__}.{name} must be a positive integer, got {value!r}."
            )


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """A decoder-only transformer: embedding -> num_layers blocks -> RMSNorm -> LM head.

    Attributes:
        num_layers: number of transformer blocks.
        hidden_size: model width D.
        num_heads: attention heads N.
        head_dim: per-head width H (q/k/v project D -> N*H, the output N*H -> D).
        mlp_hidden_size: gated-MLP width F (gate and up D -> F, down F -> D).
        vocab_size: embedding rows and LM-head columns.
        batch_size: the example batch the experiments use (not a limit on calls).
        seq_len: the example sequence length.
        dtype: stored and compute dtype of parameters and activations.
        attention_impl: ``jax.nn.dot_product_attention`` implementation; None lets JAX pick.
        rope_theta: rotary-embedding base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: use the embedding table as the LM head.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden_size: int
    vocab_size: int = DEFAULT_VOCAB_SIZE
    batch_size: int = 1
    seq_len: int = 128
    dtype: jnp.dtype = jnp.dtype(jnp.float16)
    attention_impl: AttentionImpl | None = None
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "num_layers",
            "hidden_size",
            "num_heads",
            "head_dim",
            "mlp_hidden_size",
            "vocab_size",
            "batch_size",
            "seq_len",
        )
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as e:
            raise ConfigError(f"{type(self).__name__}.dtype {self.dtype!r} is not a dtype.") from e
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ConfigError(
                f"{type(self).__name__}.dtype must be a floating dtype (float16, bfloat16, "
                f"float32), got {dtype.name}."
            )
        object.__setattr__(self, "dtype", dtype)
        if self.head_dim % 2:
            raise ConfigError(
                f"{type(self).__name__}.head_dim must be even for rotary positions, "
                f"got {self.head_dim}."
            )
        if self.attention_impl not in (None, "xla", "cudnn"):
            raise ConfigError(
                f"{type(self).__name__}.attention_impl must be None, 'xla' or 'cudnn', "
                f"got {self.attention_impl!r}."
            )
        if not self.rope_theta > 0:
            raise ConfigError(
                f"{type(self).__name__}.rope_theta must be > 0, got {self.rope_theta}.")
        if not self.norm_eps > 0:
            raise ConfigError(f"{type(self).__name__}.norm_eps must be > 0, got {self.norm_eps}.")

    @property
    def is_moe(self) -> bool:
        return False

    def block_param_count(self) -> int:
        """Weights of one block (attention + MLP + two RMSNorm scales), in closed form."""
        d, nh = self.hidden_size, self.num_heads * self.head_dim
        attention = 4 * d * nh  # q, k, v: D x NH each; out: NH x D
        return attention + self.mlp_param_count() + 2 * d

    def mlp_param_count(self) -> int:
        return 3 * self.hidden_size * self.mlp_hidden_size

    def param_count(self) -> int:
        """All weights: embedding + blocks + final norm + LM head (unless tied)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_embeddings else self.hidden_size * self.vocab_size
        return embed + self.num_layers * self.block_param_count() + self.hidden_size + head


@dataclasses.dataclass(frozen=True)
class MoEConfig(DenseConfig):
    """A transformer whose block MLP is a mixture of gated experts behind a top-k router.

    Attributes:
        num_experts: experts E per block.
        experts_per_token: k, experts each token is routed to.
        capacity_factor: per-sequence expert capacity is
            ``min(T, ceil(capacity_factor * T * k / E))`` tokens for a sequence of T tokens;
            None means dropless (capacity T). Choices beyond capacity are dropped (the token
            keeps its residual) and counted.
        aux_loss_weight: weight of the Switch-style load-balancing loss when it is requested.
    """

    num_experts: int = 8
    experts_per_token: int = 2
    capacity_factor: float | None = 1.25
    aux_loss_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "num_experts", "experts_per_token")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"MoEConfig.experts_per_token ({self.experts_per_token}) must not exceed "
                f"num_experts ({self.num_experts})."
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"MoEConfig.capacity_factor must be > 0 or None (dropless), "
                f"got {self.capacity_factor}."
            )

    @property
    def is_moe(self) -> bool:
        return True

    def mlp_param_count(self) -> int:
        router = self.hidden_size * self.num_experts
        return router + self.num_experts * 3 * self.hidden_size * self.mlp_hidden_size

    def capacity(self, tokens_per_sequence: int) -> int:
        """Expert capacity (slots per expert per sequence) for sequences of this length."""
        t = tokens_per_sequence
        if self.capacity_factor is None:
            return t
        wanted = math.ceil(self.capacity_factor * t * self.experts_per_token / self.num_experts)
        return max(1, min(t, wanted))


# ---- presets -------------------------------------------------------------------------------

_SEED = dict(
    num_layers=16,
    hidden_size=4096,
    num_heads=32,
    head_dim=128,
    mlp_hidden_size=16384,
    batch_size=128,
    seq_len=10_000,
    dtype=jnp.dtype(jnp.float16),
)
_SEED004 = dict(_SEED, hidden_size=8192, num_heads=16, head_dim=512, mlp_hidden_size=32768,
                batch_size=1024)


def seed_dense() -> DenseConfig:
    """Seed documents 000/001/004: 16 layers, 4096 hidden, 32x128 heads, MLP 16384, FP16."""
    return DenseConfig(**_SEED)


def seed_moe() -> MoEConfig:
    """seed_dense with each MLP a mixture of 8 experts (top-2), as in seed document 004."""
    return MoEConfig(**_SEED, num_experts=8, experts_per_token=2)


def seed004_dense() -> DenseConfig:
    """Seed document 004's dimensions: 16 heads x 512 = 8192 hidden, MLP 32768, batch 1024."""
    return DenseConfig(**_SEED004)


def seed004_moe() -> MoEConfig:
    """seed004_dense with 8 experts per layer (top-2)."""
    return MoEConfig(**_SEED004, num_experts=8, experts_per_token=2)


def seed002_dense() -> DenseConfig:
    """Seed document 002: the 2-layer dense model at seed_dense dimensions (m x n split)."""
    return DenseConfig(**dict(_SEED, num_layers=2))


def tiny_dense() -> DenseConfig:
    """A 4-layer, 64-wide float32 model whose forward pass takes milliseconds on one core."""
    return DenseConfig(
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        head_dim=16,
        mlp_hidden_size=128,
        vocab_size=256,
        batch_size=4,
        seq_len=16,
        dtype=jnp.dtype(jnp.float32),
    )


def tiny_moe() -> MoEConfig:
    """tiny_dense with 4 experts (top-2) per block."""
    return MoEConfig(**_tiny_fields(), num_experts=4, experts_per_token=2)


def _tiny_fields() -> dict:
    return {f.name: getattr(tiny_dense(), f.name) for f in dataclasses.fields(DenseConfig)}


PRESETS = {
    "seed-dense": seed_dense,
    "seed-moe": seed_moe,
    "seed004-dense": seed004_dense,
    "seed004-moe": seed004_moe,
    "seed002-dense": seed002_dense,
    "tiny-dense": tiny_dense,
    "tiny-moe": tiny_moe,
}


def by_name(name: str) -> DenseConfig:
    """Looks a preset up by its CLI name (``seed-dense``, ``tiny-moe``, ...).

    Example:
        >>> by_name("seed-moe").num_experts
        8
    """
    from lwjax.errors import UnknownPresetError

    key = name.replace("_", "-").lower()
    if key not in PRESETS:
        raise UnknownPresetError(f"Unknown model preset {name!r}; known: {', '.join(PRESETS)}.")
    return PRESETS[key]()
