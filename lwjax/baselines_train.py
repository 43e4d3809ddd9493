"""Training for the baselines: ``Baseline.value_and_grad`` and ``Baseline.train_step``.

The contract is the layer-wise pipeline's: ``loss_fn(outputs, *targets)`` is the user's
per-batch *mean* loss on the model's outputs -- logits [B, T, V], or with ``with_aux=True``
(MoE) the pair ``(logits, aux_B)`` exactly as ``model(tokens, with_aux=True)`` returns it.
With M microbatches the loss is the mean over microbatches of ``loss_fn(outputs_mb,
*targets_mb)`` (gradient accumulation; for per-example mean losses it equals the full-batch
loss). Targets are batch-leading arrays, split into microbatches like the tokens.

How each baseline differentiates -- what a competent JAX user writes:

- ``tp_pp``: plain ``jax.value_and_grad`` of its own forward and the loss. Autodiff runs
  back through the GPipe ``lax.scan`` inside the ``shard_map`` over "pp" (``ppermute``
  transposes to the reverse send) while GSPMD partitions the backward over "tp" from the
  weights' shardings. The per-tick stage (the stage's scan over its layers) runs under
  ``jax.checkpoint``: the backward keeps each tick's stage input and rematerialises the
  activations inside the stage. The head runs outside the ``shard_map`` as in the forward;
  ``loss_fn`` is vmapped over the microbatch axis of its outputs and the targets. With
  ``with_aux``, each block's per-sequence ``load_balancing_B`` is summed along the pipeline
  (it travels with the activations through ``ppermute``) and scaled as the model scales it.
- ``single_device``: ``jax.value_and_grad`` of the model itself (one microbatch).

Train state: ``TrainState(params, opt_state, step)``, the weights in the baseline's own layout
and shardings (``tp_pp``: blocks stacked [pp, L/pp, ...]). Every optimizer-state leaf shaped
like its parameter takes the parameter's sharding (``optax.tree_map_params``), so under
``tp_pp`` a device holds only its stage's "tp" slice of the weights and of, e.g., Adam's
moments; other leaves (step counts, or factored moments) are replicated. The optimizer sees
the baseline's layout: elementwise optimizers (sgd, adam, adamw, ...) and global-norm clipping
update each weight exactly as on the model's own tree; per-array rules (factored moments,
per-array norms, masks over the model's tree) see a stage's stacked layers as one array.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from lwjax import baselines, models
    >>> cfg = models.configs.tiny_dense()
    >>> model = models.build(cfg, rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
    >>> b = baselines.tp_pp(model, tokens, devices=jax.devices()[:4], tp=2, pp=2)
    >>> def loss_fn(logits, targets_BT):
    ...     return optax.softmax_cross_entropy_with_integer_labels(logits, targets_BT).mean()
    >>> step = b.train_step(loss_fn, optax.adamw(1e-3))
    >>> state, loss = step(step.init(), tokens, tokens)
    >>> nnx.update(model, step.export_params(state))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import DictKey, SequenceKey, keystr

from lwjax.errors import ConfigError, InputError, LossError, LwjaxError

if TYPE_CHECKING:
    from lwjax.baselines import Baseline

Keys = tuple[Any, ...]  # a leaf's path as plain dict keys / indices: ("layers", 0, "attn", "q")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelTree:
    """The structure of ``nnx.state(model, nnx.Param)``: its treedef and each leaf's keys.

    Holds no arrays, so a baseline can keep it without keeping the model's weights alive.

    Example:
        >>> tree = ModelTree.of(model)
        >>> tree.keys[0]
        ('embed',)
    """

    treedef: Any
    keys: tuple[Keys, ...]

    @classmethod
    def of(cls, model: nnx.Module) -> ModelTree:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
        return cls(treedef, tuple(plain_keys(path) for path, _ in leaves))

    def build(self, leaf_for: Callable[[Keys], Any]) -> nnx.State:
        """The model's ``nnx.State`` structure with ``leaf_for(keys)`` at every leaf."""
        return jax.tree.unflatten(self.treedef, [leaf_for(keys) for keys in self.keys])


@dataclasses.dataclass(frozen=True, eq=False)
class Differentiable:
    """A baseline's forward as a function of its trainable weights: what training needs.

    Attributes:
        params: the trainable weights in the baseline's layout, placed (or abstract).
        apply: ``apply(params, tokens_BT, with_aux)`` -> logits [B, T, V], or
            ``(logits, aux_B)`` when ``with_aux``; traceable, remat where the baseline says.
        to_model: the baseline's layout -> an ``nnx.State`` shaped like
            ``nnx.state(model, nnx.Param)`` (traceable).
        has_aux: whether the model returns an auxiliary loss (MoE).
    """

    params: Any
    apply: Callable[[Any, jax.Array, bool], Any]
    to_model: Callable[[Any], nnx.State]
    has_aux: bool


@flax.struct.dataclass
class TrainState:
    """What ``TrainStep`` carries from step to step.

    Attributes:
        params: the weights in the baseline's layout and shardings.
        opt_state: the optax state; parameter-shaped leaves sharded like their parameter.
        step: int32 scalar, the number of steps taken.
    """

    params: Any
    opt_state: Any
    step: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class TrainStep:
    """One jitted optimizer step of a baseline: ``step(state, tokens, *targets) -> (state, loss)``.

    Built by ``Baseline.train_step``. ``state`` is donated: keep using the returned one.

    Attributes:
        name: the baseline's name.
        optimizer: the optax ``GradientTransformation``.
        state_shardings: a ``TrainState`` of the shardings every leaf keeps.
    """

    name: str
    optimizer: optax.GradientTransformation = dataclasses.field(repr=False)
    state_shardings: TrainState = dataclasses.field(repr=False)
    _init: Callable = dataclasses.field(repr=False)
    _update: Callable = dataclasses.field(repr=False)
    _export: Callable = dataclasses.field(repr=False)
    _baseline: Baseline = dataclasses.field(repr=False)

    def init(self) -> TrainState:
        """A fresh state: copies of the baseline's weights and ``optimizer.init`` of them.

        Example:
            >>> state = step.init()
            >>> int(state.step)
            0
        """
        self._baseline._check_runnable()
        return self._init(self._baseline._differentiable.params)

    def __call__(
        self, state: TrainState, tokens_BT: jax.Array, *targets: Any
    ) -> tuple[TrainState, jax.Array]:
        """Updates the weights once on this batch; returns the new state and the batch's loss.

        Example:
            >>> state, loss = step(state, tokens, targets)
        """
        if not isinstance(state, TrainState):
            raise InputError(
                f"The {self.name} train step takes the TrainState that step.init() or a "
                f"previous step returned, got a {type(state).__name__}."
            )
        return self._update(state, *placed_inputs(self._baseline, tokens_BT, targets))

    def export_params(self, state: TrainState) -> nnx.State:
        """The weights in the model's own ``nnx.State`` structure, for ``nnx.update(model, ...)``.

        Example:
            >>> nnx.update(model, step.export_params(state))
        """
        return self._export(state.params)


def value_and_grad(baseline: Baseline, loss_fn: Callable, *, with_aux: bool = False) -> Callable:
    """``f(tokens_BT, *targets) -> (loss, grads)`` for a baseline (``Baseline.value_and_grad``).

    ``grads`` has the structure of ``nnx.state(model, nnx.Param)``; under ``tp_pp`` each
    layer's gradient is sliced out of its stage's stacked array (so it is gathered over "pp").

    Example:
        >>> loss, grads = value_and_grad(b, loss_fn)(tokens, targets)
    """
    diff = _differentiable(baseline, loss_fn, with_aux)
    loss_and_grads = jax.value_and_grad(microbatch_loss(baseline, diff, loss_fn, with_aux))

    @jax.jit
    def run(params, tokens_BT, *targets):
        loss, grads = loss_and_grads(params, tokens_BT, *targets)
        return loss, diff.to_model(grads)

    def f(tokens_BT: jax.Array, *targets: Any) -> tuple[jax.Array, nnx.State]:
        baseline._check_runnable()
        return run(diff.params, *placed_inputs(baseline, tokens_BT, targets))

    return f


def train_step(
    baseline: Baseline,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    with_aux: bool = False,
) -> TrainStep:
    """A ``TrainStep`` for a baseline (``Baseline.train_step``); see the module docstring.

    Example:
        >>> step = train_step(b, loss_fn, optax.adamw(1e-3))
    """
    diff = _differentiable(baseline, loss_fn, with_aux)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ConfigError(
            f"train_step takes an optax GradientTransformation (e.g. optax.adamw(1e-3)), got "
            f"{type(optimizer).__name__}."
        )
    replicated = NamedSharding(baseline.mesh, P())
    param_shardings = jax.tree.map(lambda a: a.sharding, diff.params)
    abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), diff.params)
    shardings = TrainState(
        params=param_shardings,
        opt_state=optax.tree_map_params(
            optimizer,
            # A leaf shaped like its parameter (Adam's moments) is sharded like it.
            lambda leaf, param, sharding: sharding if leaf.shape == param.shape else replicated,
            jax.eval_shape(optimizer.init, abstract_params),
            abstract_params,
            param_shardings,
            transform_non_params=lambda _: replicated,
        ),
        step=replicated,
    )
    loss_and_grads = jax.value_and_grad(microbatch_loss(baseline, diff, loss_fn, with_aux))

    def init(params):
        # Copies, so that donating the state never deletes the baseline's own weights.
        return TrainState(jax.tree.map(jnp.copy, params), optimizer.init(params), jnp.int32(0))

    def update(state, tokens_BT, *targets):
        loss, grads = loss_and_grads(state.params, tokens_BT, *targets)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss

    return TrainStep(
        name=baseline.name,
        optimizer=optimizer,
        state_shardings=shardings,
        _init=jax.jit(init, out_shardings=shardings),
        _update=jax.jit(update, out_shardings=(shardings, replicated), donate_argnums=0),
        _export=jax.jit(lambda params: jax.tree.map(jnp.copy, diff.to_model(params))),
        _baseline=baseline,
    )


def microbatch_loss(
    baseline: Baseline, diff: Differentiable, loss_fn: Callable, with_aux: bool
) -> Callable:
    """``loss(params, tokens_BT, *targets)``: the mean of ``loss_fn`` over the microbatches.

    Example:
        >>> loss = microbatch_loss(b, b._differentiable, loss_fn, False)
        >>> float(loss(b._differentiable.params, tokens, targets)) > 0
        True
    """
    m = baseline.num_microbatches

    def loss(params, tokens_BT, *targets):
        outputs = diff.apply(params, tokens_BT, with_aux)
        split = lambda a: a.reshape(m, a.shape[0] // m, *a.shape[1:])  # noqa: E731
        outputs_M, targets_M = jax.tree.map(split, (outputs, targets))
        _check_loss(baseline.name, loss_fn, outputs_M, targets_M)
        if m == 1:
            return loss_fn(outputs, *targets)
        return jnp.mean(jax.vmap(loss_fn)(outputs_M, *targets_M))

    return loss


def placed_inputs(baseline: Baseline, tokens_BT: Any, targets: tuple) -> tuple:
    """Checks tokens and targets against the baseline's batch and places them replicated.

    Example:
        >>> placed_inputs(b, tokens, (tokens[:1],))
        Traceback (most recent call last):
        lwjax.errors.InputError: targets[0] has shape (1, 16); ...
    """
    baseline._check_tokens(tokens_BT)
    batch = baseline.tokens.shape[0]
    for i, target in enumerate(targets):
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
            shape = getattr(leaf, "shape", None)
            if shape is None or len(shape) == 0 or shape[0] != batch:
                got = (
                    f"has shape {tuple(shape)}"
                    if shape is not None
                    else f"is {leaf!r} ({type(leaf).__name__}), not an array"
                )
                raise InputError(
                    f"targets[{i}]{keystr(path)} {got}; targets must be batch-leading "
                    f"arrays [{batch}, ...] (the tokens' batch) so that they split into "
                    f"{baseline.num_microbatches} microbatches like the tokens. Pass one row "
                    "per sequence, or close over per-batch constants in loss_fn."
                )
    replicated = NamedSharding(baseline.mesh, P())
    return (
        jax.device_put(tokens_BT, baseline._tokens_sharding),
        *jax.device_put(targets, replicated),
    )


def plain_keys(path: tuple) -> Keys:
    """A pytree key path as plain keys: dict keys and sequence indices, attributes dropped
    (an ``nnx.Param``'s ``.value``)."""
    return tuple(
        k.key if isinstance(k, DictKey) else k.idx
        for k in path
        if isinstance(k, DictKey | SequenceKey)
    )


def leaves_by_keys(tree: Any) -> dict[Keys, Any]:
    """``{plain_keys(path): leaf}`` for every leaf of ``tree``."""
    return {plain_keys(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _differentiable(baseline: Baseline, loss_fn: Any, with_aux: Any) -> Differentiable:
    diff = baseline._differentiable
    if diff is None:
        raise ConfigError(f"This {baseline.name} baseline was built without training support.")
    if not callable(loss_fn):
        raise LossError(
            f"loss_fn must be a function loss_fn(outputs, *targets) -> float scalar, got a "
            f"{type(loss_fn).__name__}."
        )
    if not isinstance(with_aux, bool):
        raise ConfigError(f"with_aux must be True or False, got {with_aux!r}.")
    if with_aux and not diff.has_aux:
        raise ConfigError(
            "with_aux=True hands loss_fn (logits, aux_B), the MoE auxiliary loss, but this "
            "model is dense and has none; drop with_aux, or build an MoE model."
        )
    return diff


def _check_loss(name: str, loss_fn: Callable, outputs_M: Any, targets_M: tuple) -> None:
    """LossError unless ``loss_fn`` maps one microbatch's outputs and targets to a float
    scalar (checked on shapes while tracing, so it costs nothing per step)."""
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), (outputs_M, targets_M))
    shapes = f"outputs {_describe(one[0])} and targets {_describe(one[1])}"
    try:
        out = jax.eval_shape(loss_fn, one[0], *one[1])
    except LwjaxError:
        raise
    except Exception as e:  # the user's code: any failure is reported as theirs
        raise LossError(
            f"loss_fn failed on one microbatch's {shapes} in the {name} baseline: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not (
        isinstance(out, jax.ShapeDtypeStruct)
        and out.shape == ()
        and jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise LossError(
            f"loss_fn must return a float scalar (the microbatch's mean loss); on {shapes} it "
            f"returned {_describe(out)}. Reduce it with .mean(), return the loss alone, and "
            "keep it floating point."
        )


def _describe(tree: Any) -> str:
    """float32[2, 16, 256] for one array, (..., ...) for tuples, else the type and leaf count."""
    if isinstance(tree, jax.ShapeDtypeStruct):
        return f"{tree.dtype}{list(tree.shape)}"
    if isinstance(tree, tuple | list):
        return "(" + ", ".join(_describe(t) for t in tree) + ")"
    return f"a {type(tree).__name__} of {len(jax.tree.leaves(tree))} arrays"
