"""Pass 6 for training: LayerGraph + stage ranges + a loss -> one jitted SPMD program that
returns the loss and every weight's gradient, with each stage's work on its own device.

The program runs over ``Mesh(devices, ("stage",))`` like the forward pipeline
(``passes/lower.py``): the same per-stage weight slots (``SlotStorage``), the same cut values
packed into per-dtype carry buffers, each stage's jaxpr equations evaluated in its branch of
``lax.switch``. What a stage does at each tick comes from a training schedule's tick table
(``passes/schedules.py``: GPipe, 1F1B):

- **Forward (F)** of microbatch k on stage s < S - 1: runs the stage on the input it holds
  for k and sends the carry to stage s + 1.
- **Backward (B)** of microbatch k: recomputes the stage's forward from the stashed input
  (rematerialisation: between a microbatch's F and B a stage keeps only its input, not
  its activations) and pulls the output gradient back through it with ``jax.vjp``; adds the
  weights' gradient to the stage's accumulators and sends the input's gradient to stage
  s - 1. On the last stage the forward continues through the epilogue and the loss, whose
  gradient starts the backward: ``loss_fn(outputs_k, *targets_k) / M``. The last stage's F
  only stashes; its B does the work.
- **Messages**: every tick sends one carry forward (s -> s + 1) and one gradient backward
  (s -> s - 1), each a ``ppermute`` outside the switch. A stage writes what it receives into
  its stash (inputs) or its pending slots (gradients), at slot k mod K: the table's FIFO
  orders keep the live microbatches consecutive, and ``TickTable.stash`` / ``pending`` give
  K. A message that carries nothing goes to one spare slot.

The loss is the mean over the M microbatches of ``loss_fn`` on each (gradient accumulation):
the full batch's loss when ``loss_fn`` is a mean over examples. Gradients are accumulated in
the weights' dtypes and returned in the slot layout, each stage's on its own device; tied
weights (stored by two stages) have one part on each (``TrainProgram.grad_parts``).

Example:
    >>> prog = lower_train(graph, ((0, 2), (2, 4)), jax.devices()[:2], 4, loss_of,
    ...                    targets=[jax.ShapeDtypeStruct((8, 16), jnp.int32)])
    >>> loss, grad_slots = prog.fn(prog.place_params(param_leaves), tokens, targets)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lwjax._compat import Literal as JaxLiteral
from lwjax.passes import schedules
from lwjax.passes.carry import pack, send, unpack
from lwjax.passes.lower import (
    StageLayout,
    _eval,
    _param_values,
    carry_layout,
    cut_values,
    stage_layouts,
)
from lwjax.passes.schedules import BACKWARD, FORWARD, TickTable
from lwjax.passes.segment import LayerGraph
from lwjax.passes.storage import AXIS, SlotStorage


@dataclasses.dataclass
class TrainProgram:
    """The lowered training program.

    ``fn(placed_params, *arg_leaves, *target_leaves) -> (loss, grad_slots)``: arguments and
    targets are full-batch leaves; ``grad_slots`` has ``placed_params``' shapes and
    shardings (stage s's gradients in row s). ``raw`` is the same function unjitted, to
    compose into a jitted optimizer step.
    """

    graph: LayerGraph
    mesh: Mesh
    stages: tuple[StageLayout, ...]
    storage: SlotStorage
    num_microbatches: int
    schedule: str
    table: TickTable
    raw: Callable
    fn: Callable

    def place_params(self, param_leaves: Sequence) -> list:
        """Places each stage's weights on its device (``PipelineProgram.place_params``)."""
        values = _param_values(self.graph, param_leaves)
        return self.storage.place(self.mesh, [[values[i] for i in st.params]
                                              for st in self.stages])

    def grad_parts(self) -> list[list[tuple[int, int]]]:
        """Per graph parameter, the (stage, slot) of each stored copy (``weight_copies``)."""
        return weight_copies(self.graph, self.stages, self.storage)


def weight_copies(graph: LayerGraph, stages: Sequence[StageLayout], storage: SlotStorage
                  ) -> list[list[tuple[int, int]]]:
    """Per graph parameter, the (stage, slot) of each stored copy: a tied weight read by two
    stages has two, and its gradient is the sum of their parts.

    Example:
        >>> weight_copies(graph, program.stages, program.storage)[0]   # tied embedding
        [(0, 3), (3, 3)]
    """
    parts: list[list[tuple[int, int]]] = [[] for _ in graph.params]
    for s, st in enumerate(stages):
        for i, n in zip(st.params, storage.slot_indices(s), strict=True):
            parts[i].append((s, n))
    return parts


def _microbatch(x, k):
    return jax.lax.dynamic_index_in_dim(x, k, 0, keepdims=False)


def _split(x, m: int):
    return x.reshape(m, x.shape[0] // m, *x.shape[1:])


def _receive_rows(table: TickTable, direction: int) -> np.ndarray:
    """[ticks, S]: the microbatch whose message stage s receives at tick t (-1: none):
    forward messages come from s - 1's F at t - 1, backward ones from s + 1's B."""
    op, mb = table.op, table.mb
    ticks, num_stages = op.shape
    out = np.full((ticks, num_stages), -1, np.int32)
    kind = FORWARD if direction > 0 else BACKWARD
    for t in range(1, ticks):
        for s in range(num_stages):
            src = s - direction
            if 0 <= src < num_stages and op[t - 1, src] == kind:
                out[t, s] = mb[t - 1, src]
    return out


def lower_train(
    graph: LayerGraph,
    ranges: Sequence[tuple[int, int]],
    devices: Sequence,
    num_microbatches: int,
    loss_of: Callable,
    targets: Sequence[jax.ShapeDtypeStruct],
    schedule: str = "gpipe",
    trainable: Sequence[bool] | None = None,
) -> TrainProgram:
    """Builds the training program (module docstring).

    Args:
        graph: LayerGraph traced at the microbatch size.
        ranges: per stage, its (start, stop) layers.
        devices: one device per stage.
        num_microbatches: M; the call's batch is M times the traced batch.
        loss_of: ``loss_of(outputs, *targets) -> scalar`` on one microbatch: outputs in the
            model's output tree, targets the microbatch's rows.
        targets: the full-batch targets' ShapeDtypeStructs (batch-leading).
        schedule: a name in ``passes.schedules.TRAIN_SCHEDULES``.
        trainable: per graph parameter, whether it gets a gradient (default: all).

    Returns:
        TrainProgram.
    """
    table = schedules.get_train(schedule).table(len(ranges), num_microbatches)
    num_stages, m, last = len(ranges), num_microbatches, len(ranges) - 1
    mesh = Mesh(np.array(list(devices)[:num_stages]), (AXIS,))
    cuts = cut_values(graph, ranges)
    carry_slots, carry_sizes = carry_layout(cuts)
    stages = stage_layouts(graph, ranges, cuts)
    param_vars = graph.param_vars
    storage = SlotStorage([st.params for st in stages], param_vars)
    trainable = [True] * len(param_vars) if trainable is None else list(trainable)
    jaxpr = graph.jaxpr.jaxpr
    consts = dict(zip(jaxpr.constvars, graph.jaxpr.consts, strict=True))
    grad_dts = [dt for dt in carry_sizes if jnp.issubdtype(np.dtype(dt), jnp.inexact)]
    stash_k, pending_k = max(table.stash(), 1), max(table.pending(), 1)
    batch_shaped = graph.traced.batch_shaped

    def stage_env(s, params, carry, mb_args) -> dict:
        env = dict(consts)
        env.update(zip((param_vars[i] for i in stages[s].params), storage.unpack(params, s),
                       strict=True))
        env.update(zip(graph.arg_vars, mb_args, strict=True))
        if s > 0:
            env.update(zip(stages[s].carry_in, unpack(carry, carry_slots[s - 1]), strict=True))
        _eval(stages[s].segments, env, s)
        return env

    def forward(s, params, carry, mb_args) -> dict:
        env = stage_env(s, params, carry, mb_args)
        return pack([env[v] for v in stages[s].carry_out], carry_slots[s], carry_sizes)

    def loss_on_last(params, carry, mb_args, mb_targets):
        env = stage_env(last, params, carry, mb_args)
        _eval((graph.epilogue,), env, last)
        outs = [v.val if isinstance(v, JaxLiteral) else env[v] for v in jaxpr.outvars]
        tree = jax.tree.unflatten(graph.traced.out_treedef, outs)
        return jnp.asarray(loss_of(tree, *mb_targets), jnp.float32) / m

    def zeros_fwd():
        return {dt: jnp.zeros((n,), dt) for dt, n in carry_sizes.items()}

    def zeros_bwd():
        return {dt: jnp.zeros((carry_sizes[dt],), dt) for dt in grad_dts}

    def forward_branch(s):
        def branch(stash_row, cot_row, mb_args, mb_targets, params, acc, loss):
            return forward(s, params, stash_row, mb_args), zeros_bwd(), acc, loss
        return branch

    def backward_branch(s):
        used = [n for i, n in zip(stages[s].params, storage.slot_indices(s), strict=True)
                if trainable[i]]

        def branch(stash_row, cot_row, mb_args, mb_targets, params, acc, loss):
            ints = {dt: x for dt, x in stash_row.items() if dt not in grad_dts}

            def f(p_used, carry_float):
                full = list(params)
                for n, x in zip(used, p_used, strict=True):
                    full[n] = x
                carry = {**ints, **carry_float}
                if s == last:
                    return loss_on_last(full, carry, mb_args, mb_targets)
                out = forward(s, full, carry, mb_args)
                return {dt: out[dt] for dt in grad_dts}

            carry_float = {dt: stash_row[dt] for dt in grad_dts} if s > 0 else {}
            y, pull = jax.vjp(f, [params[n] for n in used], carry_float)
            if s == last:
                loss = loss + y
                ct = jnp.ones((), y.dtype)
            else:
                ct = {dt: cot_row[dt] for dt in grad_dts}
            d_params, d_carry = pull(ct)
            acc = list(acc)
            for n, g in zip(used, d_params, strict=True):
                acc[n] = acc[n] + g
            back = {dt: d_carry.get(dt, jnp.zeros((carry_sizes[dt],), dt)) for dt in grad_dts}
            return zeros_fwd(), back, acc, loss
        return branch

    def idle(stash_row, cot_row, mb_args, mb_targets, params, acc, loss):
        return zeros_fwd(), zeros_bwd(), acc, loss

    # branch index: F of stage s -> s, B of stage s -> S + s, idle -> 2S (the last stage's
    # F only stashes its input, which the receive step has done)
    branches = ([forward_branch(s) for s in range(last)] + [idle]
                + [backward_branch(s) for s in range(num_stages)] + [idle])
    xs = tuple(jnp.asarray(a) for a in (table.op, table.mb, _receive_rows(table, 1),
                                        _receive_rows(table, -1)))
    fwd_perm = [(i, i + 1) for i in range(num_stages - 1)]
    bwd_perm = [(i + 1, i) for i in range(num_stages - 1)]

    def per_device(params, *leaves):
        stage = jax.lax.axis_index(AXIS)
        arg_leaves, target_leaves = leaves[:len(batch_shaped)], leaves[len(batch_shaped):]

        def put(buf, k, size, x):  # receive into slot k mod size; nothing (-1) -> spare slot
            slot = jnp.where(k >= 0, k % size, size)
            return jax.lax.dynamic_update_index_in_dim(buf, x, slot, 0)

        def tick(state, row):
            fwd_in, bwd_in, stash, pending, acc, loss = state
            op, mb, recv_f, recv_b = (r[stage] for r in row)
            stash = {dt: put(stash[dt], recv_f, stash_k, fwd_in[dt]) for dt in stash}
            pending = {dt: put(pending[dt], recv_b, pending_k, bwd_in[dt]) for dt in pending}
            stash_row = {dt: _microbatch(b, mb % stash_k) for dt, b in stash.items()}
            cot_row = {dt: _microbatch(b, mb % pending_k) for dt, b in pending.items()}
            mb_args = [_microbatch(a, mb) if b else a
                       for a, b in zip(arg_leaves, batch_shaped, strict=True)]
            mb_targets = [_microbatch(t, mb) for t in target_leaves]
            index = jnp.where(op == FORWARD, stage,
                              jnp.where(op == BACKWARD, num_stages + stage, 2 * num_stages))
            fwd_out, bwd_out, acc, loss = jax.lax.switch(
                index, branches, stash_row, cot_row, mb_args, mb_targets, params, acc, loss)
            if num_stages > 1:
                # one ppermute per direction: each direction's dtypes as one uint8 buffer
                fwd_out = send(fwd_out, AXIS, fwd_perm)
                bwd_out = send(bwd_out, AXIS, bwd_perm)
            return (fwd_out, bwd_out, stash, pending, acc, loss), None

        init = (zeros_fwd(), zeros_bwd(),
                {dt: jnp.zeros((stash_k + 1, n), dt) for dt, n in carry_sizes.items()},
                {dt: jnp.zeros((pending_k + 1, carry_sizes[dt]), dt) for dt in grad_dts},
                [jnp.zeros_like(p) for p in params], jnp.zeros((), jnp.float32))
        (_, _, _, _, acc, loss), _ = jax.lax.scan(tick, init, xs)
        return jax.lax.psum(loss, AXIS), acc

    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(storage.specs(), *[P() for _ in batch_shaped], *[P() for _ in targets]),
        out_specs=(P(), storage.specs()), axis_names={AXIS}, check_vma=False,
    )

    def program(placed, *leaves):
        args, tgts = leaves[:len(batch_shaped)], leaves[len(batch_shaped):]
        split = [_split(a, m) if b else a for a, b in zip(args, batch_shaped, strict=True)]
        return sharded(placed, *split, *[_split(t, m) for t in tgts])

    return TrainProgram(graph=graph, mesh=mesh, stages=tuple(stages), storage=storage,
                        num_microbatches=m, schedule=schedule, table=table, raw=program,
                        fn=jax.jit(program))
