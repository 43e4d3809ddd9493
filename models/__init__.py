"""lwjax's Flax NNX models and their configurations (installed as ``lwjax.models``).

Example:
    >>> from flax import nnx
    >>> from lwjax import models
    >>> cfg = models.configs.tiny_moe()
    >>> model = models.build(cfg, rngs=nnx.Rngs(0))
    >>> abstract = models.abstract(models.configs.seed_dense())  # no weights allocated
"""

from __future__ import annotations

from flax import nnx

from lwjax.errors import ConfigError
from lwjax.models import configs as configs
from lwjax.models.configs import DenseConfig as DenseConfig
from lwjax.models.configs import MoEConfig as MoEConfig
from lwjax.models.moe import MoEStats as MoEStats
from lwjax.models.moe import route as route
from lwjax.models.transformer import DenseTransformer as DenseTransformer
from lwjax.models.transformer import KVCache as KVCache
from lwjax.models.transformer import MoETransformer as MoETransformer
from lwjax.models.transformer import Transformer as Transformer
from lwjax.models.transformer import generate as generate


def build(cfg: DenseConfig, *, rngs: nnx.Rngs) -> Transformer:
    """Builds the model a config describes, with initialised weights.

    Example:
        >>> model = build(configs.tiny_dense(), rngs=nnx.Rngs(0))
    """
    if isinstance(cfg, MoEConfig):
        return MoETransformer(cfg, rngs=rngs)
    if isinstance(cfg, DenseConfig):
        return DenseTransformer(cfg, rngs=rngs)
    raise ConfigError(
        f"models.build takes a DenseConfig or MoEConfig, got {type(cfg).__name__}; "
        "use models.configs.seed_dense() or similar."
    )


def abstract(cfg: DenseConfig) -> Transformer:
    """The same module as ``build`` through ``nnx.eval_shape``: parameters are
    ``jax.ShapeDtypeStruct`` leaves, so a seed-size model costs no weight memory.

    Example:
        >>> m = abstract(configs.seed_dense())
        >>> m.layers[0].mlp.gate.shape
        (4096, 16384)
    """
    return nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
