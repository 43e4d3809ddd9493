"""Training through the layer-wise pipeline: ``ShardedModel.value_and_grad`` and
``ShardedModel.train_step``.

The gradient program is ``passes/train.py``'s: one SPMD program per schedule ("gpipe" or
"1f1b", ``passes.schedules.TRAIN_SCHEDULES``) that leaves each stage's gradients on its own
device, in the stage's weight slots. The optimizer then runs on those slots, under ``jit``:
each device holds only its stage's parameters, gradients and optimizer state. That is exact
for optimizers that treat every weight element alike -- ``sgd``, ``adam``, ``adamw``,
``lion``, ``rmsprop``, ``adagrad``, chained with ``clip_by_global_norm`` (the norm is over
all stages) -- and ``train_step`` checks it (``check_optimizer``): an optimizer whose update
of an element depends on how the weights are grouped into arrays (``adafactor``'s factored
moments, ``lamb``'s per-array trust ratio, a mask written for the model's tree) is refused
with ``OptimizerError`` instead of training differently from the model.

The loss: ``loss_fn(outputs, *targets)`` on one microbatch's outputs (the model's output
tree: logits, or ``(logits, aux_B)`` from a model that returns an auxiliary loss per
example) and its rows of the targets, a float scalar. The pipeline's loss is its mean over
the M microbatches (gradient accumulation), which is the full batch's loss when
``loss_fn`` is a mean over examples, as cross-entropy is.

Example:
    >>> sm = lwjax.layerwise_shard(model, tokens, microbatches=4)
    >>> loss_fn = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(
    ...     logits, y).mean()
    >>> loss, grads = sm.value_and_grad(loss_fn)(tokens, targets)   # nnx.State of Params
    >>> step = sm.train_step(loss_fn, optax.adamw(1e-3), schedule="1f1b")
    >>> state = step.init()
    >>> state, loss = step(state, tokens, targets)
    >>> nnx.update(model, step.export_params(state))

Several processes (``lwjax.distributed``): every process makes the same calls, checked to
compile the same program (``ConfigError``, not a hang); gradients and exported weights come
to every process whole, on its first local device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax import distributed
from lwjax.errors import ConfigError, InputError, LossError, OptimizerError
from lwjax.passes.storage import AXIS
from lwjax.passes.train import TrainProgram, lower_train, weight_copies


@flax.struct.dataclass
class TrainState:
    """A pipeline's training state, every array in the stage-slot layout.

    Attributes:
        params: the weight slots ([S, n] arrays sharded over "stage").
        opt_state: the optimizer's state for those slots, sharded like them.
        step: how many updates were applied (int32).
    """

    params: list
    opt_state: Any
    step: jax.Array


def check_optimizer(optimizer) -> None:
    """Refuses an optimizer that cannot run on stage slots.

    The test: two updates of the same numbers, once as one [2, n] array (two stages' rows,
    as the slots hold them) and once as two [192, 160] arrays (the model's own leaves),
    must agree element for element, and every state array must have its parameter's shape
    (or be a scalar) so that it can be sharded like it.

    Raises:
        ConfigError: not an optax GradientTransformation.
        OptimizerError: the update depends on the grouping, or its state cannot be sharded.

    Example:
        >>> check_optimizer(optax.adamw(1e-3))          # passes
        >>> check_optimizer(optax.adafactor(1e-3))      # OptimizerError
    """
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        raise ConfigError(f"optimizer must be an optax GradientTransformation (e.g. "
                          f"optax.adamw(1e-3)), got {type(optimizer).__name__}.")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 192, 160)).astype(np.float32)
    grads = [rng.normal(size=x.shape).astype(np.float32) for _ in range(2)]

    def run(split: Callable) -> tuple[list, Any]:
        """Each step's updates (not the weights: adding a small update to a large weight
        rounds differently in differently shaped arrays), and the final state."""
        params = split(x)
        state = optimizer.init(params)
        steps = []
        for g in grads:
            updates, state = optimizer.update(split(g), state, params)
            params = optax.apply_updates(params, updates)
            steps.append(updates)
        return steps, state

    try:
        slots, slot_state = run(lambda a: {"w": jnp.asarray(a.reshape(2, -1))})
        leaves, _ = run(lambda a: {"a": jnp.asarray(a[0]), "b": jnp.asarray(a[1])})
    except Exception as e:  # noqa: BLE001 -- any failure on regrouped weights is the answer
        raise OptimizerError(
            f"the optimizer failed on weights grouped as the pipeline stores them (one [S, n] "
            f"array per slot): {type(e).__name__}: {str(e)[:300]}. A mask or per-weight "
            "setting written for the model's tree cannot apply to stage slots; use an "
            "optimizer without one (e.g. optax.adamw(lr)).") from e
    bad = [tuple(a.shape) for a in jax.tree.leaves(slot_state)
           if jnp.ndim(a) and tuple(a.shape) != (2, x[0].size)]
    if bad:
        raise OptimizerError(
            f"the optimizer keeps state arrays of shapes {bad[:3]} for a weight of shape "
            f"(2, {x[0].size}): state that is not elementwise cannot be sharded with each "
            "stage's weights. Use an elementwise optimizer (sgd, adam, adamw, lion, ...).")
    for k, (got, want) in enumerate(zip(slots, leaves, strict=True)):
        got = np.asarray(got["w"]).reshape(2, *x.shape[1:])
        want = np.stack([np.asarray(want["a"]), np.asarray(want["b"])])
        scale = float(np.max(np.abs(want)))
        err = float(np.max(np.abs(got - want))) / scale if scale > 0 else 0.0
        if not err < 1e-3:
            raise OptimizerError(
                f"the optimizer's update depends on how weights are grouped into arrays (update "
                f"{k + 1} of the same numbers as one [2, n] array and as two [192, 160] arrays "
                f"differ by {err:.2g} of its size): per-array statistics (adafactor's factored "
                "moments, lamb's trust ratio, per-leaf clipping) would change when the "
                "pipeline stores each stage's weights in slots. Use an elementwise optimizer "
                "(sgd, adam, adamw, lion, rmsprop; clip_by_global_norm is fine).")


def check_one_stage_per_device(plan) -> None:
    """Training pipelines one stage per device: a circular plan (several per device) is
    refused with what to do instead."""
    if plan.virtual > 1:
        raise ConfigError(
            f"this model runs {plan.virtual} stages per device (the circular schedule, "
            "chosen by the layout search for forward passes); training pipelines one stage "
            "per device. Shard it with layerwise_shard(..., schedule='gpipe') to train, or "
            "plan with mode='train'.")


class Trainer:
    """What ``value_and_grad`` and ``train_step`` share: the gradient program for one loss
    and schedule, the call checks, and the conversions between slots and the model's tree."""

    def __init__(self, sm, loss_fn: Callable, schedule: str, targets: Sequence):
        if sm.plan.tp > 1:
            raise ConfigError(
                f"training runs plans with one device per stage; this plan splits stages over "
                f"tp={sm.plan.tp} devices. Plan with allow=('microbatch',) or more capacity.")
        self.sm = sm
        traced = sm._traced
        self.traced = traced
        graph = sm.program.graph
        self.graph = graph
        trainable = traced.trainable or (True,) * len(traced.params)
        self.trainable_leaf = trainable
        target_avals = self._target_avals(targets)
        check_loss(loss_fn, graph, target_avals, sm.plan.microbatches)
        # multi-process: every process must compile the same gradient program
        distributed.agree_plan(sm.plan, "training program", schedule=schedule,
                               targets=[[list(t.shape), str(t.dtype)] for t in target_avals])
        self.program: TrainProgram = lower_train(
            graph, [s.layer_range for s in sm.plan.stages], list(sm.program.mesh.devices.ravel()),
            sm.plan.microbatches, loss_fn, target_avals, schedule=schedule,
            trainable=[trainable[p.source] for p in graph.params])
        self.target_treedef = jax.tree.structure(tuple(targets))
        self.target_avals = target_avals

    def _target_avals(self, targets: Sequence) -> list:
        batch = self.sm._batch_size
        avals = []
        for path, t in jax.tree_util.tree_flatten_with_path(tuple(targets))[0]:
            shape = tuple(getattr(t, "shape", ()))
            where = f"target {jax.tree_util.keystr(path)}"
            if not shape or shape[0] != batch:
                raise InputError(
                    f"{where} has shape {shape}: targets must have the batch ({batch}) as "
                    f"their leading axis, to split into {self.sm.plan.microbatches} "
                    "microbatches with the inputs.")
            avals.append(jax.ShapeDtypeStruct(shape, t.dtype))
        return avals

    def leaves(self, call_args: Sequence, kwargs: dict) -> list:
        """The program's arguments: the model's (checked like a forward call), then the
        targets' leaves."""
        args, targets = split_call(self.sm, call_args)
        if jax.tree.structure(tuple(targets)) != self.target_treedef:
            raise InputError(f"targets have structure {jax.tree.structure(tuple(targets))}; "
                             f"the step was built for {self.target_treedef}.")
        flat = jax.tree.leaves(tuple(targets))
        for t, want in zip(flat, self.target_avals, strict=True):
            if (tuple(t.shape), t.dtype) != (want.shape, want.dtype):
                raise InputError(f"a target is {t.dtype} {tuple(t.shape)}, but the step was "
                                 f"built for {want.dtype} {want.shape}.")
        return [*self.sm._leaves(args, kwargs), *flat]

    def to_tree(self, slots: Sequence, *, grads: bool) -> Any:
        return to_tree(self.sm.program, self.traced, slots, grads=grads)


def to_tree(program, traced, slots: Sequence, *, grads: bool) -> Any:
    """Slot arrays -> the model's tree: each leaf from the device of the stage that holds it
    (a tied weight's gradient: the sum of its copies' parts). ``grads``: the trainable leaves
    only (``nnx.state(model, nnx.Param)`` / ``variables["params"]``), else the whole tree.

    Several processes: each gathers the slots (a collective) and builds the whole tree on
    its first local device with one process's operations, so the values agree bit for bit.

    Args:
        program: a PipelineProgram or TrainProgram (its stages, storage and mesh).
        traced: the TracedModel (the tree's structure).
        slots: arrays in ``program.storage``'s layout.
        grads: gradients (sum the copies; each leaf stays on its stage's device) or
            weights (as the first stage holding each reads it, compressed weights decoded;
            every leaf on the first stage's device, ready for ``nnx.update`` and an
            unsharded call).
    """
    graph = program.graph
    devices = program.mesh.devices.ravel()
    row = _stage_rows(slots, devices)
    pieces: dict[int, dict] = {}
    if grads:
        parts = weight_copies(graph, program.stages, program.storage)
        for i, info in enumerate(graph.params):
            rows = [row(n, s)[0].reshape(info.shape) for s, n in parts[i]]
            value = rows[0]
            for r in rows[1:]:
                value = value + jax.device_put(r, next(iter(value.devices())))
            pieces.setdefault(info.source, {})[info.slice_index] = value
    else:  # each stage's weights as its branch reads them (compressed ones decoded)
        # the storage's entries: one per stage, or per device where a device holds several
        # stages (the circular schedule: SlotStorage keeps each device's stages' weights)
        held = program.storage.stage_params if getattr(program, "virtual", 1) > 1 else \
            [st.params for st in program.stages]
        for s, params in enumerate(held):
            local = [row(n, s) for n in range(len(slots))]
            for i, value in zip(params, program.storage.unpack(local, s), strict=True):
                info = graph.params[i]
                pieces.setdefault(info.source, {}).setdefault(info.slice_index, value)
    leaves = []
    for k, x in enumerate(traced.params):
        got = pieces.get(k)
        if got is None:  # a weight no equation reads: no gradient, value unchanged
            leaves.append(jnp.zeros(x.shape, x.dtype) if grads else x)
        elif None in got:
            leaves.append(got[None])
        else:
            first = next(iter(got[0].devices()))
            leaves.append(jnp.stack([jax.device_put(got[j], first) for j in sorted(got)]))
    if not grads:  # weights to load into the model: together on one device
        home = devices[0] if jax.process_count() == 1 else jax.local_devices()[0]
        leaves = [jax.device_put(x, home) for x in leaves]
    tree = jax.tree.unflatten(traced.param_treedef, leaves)
    return trainable_part(tree, traced.kind) if grads else tree


def _stage_rows(slots: Sequence, devices) -> Callable[[int, int], jax.Array]:
    """``row(n, s)``: slot n's row of stage s, a [1, size] array. One process: the shard on
    stage s's device. Several: every slot gathered whole to every process (the same path on
    each, whichever stages it holds), the row on this process's first device."""
    if jax.process_count() == 1:
        return lambda n, s: next(sh.data for sh in slots[n].addressable_shards
                                 if sh.device == devices[s])
    with distributed.peer_guard():
        whole = distributed.gather(list(slots))
    here = jax.local_devices()[0]
    return lambda n, s: jax.device_put(whole[n][s:s + 1], here)


def split_call(sm, call_args: Sequence) -> tuple[tuple, tuple]:
    """``(*args, *targets)`` -> (the model's positional arguments, the targets)."""
    traced = sm._traced
    num_args = len(jax.tree.unflatten(traced.arg_treedef, [0] * len(traced.args))[0])
    if len(call_args) <= num_args:
        raise InputError(
            f"pass the model's {num_args} positional argument(s) and then the targets; got "
            f"{len(call_args)} positional argument(s).")
    return tuple(call_args[:num_args]), tuple(call_args[num_args:])


def trainable_part(tree, kind: str):
    """The trainable leaves of a traced parameter tree: NNX's Params, linen's "params"."""
    if kind == "nnx":
        return nnx.filter_state(tree, nnx.Param)
    if kind == "linen":
        return tree["params"]
    return tree


def check_loss(loss_fn: Callable, graph, targets: Sequence, num_microbatches: int) -> None:
    """LossError unless ``loss_fn`` returns a float scalar on one microbatch's outputs."""
    if not callable(loss_fn):
        raise LossError(f"loss_fn must be callable as loss_fn(outputs, *targets); got "
                        f"{type(loss_fn).__name__}.")
    outs = jax.tree.unflatten(graph.traced.out_treedef,
                              [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                               for v in graph.jaxpr.jaxpr.outvars])
    mb = [jax.ShapeDtypeStruct((t.shape[0] // num_microbatches, *t.shape[1:]), t.dtype)
          for t in targets]
    try:
        got = jax.eval_shape(loss_fn, outs, *mb)
    except Exception as e:  # noqa: BLE001 -- the user's function failed: say where
        raise LossError(f"loss_fn(outputs, *targets) failed on one microbatch's outputs "
                        f"{jax.tree.map(lambda a: (a.shape, str(a.dtype)), outs)}: "
                        f"{type(e).__name__}: {str(e)[:300]}") from e
    leaves = jax.tree.leaves(got)
    if len(leaves) != 1 or leaves[0].shape != () or \
            not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise LossError(
            f"loss_fn must return a float scalar (the microbatch's mean loss); it returned "
            f"{jax.tree.map(lambda a: f'{a.dtype}{list(a.shape)}', got)}. Reduce it, e.g. "
            "with .mean().")


def value_and_grad(sm, loss_fn: Callable, *, schedule: str = "gpipe") -> Callable:
    """``ShardedModel.value_and_grad``: see its docstring."""
    check_one_stage_per_device(sm.plan)
    cache: dict = {}

    def fn(*call_args, **kwargs):
        _, targets = split_call(sm, call_args)
        key = jax.tree.structure(tuple(targets))
        if key not in cache:
            cache[key] = Trainer(sm, loss_fn, schedule, targets)
        trainer = cache[key]
        leaves = trainer.leaves(call_args, kwargs)
        with distributed.peer_guard():
            loss, slots = trainer.program.fn(sm.params, *leaves)
            return loss, trainer.to_tree(slots, grads=True)

    return fn


class TrainStep:
    """A jitted optimizer step through the pipeline (``ShardedModel.train_step``).

    Attributes:
        program: the gradient program (``passes.train.TrainProgram``); built at the first
            call, when the targets' shapes are known.
    """

    def __init__(self, sm, loss_fn: Callable, optimizer, schedule: str):
        check_one_stage_per_device(sm.plan)
        check_optimizer(optimizer)
        self.sm, self.loss_fn, self.optimizer, self.schedule = sm, loss_fn, optimizer, schedule
        self._trainer: Trainer | None = None
        self._fn: Callable | None = None

    def init(self) -> TrainState:
        """The state at the ShardedModel's weights: copies of its slots (the model keeps its
        own) and the optimizer's initial state, sharded like them."""
        params = [jnp.copy(p) for p in self.sm.params]
        sharding = NamedSharding(self.sm.program.mesh, P(AXIS))
        replicated = NamedSharding(self.sm.program.mesh, P())
        shapes = jax.eval_shape(self.optimizer.init, params)
        out = jax.tree.map(lambda a: sharding if a.ndim == 2 else replicated, shapes)
        opt_state = jax.jit(self.optimizer.init, out_shardings=out)(params)
        # placed as the step returns it, so the second call does not compile again
        count = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        return TrainState(params=params, opt_state=opt_state, step=count)

    def _build(self, call_args: Sequence) -> Trainer:
        trainer = Trainer(self.sm, self.loss_fn, self.schedule, split_call(self.sm, call_args)[1])
        prog, optimizer = trainer.program, self.optimizer
        ties = [p for p in prog.grad_parts() if len(p) > 1]
        frozen = [(s, n) for i, parts in enumerate(prog.grad_parts())
                  if not trainer.trainable_leaf[self.sm.program.graph.params[i].source]
                  for s, n in parts]

        def step(state: TrainState, *leaves):
            loss, grads = prog.raw(state.params, *leaves)
            for parts in ties:  # each copy of a tied weight gets the sum of their parts
                total = sum(grads[n][s] for s, n in parts)
                for s, n in parts:
                    grads[n] = grads[n].at[s].set(total)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            for s, n in frozen:  # weights that are not Params (statistics) stay as they are
                params[n] = params[n].at[s].set(state.params[n][s])
            return TrainState(params, opt_state, state.step + 1), loss

        self._fn = jax.jit(step, donate_argnums=0)
        return trainer

    def __call__(self, state: TrainState, *call_args, **kwargs) -> tuple[TrainState, jax.Array]:
        """One update on a batch: ``(state, loss)``; ``state`` is donated."""
        if self._trainer is None:
            self._trainer = self._build(call_args)
        leaves = self._trainer.leaves(call_args, kwargs)
        with distributed.peer_guard():
            return self._fn(state, *leaves)

    @property
    def program(self) -> TrainProgram | None:
        return None if self._trainer is None else self._trainer.program

    def lower(self, state: TrainState, *call_args, **kwargs) -> jax.stages.Lowered:
        """The ``jax.stages.Lowered`` step (``.compile().memory_analysis()`` for bytes)."""
        if self._trainer is None:
            self._trainer = self._build(call_args)
        return self._fn.lower(state, *self._trainer.leaves(call_args, kwargs))

    def export_params(self, state: TrainState) -> Any:
        """The trained weights in the model's own tree (``ShardedModel.export_params``): an
        NNX State for ``nnx.update``, linen variables, or a ``transformers`` model's
        params."""
        return self.sm.export_params(state)
