"""What generation needs to know about a model: its weights, one step against a KV cache,
and how to make an empty cache.

``CausalLM`` is the whole contract: ``step(params, tokens_BT, cache, positions_BT) ->
(logits_BTV, cache)`` runs T new tokens at the given positions against the cache and returns
the updated cache (the same structure); ``init_cache(batch, max_len)`` returns an empty
cache. The same ``step`` serves prefill (the prompt on an empty cache) and decode (one token
per sequence): lwjax traces it twice, segments both traces into layers and gives each cache
leaf to the stage whose layer reads and writes it. Nothing else is model-specific.

``causal_lm(model)`` builds the contract for

- lwjax's models and any Flax NNX module with ``init_cache(batch, max_len)`` and
  ``decode_step(tokens, cache) -> (logits, cache)`` that accepts T >= 1 tokens (lwjax's
  ``prefill`` is ``decode_step`` on a fresh cache);
- ``transformers`` Flax causal LMs (GPT-2, GPT-Neo, OPT, Llama, Mistral, ...) through their
  own cache convention: the ``"cache"`` collection ``init_cache`` fills, passed as
  ``past_key_values`` with ``position_ids`` and an all-ones ``attention_mask`` over the cache,
  as their ``generate`` does.

Any other model: build a ``CausalLM`` yourself (a linen module: ``params=variables``,
``step=lambda p, t, c, pos: module.apply({**p, "cache": c}, t, pos, mutable=["cache"])``
reshaped to ``(logits, cache)``).

Example:
    >>> lm = causal_lm(models.build(models.configs.tiny_dense(), rngs=nnx.Rngs(0)))
    >>> cache = lm.init_cache(2, 32)
    >>> logits, cache = lm.step(lm.params, jnp.zeros((2, 5), jnp.int32), cache,
    ...                         jnp.broadcast_to(jnp.arange(5), (2, 5)))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lwjax.errors import TraceError
from lwjax.passes.trace import _is_transformers, _module_scopes


@dataclasses.dataclass(frozen=True)
class CausalLM:
    """A causal language model as generation sees it.

    Attributes:
        params: the weights, a pytree of arrays (or ShapeDtypeStructs to plan abstractly).
        step: ``step(params, tokens_BT, cache, positions_BT) -> (logits_BTV, cache)``.
        init_cache: ``init_cache(batch, max_len) -> cache``, a pytree of arrays.
        max_positions: the model's position limit (learned position embeddings), or None.
        name: the model's name, for messages.
        kind: "nnx", "transformers" or "custom" (how layers are scoped when traced).
    """

    params: Any
    step: Callable
    init_cache: Callable
    max_positions: int | None = None
    name: str = "model"
    kind: str = "custom"


def causal_lm(model) -> CausalLM:
    """The generation contract of ``model`` (see the module docstring).

    Raises:
        TraceError: the model has no KV-cache step lwjax knows; the message says what to add.

    Example:
        >>> lm = causal_lm(FlaxGPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)))
        >>> lm.max_positions
        1024
    """
    if isinstance(model, CausalLM):
        return model
    name = type(model).__name__
    if _is_transformers(model):
        if not hasattr(model, "init_cache"):
            raise TraceError(f"{name} has no init_cache: it is not a transformers causal LM "
                             "with a KV cache (an encoder?); generation needs one.")
        cfg = model.config
        limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)

        def hf_step(params, tokens_BT, cache, positions_BT):
            max_len = _cache_length(cache)
            out = model(tokens_BT, attention_mask=jnp.ones((tokens_BT.shape[0], max_len), "i4"),
                        position_ids=positions_BT, params=params, past_key_values=cache)
            if getattr(out, "logits", None) is None:
                raise TraceError(
                    f"{name} returns no logits (a base model without its LM head?); generate "
                    "with its causal-LM class, e.g. FlaxGPT2LMHeadModel or "
                    "FlaxLlamaForCausalLM.")
            return out.logits, out.past_key_values

        return CausalLM(params=model.params, step=hf_step, init_cache=model.init_cache,
                        max_positions=int(limit) if limit else None, name=name,
                        kind="transformers")
    if isinstance(model, nnx.Module):
        if not (hasattr(model, "init_cache") and hasattr(model, "decode_step")):
            raise TraceError(
                f"{name} has no init_cache(batch, max_len) / decode_step(tokens, cache): "
                "generation runs the model one step at a time against a KV cache. Add them "
                "(see lwjax.models.Transformer), or pass an lwjax.CausalLM.")
        graphdef, rng_state, state = nnx.split(model, nnx.RngState, ...)

        def nnx_step(params, tokens_BT, cache, positions_BT):
            m = nnx.merge(graphdef, rng_state, params)
            with _module_scopes(m):
                return m.decode_step(tokens_BT, cache)

        limit = getattr(getattr(model, "cfg", None), "max_positions", None)
        return CausalLM(params=state, step=nnx_step, init_cache=model.init_cache,
                        max_positions=limit, name=name, kind="nnx")
    raise TraceError(
        f"generation takes an NNX module with init_cache/decode_step (lwjax's models), a "
        f"transformers Flax causal LM, or an lwjax.CausalLM; got {name}. Wrap your model's "
        "step function in lwjax.CausalLM(params, step, init_cache).")


def _cache_length(cache) -> int:
    """Positions a transformers cache holds: the length axis of its first ``cached_key``."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if any(getattr(k, "key", None) == "cached_key" for k in path):
            return int(leaf.shape[1])
    raise TraceError("the transformers cache has no 'cached_key' leaf; pass an lwjax.CausalLM "
                     "whose step builds the attention mask itself.")
