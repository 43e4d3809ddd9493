"""lwjax's Flax NNX models and their configurations (installed as ``lwjax.models``).

Example:
    >>> from flax import nnx
    >>> from lwjax import models
    >>> cfg = models.configs.tiny_moe()
    >>> model = models.build(cfg, rngs=nnx.Rngs(0))
    >>> abstract = models.abstract(models.configs.seed_dense())  # no weights allocated
"""

from __future__ import annotations

import dataclasses

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

    Blocks are shaped one at a time: one ``eval_shape`` over the whole model costs time
    quadratic in the number of layers (each random draw rescans the trace so far).

    Example:
        >>> m = abstract(configs.seed_dense())
        >>> m.layers[0].mlp.gate.shape
        (4096, 16384)
    """
    shell_cfg = dataclasses.replace(cfg, num_layers=1)
    model = nnx.eval_shape(lambda: build(shell_cfg, rngs=nnx.Rngs(0)))
    block = type(model.layers[0])
    model.layers = nnx.List([nnx.eval_shape(lambda i=i: block(cfg, rngs=nnx.Rngs(i)))
                             for i in range(cfg.num_layers)])
    model.cfg = cfg
    return model
