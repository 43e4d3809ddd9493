"""Training footprints: what a pipeline stage holds while it trains (``mode="train"``).

Beside its weights, a training stage holds, per device:

- **gradients**: one accumulator per parameter, in the parameter's dtype (the weights' bytes
  uncompressed; training compressed weights is not supported).
- **optimizer state**: measured, not guessed: ``jax.eval_shape(optimizer.init, params)`` on the
  layer's parameters as ShapeDtypeStructs (adam: mu and nu per parameter). Leaves that do not
  follow the parameters (adam's step count) are what ``optimizer.init({})`` returns; a stage
  holds them once (``TrainingNumbers.optimizer_shared_bytes``), not once per layer.
- **the stash**: the pipeline rematerialises. It keeps each in-flight microbatch's stage input
  -- the carry crossing into the stage: the [mb, T, D] residual and small ints -- and recomputes
  the stage's forward in the backward tick. ``Footprint.stash_bytes`` of a layer is one
  microbatch's input to it; a stage holds ``TrainingNumbers.stash_slots(S)`` of them
  (``STASH_SLOTS``: GPipe all M, 1F1B at most min(S, M)).
- **the backward's activations**: one microbatch at a time recomputes the stage's forward
  and pulls its gradient back through it with one ``jax.vjp`` over the whole stage
  (``passes/train.py``), so the values each layer's backward needs are all kept at once,
  beside their cotangents. ``Footprint.backward_bytes`` = ``BACKWARD_FACTOR`` x the layer's
  forward peak (activations + buffers), per layer, added up over the stage's layers, on top
  of the forward peak the stage already counts.

Example:
    >>> t = training("1f1b", optax.adamw(1e-3))
    >>> fp = train_footprint(graph, footprint(graph), t)
    >>> fp.layers[0].grad_bytes == fp.layers[0].weights_bytes
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import numpy as np
import optax

from lwjax.errors import ConfigError
from lwjax.passes.footprint import Footprint, GraphFootprint, value_bytes
from lwjax.passes.segment import LayerGraph, Segment

TrainSchedule = Literal["gpipe", "1f1b"]
# Microbatches whose stage input a stage keeps for the backward, by schedule:
# (stages S, microbatches M) -> slots. GPipe runs all M forwards before any backward. 1F1B
# keeps S - s in flight at stage s (the first stage the most); slots are uniform, so every
# stage gets the first stage's min(S, M).
STASH_SLOTS: dict[str, Callable[[int, int], int]] = {
    "gpipe": lambda stages, microbatches: microbatches,
    "1f1b": lambda stages, microbatches: min(stages, microbatches),
}
TRAIN_SCHEDULES: tuple[str, ...] = tuple(STASH_SLOTS)
# What one microbatch's recompute + backward keeps per layer beyond the forward peak, as a
# multiple of that layer's forward peak (activations + buffers): the forward values the vjp
# saves for the backward -- every saved value, not the peak of a liveness walk -- and their
# cotangents. Measured (tests/test_plan_train.py): XLA:CPU's buffer assignment for jit(grad)
# of k tiny_dense blocks (float32, batch 4), input and input cotangent included, parameter
# gradients excluded, holds 3.0x, 5.0x, 7.1x, 9.1x one block's forward peak for k = 1..4:
# 1 forward peak + 2 per layer. (256- and 512-wide blocks, one of them: 2.6x and 3.1x.)
BACKWARD_FACTOR = 2
DEFAULT_OPTIMIZER = "optax.adamw(1e-3)"


@dataclasses.dataclass(frozen=True)
class Training:
    """How a plan trains: the typed configuration of ``mode="train"``.

    Attributes:
        schedule: "gpipe" or "1f1b" (``TRAIN_SCHEDULES``).
        optimizer: the optax GradientTransformation whose state is counted.
        optimizer_name: how reports name it.
    """

    schedule: TrainSchedule
    optimizer: optax.GradientTransformation
    optimizer_name: str

    def __post_init__(self) -> None:
        if self.schedule not in STASH_SLOTS:
            raise ConfigError(f"schedule={self.schedule!r} is not a training schedule; use one "
                              f"of {', '.join(map(repr, TRAIN_SCHEDULES))}.")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise ConfigError(
                f"optimizer= must be an optax GradientTransformation (e.g. optax.adamw(1e-3)), "
                f"got {type(self.optimizer).__name__} {self.optimizer!r:.60}.")


def training(schedule: str | None = None, optimizer=None) -> Training:
    """The training configuration, with the defaults: GPipe and ``optax.adamw(1e-3)``.

    Raises:
        ConfigError: an unknown schedule, or an optimizer that is not an optax
            GradientTransformation.

    Example:
        >>> training("1f1b").optimizer_name
        'optax.adamw(1e-3)'
    """
    if optimizer is None:
        return Training(schedule or "gpipe", optax.adamw(1e-3), DEFAULT_OPTIMIZER)
    t = Training(schedule or "gpipe", optimizer, "optax")
    return dataclasses.replace(t, optimizer_name=f"optax ({_state_kinds(optimizer)})")


@dataclasses.dataclass(frozen=True)
class TrainingNumbers:
    """What a training plan holds beyond its per-layer footprints (``LayerNumbers.training``).

    Attributes:
        schedule: "gpipe" or "1f1b".
        optimizer: the optimizer's name.
        microbatches: M of the per-layer numbers.
        optimizer_shared_bytes: optimizer state a stage holds once, whatever its layers
            (adam's step count).
    """

    schedule: TrainSchedule
    optimizer: str
    microbatches: int
    optimizer_shared_bytes: int = 0

    def stash_slots(self, num_stages: int | None = None) -> int:
        """Microbatches a stage stashes in a pipeline of ``num_stages`` (None: the most any
        stage count may need).

        Example:
            >>> TrainingNumbers("1f1b", "adamw", microbatches=8).stash_slots(4)
            4
        """
        stages = self.microbatches if num_stages is None else num_stages
        return STASH_SLOTS[self.schedule](stages, self.microbatches)


# ---- the pass -------------------------------------------------------------------------------

def optimizer_bytes(optimizer: optax.GradientTransformation, graph: LayerGraph,
                    params: Sequence[int]) -> int:
    """Bytes of the optimizer state of the parameters ``params`` (indices into
    ``graph.params``), without the leaves ``optimizer.init({})`` has (``shared_bytes``).

    Example:
        >>> optimizer_bytes(optax.adamw(1e-3), graph, graph.layers[0].params)   # mu + nu
        328704
    """
    tree = {}
    for i in params:
        p = graph.params[i]
        tree[p.path if p.path not in tree else f"{p.path}#{i}"] = \
            jax.ShapeDtypeStruct(p.shape, p.dtype)
    return max(0, _state_bytes(optimizer, tree, "the parameters of "
                               + ", ".join(sorted(tree)[:3])) - shared_bytes(optimizer))


def shared_bytes(optimizer: optax.GradientTransformation) -> int:
    """Bytes of the optimizer state that does not follow the parameters: its state for no
    parameters (adam: the int32 step count).

    Example:
        >>> shared_bytes(optax.adamw(1e-3))
        4
    """
    return _state_bytes(optimizer, {}, "an empty parameter tree")


def _state_bytes(optimizer: optax.GradientTransformation, tree: dict, what: str) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(_init_shapes(optimizer, tree, what)))


def _init_shapes(optimizer: optax.GradientTransformation, tree: dict, what: str):
    """``optimizer.init`` on a tree of ShapeDtypeStructs, abstractly."""
    try:
        return jax.eval_shape(optimizer.init, tree)
    except Exception as e:  # a user's transformation: say which call failed
        raise ConfigError(f"optimizer.init failed on {what} ({type(e).__name__}: {e}); pass an "
                          "optax GradientTransformation whose init takes a parameter "
                          "tree.") from e


def stash_bytes(seg: Segment) -> int:
    """One microbatch's input to a segment, as a stage starting there stashes it (KV-cache
    inputs excluded).

    Example:
        >>> stash_bytes(graph.layers[0])   # tiny_dense, microbatch 1: [1, 16, 64] f32 + [16] i32
        4160
    """
    cache = set(seg.cache_inputs)
    return sum(value_bytes(v) for v in seg.inputs if v not in cache)


def train_footprint(graph: LayerGraph, fp: GraphFootprint, t: Training,
                    memo: dict | None = None) -> GraphFootprint:
    """``fp`` with each segment's training bytes: gradients, optimizer state, one
    microbatch's stash and the backward's activations (see the module docstring).

    Args:
        graph: the segmented model.
        fp: its forward footprints (uncompressed).
        t: the training configuration.
        memo: optimizer state bytes by parameter shapes (reuse it across microbatch sizes).

    Raises:
        ConfigError: ``fp`` counts compressed weights.

    Example:
        >>> train_footprint(graph, footprint(graph), training()).layers[0].optimizer_bytes
    """
    if fp.compression.name != "none":
        raise ConfigError(f"mode='train' with compression={fp.compression.name!r}: training "
                          "compressed weights is not supported; plan with compression=None.")
    memo = {} if memo is None else memo

    def one(seg: Segment, f: Footprint) -> Footprint:
        key = tuple((graph.params[i].path, graph.params[i].shape, str(graph.params[i].dtype))
                    for i in seg.params)
        if key not in memo:
            memo[key] = optimizer_bytes(t.optimizer, graph, seg.params)
        grads = sum(int(np.prod(graph.params[i].shape, dtype=np.int64))
                    * graph.params[i].dtype.itemsize for i in seg.params)
        return dataclasses.replace(
            f, grad_bytes=grads, optimizer_bytes=memo[key], stash_bytes=stash_bytes(seg),
            backward_bytes=BACKWARD_FACTOR * (f.activation_bytes + f.buffer_bytes))

    return dataclasses.replace(
        fp, prologue=one(graph.prologue, fp.prologue),
        layers=tuple(one(s, f) for s, f in zip(graph.layers, fp.layers, strict=True)),
        epilogue=one(graph.epilogue, fp.epilogue))


def training_numbers(t: Training, microbatches: int) -> TrainingNumbers:
    """The plan-wide training numbers at M = ``microbatches``.

    Example:
        >>> training_numbers(training(), 4).optimizer_shared_bytes
        4
    """
    return TrainingNumbers(schedule=t.schedule, optimizer=t.optimizer_name,
                           microbatches=microbatches,
                           optimizer_shared_bytes=shared_bytes(t.optimizer))


def _state_kinds(optimizer: optax.GradientTransformation) -> str:
    """The optimizer's state by kind, from its state's types for one parameter:
    ``optax.adamw`` -> 'scale_by_adam state'; ``optax.sgd`` -> 'no state'."""
    state = _init_shapes(optimizer, {"w": jax.ShapeDtypeStruct((2, 2), np.float32)},
                         "a [2, 2] float32 parameter")
    kinds: list[str] = []

    def walk(node) -> None:
        if hasattr(node, "_fields"):  # optax states are NamedTuples
            if jax.tree.leaves(node) and type(node).__name__ != "EmptyState":
                name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(node).__name__.removesuffix("State"))
                kinds.append(name.lower())
            return
        if isinstance(node, tuple | list):
            for child in node:
                walk(child)

    walk(state)
    return " + ".join(dict.fromkeys(kinds)) + " state" if kinds else "no state"
