"""ShardedModel: a model running as a layer-wise pipeline, callable like the model."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import jax

from lwjax import distributed, training
from lwjax import failover as failover_lib
from lwjax import recompress as recompress_lib
from lwjax.errors import ConfigError, InputError
from lwjax.passes import schedules
from lwjax.passes.lower import PipelineProgram
from lwjax.passes.storage import SlotStorage
from lwjax.passes.trace import TracedModel, arg_label, path_str
from lwjax.plan import Plan


class ShardedModel:
    """The model's pipeline program with its weights placed, one stage per device.

    Calling it returns the model's outputs spread over the stages' devices, each holding a
    piece (along the batch when the stage count divides the microbatch, else along the axis
    with the most pieces: ``passes/outputs.py``): no device holds an output-sized block.

    Attributes:
        plan: the Plan it runs.
        program: the lowered PipelineProgram.
        params: the packed, placed weights (dtype -> [stages, L] sharded over "stage").
        tuning: what ``layerwise_shard(..., tune=k)`` measured, one ``lwjax.tune.Measured``
            per candidate in the layout search's order (() when nothing was measured).

    Example:
        >>> sm = lwjax.layerwise_shard(model, tokens, cache_bytes=2**20)
        >>> logits = sm(tokens)      # equals model(tokens)
        >>> logits.sharding.spec     # e.g. 4 stages, microbatches of 4 rows: 2 rows each
        P('stage',)
    """

    def __init__(self, plan: Plan, program: PipelineProgram, traced: TracedModel,
                 batch_size: int, params: list | None = None):
        self.plan = plan
        self.program = program
        distributed.agree(_layout(plan), "plan")  # multi-process: the same program
        self.params = program.place_params(traced.params) if params is None else params
        self._traced = traced
        self._batch_size = batch_size
        self.recompressed: recompress_lib.Recompressed | None = None
        # the running weights are the model's own arrays (not trained or recompressed since)
        self.model_weights = params is None
        self.hot_spares: dict[int, failover_lib.HotSpare] = {}
        self.failover: failover_lib.Failover | None = None
        self._compiled = None  # a Compiled for self.params, when compiled ahead (replan)
        self.tuning: tuple = ()

    def _leaves(self, args, kwargs) -> list:
        t = self._traced
        arrays = {k: v for k, v in kwargs.items() if k not in t.static_kwargs}
        for k, v in kwargs.items():
            if k in t.static_kwargs and v != t.static_kwargs[k]:
                raise InputError(
                    f"keyword argument {k}={v!r} differs from the traced {t.static_kwargs[k]!r}; "
                    "static arguments are compiled in: call layerwise_shard again to retrace."
                )
        missing = set(t.static_kwargs) - set(kwargs)
        if missing:
            raise InputError(f"missing keyword arguments {sorted(missing)} that the model was "
                             "traced with.")
        with_path, treedef = jax.tree_util.tree_flatten_with_path((tuple(args), arrays))
        if treedef != t.arg_treedef and t.kind == "linen" and args and \
                isinstance(args[0], Mapping):
            raise InputError(
                "the first call argument is a dict, like a linen module's variables: a "
                "ShardedModel holds its weights already, so call it with the model's "
                "arguments only, sm(*args, **kwargs), not sm(variables, *args).")
        if treedef != t.arg_treedef:
            raise InputError(
                f"call arguments have structure {treedef}, but the model was traced with "
                f"{t.arg_treedef}; pass the same arguments as the example."
            )
        leaves = []
        for (path, x), want, batched in zip(with_path, t.args, t.batch_shaped, strict=True):
            shape = tuple(want.shape)
            if batched:
                shape = (self._batch_size, *shape[1:])
            got = (tuple(getattr(x, "shape", ())), getattr(x, "dtype", None))
            if got != (shape, want.dtype):
                raise InputError(
                    f"{arg_label(path_str(path))} is {got[1]} {got[0]}, but the pipeline was "
                    f"built for {want.dtype} {shape}. Call with the example's shape and dtype "
                    "(or call layerwise_shard again with the new shape to retrace)."
                )
            leaves.append(x)
        return leaves

    def __call__(self, *args, **kwargs):
        """The model's outputs, spread over the stages' devices (``PipelineProgram.outputs``);
        in a multi-process run each process holds the pieces on its own devices
        (``lwjax.distributed.gather`` gives every process the whole value)."""
        leaves = self._leaves(args, kwargs)
        with distributed.peer_guard():
            if self._compiled is not None and not any(isinstance(x, jax.core.Tracer)
                                                      for x in leaves):
                # skips tracing and lowering the program again (not under a transformation)
                return self.program.outputs(self._compiled(self.params, *leaves))
            return self.program(self.params, *leaves)

    def lower(self, *args, **kwargs) -> jax.stages.Lowered:
        """The ``jax.stages.Lowered`` pipeline program for these arguments."""
        return self.program.fn.lower(self.params, *self._leaves(args, kwargs))

    def compile(self, *args, **kwargs) -> jax.stages.Compiled:
        """The ``jax.stages.Compiled`` pipeline program for these arguments."""
        return self.lower(*args, **kwargs).compile()

    def _schedule(self, schedule: str | None) -> str:
        """The training schedule: a training plan's own unless asked (and then the same)."""
        training.check_one_stage_per_device(self.plan)
        planned = self.plan.schedule if self.plan.mode == "train" else None
        if schedule is None:
            return planned or "gpipe"
        schedules.get_train(schedule)
        if planned is not None and schedule != planned:
            raise ConfigError(
                f"the plan was made for training with schedule={planned!r}, whose stash it "
                f"counted; schedule={schedule!r} would stash differently. Plan again with "
                f"schedule={schedule!r}, or leave schedule= out.")
        return schedule

    def value_and_grad(self, loss_fn, *, schedule: str | None = None):
        """A function ``(*args, *targets, **kwargs) -> (loss, grads)`` through the pipeline.

        Args:
            loss_fn: ``loss_fn(outputs, *targets)``: one microbatch's mean loss, a float
                scalar, on the model's outputs (its output tree) and the targets' rows.
            schedule: "gpipe" or "1f1b" (``passes.schedules.TRAIN_SCHEDULES``); default:
                a training plan's (``lwjax.plan(..., mode="train")``), else "gpipe".

        Returns:
            The function. ``loss`` is the mean of ``loss_fn`` over the M microbatches (the
            batch's loss for a per-example mean); ``grads`` has the structure of
            ``nnx.state(model, nnx.Param)`` (NNX) or ``variables["params"]`` (linen), each
            leaf on the device of its stage. Several processes: every process must call it
            (a collective) and gets the whole tree, each leaf on its first local device.

        Raises:
            LossError: ``loss_fn`` fails or does not return a float scalar.
            InputError: a target is not batch-leading.

        Example:
            >>> loss, grads = sm.value_and_grad(loss_fn)(tokens, targets)
        """
        return training.value_and_grad(self, loss_fn, schedule=self._schedule(schedule))

    def train_step(self, loss_fn, optimizer, *, schedule: str | None = None):
        """A jitted optimizer step through the pipeline (``lwjax.training.TrainStep``):
        ``state = step.init()``; ``state, loss = step(state, *args, *targets)``; each device
        holds only its stage's weights, gradients and optimizer state.

        Args:
            loss_fn: as for ``value_and_grad``.
            optimizer: an optax GradientTransformation that treats weights elementwise
                (``lwjax.training.check_optimizer``).
            schedule: "gpipe" or "1f1b" (default: as for ``value_and_grad``).

        Raises:
            OptimizerError: the optimizer cannot run on per-stage weight slots.

        Example:
            >>> step = sm.train_step(loss_fn, optax.adamw(1e-3), schedule="1f1b")
            >>> state = step.init()
            >>> state, loss = step(state, tokens, targets)
        """
        return training.TrainStep(self, loss_fn, optimizer, self._schedule(schedule))

    def recompress(self, compression, stages=None) -> ShardedModel:
        """This model with the weights of ``stages`` (default: all) stored under a stronger
        ``compression``, re-encoded on their own devices from what they hold (no host
        transfer); the new program is compiled before it returns. ``.recompressed`` on the
        result times the parts (``lwjax.recompress.Recompressed``); its plan's stage weight
        bytes are the new stored bytes.

        Args:
            compression: a preset name or an ``lwjax.Compression``.
            stages: stage indices to re-encode (None: every stage).

        Example:
            >>> smaller = sm.recompress("int4", stages=[0])
            >>> smaller.recompressed.total_s
        """
        plan, program, params, record = recompress_lib.recompress(self, compression, stages)
        out = ShardedModel(plan, program, self._traced, self._batch_size, params=params)
        out.recompressed = record
        return out

    def replan(self, exclude_devices=(), spare_devices=(), *, drain: bool = False
               ) -> ShardedModel:
        """This model running without ``exclude_devices`` (lost ones): a new plan
        (``Plan.replan``: the layers re-partitioned over the rest, plus ``spare_devices``),
        each weight moved device to device to its new stage, the new program compiled
        before it returns. Excluded devices are not read (``drain=True``: they still work,
        and their weights move off them). When every lost stage has a hot spare
        (``keep_hot_spares``) and no ``spare_devices`` are given, the spares take over with
        the same partition: nothing moves, and a program compiled ahead runs. ``.failover``
        on the result times the parts and counts the bytes (``lwjax.failover.Failover``).

        Args:
            exclude_devices: device ids (or devices) lost.
            spare_devices: new device ids to plan onto.
            drain: the excluded devices are still readable.

        Raises:
            DeviceError: an excluded device is not in the plan's pool; a weight lived only on
                lost devices and the model's own array of it is on one.
            InfeasiblePlanError: the remaining devices cannot hold the model.
            ConfigError: a split (tp > 1) plan, or a multi-process run.

        Example:
            >>> sm2 = sm.replan(exclude_devices=[3])
            >>> print(sm2.failover.summary())
        """
        plan, program, params, compiled, record = failover_lib.replan(
            self, exclude_devices, spare_devices, drain=drain)
        out = ShardedModel(plan, program, self._traced, self._batch_size, params=params)
        out._compiled = compiled
        out.failover = record
        out.model_weights = self.model_weights
        if record.kind == "switch":
            # unused spares stay on guard; their programs assumed the old devices
            out.hot_spares = {k: dataclasses.replace(hs, program=None, compiled=None,
                                                     compile_s=0.0)
                              for k, hs in self.hot_spares.items()
                              if plan.stages[k].devices[0] != hs.device}
        return out

    def keep_hot_spares(self, spares, *, compile_ahead: bool = True
                        ) -> dict[int, failover_lib.HotSpare]:
        """Keeps a copy of stages' weights on spare devices the plan does not use (copied
        device to device), and -- ``compile_ahead`` -- compiles the program that runs with
        each spare in its stage's place and runs it once on zeros (an executable's first run
        is slow), so that losing the stage's device is a switch (``replan``), not a
        migration and a compile.

        Args:
            spares: ``{stage: device id}``, or device ids for stages 0, 1, ...

        Returns:
            ``self.hot_spares``: per stage, its ``lwjax.failover.HotSpare`` (the bytes
            copied, and the copy's and the compile's measured seconds).

        Example:
            >>> sm.keep_hot_spares({2: 9})
            >>> sm2 = sm.replan(exclude_devices=[sm.plan.stages[2].devices[0]])
            >>> sm2.failover.kind, sm2.failover.compile_s
            ('switch', 0.0)
        """
        self.hot_spares.update(failover_lib.keep_hot_spares(self, spares,
                                                            compile_ahead=compile_ahead))
        return self.hot_spares

    def load_params(self, state) -> None:
        """Runs the model with a training state's weights from now on: ``sm(tokens)`` then
        gives the trained model's outputs (the arrays are copied, so later steps, which
        donate their state, do not touch them).

        Example:
            >>> state, loss = step(state, tokens, targets)
            >>> sm.load_params(state)
            >>> logits = sm(held_out_tokens)
        """
        if [(p.shape, p.dtype) for p in state.params] != \
                [(p.shape, p.dtype) for p in self.params]:
            raise InputError("the state's weight slots differ from this model's: load a "
                             "state made by this ShardedModel's train_step.")
        self.params = [p.copy() for p in state.params]
        self.model_weights = False
        self._compiled = None
        for k, hs in self.hot_spares.items():  # spares hold the weights that run
            hs.rows = failover_lib.spare_rows(self, k, hs.device)

    def export_params(self, state=None):
        """The weights in the model's own tree: this model's, or a training ``state``'s
        (``nnx.update(model, sm.export_params(state))``; linen: the variables). Several
        processes: every process must call it (a collective) and gets the whole tree, on its
        first local device.

        Example:
            >>> nnx.update(model, sm.export_params(state))
        """
        if self.plan.tp > 1:
            raise ConfigError("export_params reads one device per stage; this plan splits "
                              f"stages over tp={self.plan.tp} devices.")
        slots = self.params if state is None else state.params
        return training.to_tree(self.program, self._traced, slots, grads=False)

    def weight_bytes(self) -> dict[int, dict[str, int]]:
        """Per device id, measured from the placed weight arrays: ``allocated`` (the bytes
        of its shards) and ``own`` (its stage's stored weights; split over tp: its share). The
        rest of ``allocated`` pads a slot that another stage fills: one SPMD program gives
        every device arrays of the same shapes, so a stage with fewer weights of a kind than
        the largest stage holds zero rows (even stages have none).

        Example:
            >>> {d: b["allocated"] - b["own"] for d, b in sm.weight_bytes().items()}
            {0: 0, 1: 0, 2: 0, 3: 0}
        """
        storage = self.program.storage
        out = {}
        for k, device in enumerate(self.program.mesh.devices.ravel()):
            allocated = sum(sh.data.nbytes for a in self.params for sh in a.addressable_shards
                            if sh.device == device)
            # SlotStorage holds one entry per device (a device's stages, circular included);
            # SplitStorage one per stage of tp devices (stage-major)
            own = storage.own_bytes(k if isinstance(storage, SlotStorage) else k // storage.tp)
            out[device.id] = {"allocated": allocated, "own": own}
        return out

    def __repr__(self) -> str:
        return f"ShardedModel(\n{self.plan.summary()}\n)"


def _layout(plan: Plan) -> str:
    """What the program depends on: stages (layers, devices), microbatches, tp, laps."""
    return json.dumps({"stages": [[list(s.layer_range), list(s.devices)] for s in plan.stages],
                       "microbatches": plan.microbatches, "tp": plan.tp,
                       "virtual": plan.virtual})
