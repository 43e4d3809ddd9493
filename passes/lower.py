"""Pass 6: LayerGraph + stage assignment -> one jitted SPMD program (shard_map + ppermute).

The program runs over ``Mesh(devices, ("stage",))``, one device per stage:

- **Parameters** sit in slots, one ``[S, n]`` array per slot sharded over "stage": device s
  stores only stage s's weights (a weight read by two stages, e.g. a tied embedding, is
  stored by both), and reads each as a reshape of its local row -- a bitcast, so no weight
  is copied per tick (``SlotStorage``; split stages use ``SplitStorage``).
- **Stages** differ (layer counts, dense vs MoE, embedding on the first), so
  each device runs its own branch of ``lax.switch`` on its stage index; a branch evaluates its
  segments' jaxpr equations (the ``eval_jaxpr`` loop), so the layer code is the model's own.
- **Activations** crossing a stage boundary -- every value defined before the cut and read
  after it, e.g. the residual stream and the positions the prologue computed -- are packed
  into per-dtype carry buffers (padded to the largest cut) and moved to the next stage with
  one ``lax.ppermute`` per tick, outside the switch: the dtypes travel as one uint8 buffer
  (``passes/carry.py``), since each collective costs a rendezvous of the devices.
- **Microbatches**: batch-shaped arguments are split into M microbatches of B/M rows (rows
  interleaved when an output is cut along the batch: "Outputs") and the graph is traced at
  the microbatch size; a schedule (``passes/schedules.py``, GPipe by default) decides which
  microbatch each stage runs at each tick.
- **Split stages** (tp > 1): the mesh is ("stage", "tp") with "tp" automatic; weights are
  split by ``passes/tp.py``'s rule and XLA's partitioner inserts the collectives the split
  needs inside the stages' branches. A collective there that needs another stage's devices
  would hang, so ``lower`` compiles the program (the first call reuses the compilation) and
  refuses such a program with ``SplitError`` before anything runs (``passes/collectives.py``).
- **Outputs**: the last stage keeps each microbatch's final carry (what the epilogue reads);
  after the loop it runs the epilogue (final norm, LM head) once per microbatch -- no stage
  carries [mb, T, vocab] slots through the ticks -- and spreads each microbatch's outputs over
  the stages as it makes them (``passes/outputs.py``): each output is cut along one axis (the
  batch when S divides the microbatch, else the axis with the most parts) and stage
  S - parts + i keeps piece i, so a device holds 1/parts of the outputs, not all of them
  (shard_map's outputs are uniform: an output only the last stage kept would take an
  output-sized block on every device). The program returns each output sharded over "stage"
  along that axis; cutting the batch over M > 1 microbatches interleaves them, so that each
  stage's piece is a contiguous block of the call's batch. With tp > 1 every device of a stage
  holds its stage's piece whole.

Example:
    >>> prog = lower(graph, ranges=((0, 2), (2, 4)), devices=jax.devices()[:2],
    ...              num_microbatches=2)
    >>> out = prog(prog.place_params(param_leaves), *arg_leaves)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax._compat import Literal as JaxLiteral
from lwjax._compat import Var, bind_eqn
from lwjax.errors import CompressionError, ConfigError, InputError
from lwjax.passes import schedules
from lwjax.passes.carry import Slot, layout, pack, send, unpack, zeros
from lwjax.passes.codec import Encoded, build_codecs
from lwjax.passes.collectives import StageView, check
from lwjax.passes.compression import Compression
from lwjax.passes.outputs import (
    OutputSplit,
    assemble,
    batch_view,
    held_result,
    held_zeros,
    microbatch_view,
    output_splits,
    spread,
)
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.passes.storage import AXIS, SlotStorage, SplitStorage
from lwjax.passes.tp import split_axes


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """A stage's segments, its parameters, and its incoming/outgoing carry values."""

    segments: tuple[Segment, ...]
    params: tuple[int, ...]
    carry_in: tuple[Var, ...]
    carry_out: tuple[Var, ...]


def cut_values(graph: LayerGraph, ranges: Sequence[tuple[int, int]], *,
               outputs: Sequence | None = None,
               first_stage_args: Sequence[Var] = ()) -> list[tuple[Var, ...]]:
    """Values live across each stage's end (defined up to it, read after it): one tuple per
    stage; the last one holds what the epilogue and the model's outputs read.

    Args:
        graph: the segmented program.
        ranges: per stage, its (start, stop) layers.
        outputs: the values read after the last segment (default: the program's outputs;
            generation keeps its cache outputs on their stages and passes none).
        first_stage_args: arguments only the first stage has (generation's new token): they
            cross cuts like values the prologue made; every other argument is everywhere.

    Example:
        >>> [len(c) for c in cut_values(graph, [(0, 2), (2, 4)])]   # residual + positions
        [2, 1]
    """
    segs = graph.segments
    # segment index of the last segment of each stage (prologue is 0, layer i is i + 1)
    ends = [stop for _, stop in ranges]
    arg_set = set(graph.arg_vars) - set(first_stage_args)
    defined_at: dict = dict.fromkeys(first_stage_args, 0)
    for k, seg in enumerate(segs):
        for e in seg.eqns:
            for v in e.outvars:
                defined_at[v] = k
    read_at: dict = {}
    for k, seg in enumerate(segs):
        for v in seg.inputs:
            read_at.setdefault(v, []).append(k)
    for v in graph.jaxpr.jaxpr.outvars if outputs is None else outputs:
        if isinstance(v, Var):
            read_at.setdefault(v, []).append(len(segs))
    cuts = []
    for end in ends:
        last_seg = end  # segments 0..end belong to stages up to this cut
        live = tuple(v for v, k in defined_at.items()
                     if k <= last_seg and v not in arg_set
                     and any(r > last_seg for r in read_at.get(v, ())))
        cuts.append(live)
    return cuts


@dataclasses.dataclass
class PipelineProgram:
    """The lowered program and what it needs to run.

    Call ``program(placed_params, *arg_leaves)`` with ``placed_params`` from
    ``place_params``; arguments are the full-batch leaves in the traced order. ``fn`` is the
    jitted SPMD program; it returns each model output sharded over "stage" along
    ``output_splits[i].axis`` (module docstring, "Outputs"): the model's own array when
    ``parts`` is the stage count, else one padded with a zero block per stage before the
    last ``parts``, which ``outputs`` drops. A device's result is its piece, nothing more.
    """

    graph: LayerGraph
    mesh: Mesh
    stages: tuple[StageLayout, ...]
    storage: SlotStorage | SplitStorage
    num_microbatches: int
    schedule: str
    fn: Callable
    output_splits: tuple[OutputSplit, ...]
    virtual: int = 1  # stages per device (``stages`` has S x virtual entries)

    def __call__(self, placed_params, *arg_leaves):
        """Runs the program; outputs are the model's, each spread over the stages' devices
        (``outputs``)."""
        return self.outputs(self.fn(placed_params, *arg_leaves))

    def outputs(self, results) -> object:
        """The model's outputs, in its tree, from ``fn``'s results (``passes.outputs.assemble``):
        ``fn``'s arrays where every stage holds a piece; else the last ``parts`` stages'
        pieces, where they lie, as one array over their devices (a slice under an outer
        ``jax.jit``).

        Example:
            >>> logits = program.outputs(program.fn(placed, tokens))
            >>> {s.data.shape for s in logits.addressable_shards}  # 4 stages, 2 x 4 rows
            {(2, 16, 256)}
        """
        flat = [assemble(o, sp, self.mesh)
                for o, sp in zip(results, self.output_splits, strict=True)]
        return jax.tree.unflatten(self.graph.traced.out_treedef, flat)

    def place_params(self, param_leaves: Sequence):
        """Places each stage's weights on its own device(s), once.

        Args:
            param_leaves: ``TracedModel.params`` (real arrays), in the traced order.
        """
        values = _param_values(self.graph, param_leaves)
        groups = self.storage.stage_params if isinstance(self.storage, SlotStorage) else \
            [st.params for st in self.stages]  # per device: its stages' weights
        return self.storage.place(self.mesh, [[values[i] for i in params]
                                              for params in groups])

    def abstract_args(self) -> list:
        """ShapeDtypeStructs of ``fn``'s arguments (placed weights, full-batch call leaves):
        ``fn.lower(*program.abstract_args())`` compiles the program without running it."""
        traced = self.graph.traced
        args = [jax.ShapeDtypeStruct(
                    (a.shape[0] * self.num_microbatches, *a.shape[1:]) if b else a.shape,
                    a.dtype)
                for a, b in zip(traced.args, traced.batch_shaped, strict=True)]
        return [self.storage.abstract(self.mesh, self.mesh.devices.shape[0]), *args]


def carry_layout(cuts: Sequence[Sequence[Var]]
                 ) -> tuple[list[tuple[Slot, ...]], dict[str, int]]:
    """Per cut, where its values sit in the carry buffers; and the buffers' sizes per dtype
    (the largest cut's, so every tick moves buffers of one shape)."""
    carry_slots = [layout([v.aval for v in cut])[0] for cut in cuts]
    carry_sizes: dict[str, int] = {}
    for cut in cuts:
        for dt, n in layout([v.aval for v in cut])[1].items():
            carry_sizes[dt] = max(carry_sizes.get(dt, 0), n)
    return carry_slots, carry_sizes


def stage_layouts(graph: LayerGraph, ranges: Sequence[tuple[int, int]],
                  cuts: Sequence[Sequence[Var]]) -> list[StageLayout]:
    """Each stage's segments (the prologue on the first), parameters (the epilogue's on the
    last) and incoming/outgoing cut values."""
    segs = graph.segments
    stages = []
    for s, (start, stop) in enumerate(ranges):
        stage_segs = segs[start + 1: stop + 1]
        if s == 0:
            stage_segs = (graph.prologue, *stage_segs)
        params = tuple(dict.fromkeys(i for seg in stage_segs for i in seg.params))
        if s == len(ranges) - 1:
            params = tuple(dict.fromkeys((*params, *graph.epilogue.params)))
        stages.append(StageLayout(
            segments=tuple(stage_segs), params=params,
            carry_in=cuts[s - 1] if s > 0 else (), carry_out=cuts[s],
        ))
    return stages


def _param_values(graph: LayerGraph, leaves: Sequence) -> list:
    out = []
    for info in graph.params:
        x = leaves[info.source]
        out.append(x if info.slice_index is None else x[info.slice_index])
    return out


def _eval(segs: Sequence[Segment], env: dict, stage: int) -> None:
    """Binds the segments' equations under the scope ``stage_{stage}`` (and ``prologue`` /
    ``epilogue`` for those), so each compiled instruction's op_name says where it came from
    (``passes/collectives.py`` names the stage and layer of a collective that would hang)."""
    with jax.named_scope(f"stage_{stage}"):
        for seg in segs:
            with jax.named_scope(seg.name) if seg.kind != "layer" else contextlib.nullcontext():
                for eqn in seg.eqns:
                    ins = [v.val if isinstance(v, JaxLiteral) else env[v] for v in eqn.invars]
                    if any(isinstance(x, Encoded) for x in ins):
                        _decode_operands(eqn, ins, env)
                    outs = bind_eqn(eqn, ins)
                    env.update(zip(eqn.outvars, outs, strict=True))


def _decode_operands(eqn, ins: list, env: dict) -> None:
    """Decodes the compressed weights ``eqn`` reads, after its other operand (the layer's
    activation) exists, and keeps the decoded weights in ``env`` for later readers."""
    anchor = next((x for x in ins if not isinstance(x, Encoded) and hasattr(x, "shape")),
                  None)
    for k, (v, x) in enumerate(zip(eqn.invars, ins, strict=True)):
        if isinstance(x, Encoded):
            ins[k] = env[v] = x.decode_after(anchor)


def lower(
    graph: LayerGraph,
    ranges: Sequence[tuple[int, int]],
    devices: Sequence,
    num_microbatches: int,
    schedule: str = "gpipe",
    tp: int = 1,
    compression: Compression | None = None,
    codecs: Sequence | None = None,
    virtual: int = 1,
) -> PipelineProgram:
    """Builds the pipeline program for stages covering layer ``ranges`` (half-open).

    Args:
        graph: LayerGraph traced at the microbatch size.
        ranges: per stage, the (start, stop) layer indices it runs.
        devices: ``tp`` devices per stage, stage-major.
        num_microbatches: M; the call's batch is M times the traced batch.
        schedule: a name in ``passes.schedules.SCHEDULES``.
        tp: devices per stage; > 1 splits every stage's layers over a "tp" mesh axis.
        compression: store matmul weights compressed (``passes/codec.py``): each device
            holds its stage's compressed bytes and decodes them inside its branch.
        codecs: per graph parameter, its codec (``passes.codec.ParamCodec``) or None,
            instead of ``compression``'s (a recompressed model mixes policies by stage).
        virtual: stages per device (a schedule with ``virtual_stages``, e.g. "circular"):
            the ``ranges`` are V = S x virtual stages, stage k on device k mod S, which
            holds the weights of all its stages.

    Returns:
        PipelineProgram.
    """
    sched = schedules.get(schedule)
    if virtual != 1 and (not sched.virtual_stages or tp != 1 or len(ranges) % virtual):
        raise ConfigError(
            f"virtual={virtual} stages per device needs a schedule that runs them "
            f"(circular), tp=1 and a stage count divisible by it; got schedule={schedule!r}, "
            f"tp={tp}, {len(ranges)} stages.")
    num_virtual = len(ranges)
    num_stages = num_virtual // virtual  # devices (x tp)
    devices = list(devices)[:num_stages * tp]
    if tp == 1:
        mesh = Mesh(np.array(devices), (AXIS,))
    else:
        mesh = Mesh(np.array(devices).reshape(num_stages, tp), (AXIS, "tp"))
    cuts = cut_values(graph, ranges)  # cuts[-1]: what the epilogue and outputs read
    carry_slots, carry_sizes = carry_layout(cuts)
    param_vars = graph.param_vars
    stages = stage_layouts(graph, ranges, cuts)
    # the parameters each device holds: those of its stages k = s, s + S, ...
    device_params = [tuple(dict.fromkeys(i for k in range(s, num_virtual, num_stages)
                                         for i in stages[k].params))
                     for s in range(num_stages)]

    if codecs is None and compression is not None:
        codecs = build_codecs(graph, compression)
    if tp > 1 and codecs is not None and any(c is not None for c in codecs):
        raise CompressionError(
            f"compressed weights ({getattr(compression, 'name', 'codecs')}) with stages split "
            f"over tp={tp} devices: "
            "compressed weights run on unsplit stages only. Plan with more capacity or "
            "without 'split' in allow=.")
    if tp == 1:
        storage: SlotStorage | SplitStorage = SlotStorage(device_params, param_vars, codecs)
    else:
        storage = SplitStorage([st.params for st in stages], param_vars,
                               _stage_axes(graph, stages, tp), tp)
    jaxpr = graph.jaxpr.jaxpr
    consts = dict(zip(jaxpr.constvars, graph.jaxpr.consts, strict=True))
    arg_vars = graph.arg_vars
    out_avals = [v.aval for v in jaxpr.outvars]
    m = num_microbatches
    last = num_virtual - 1  # the stage that runs the epilogue, on device num_stages - 1
    for a in out_avals:
        if not a.shape or (m > 1 and a.shape[0] != graph.traced.batch_size):
            raise InputError(
                f"model output of shape {tuple(a.shape)} has no leading batch axis of size "
                f"{graph.traced.batch_size}; a pipeline can only return per-example outputs. "
                "Return batch-leading arrays, or use one microbatch."
            )
    splits, interleave = output_splits(out_avals, num_stages, m)

    def stage_env(k: int, params, mb_args) -> dict:
        """Stage k's environment on its device: its weights (the device unpacks all of its
        stages' weights as bitcasts; stage k's equations read only its own)."""
        env = dict(consts)
        s = k % num_stages
        held = dict(zip(device_params[s], storage.unpack(params, s, lazy=True), strict=True))
        env.update((param_vars[i], held[i]) for i in stages[k].params)
        env.update(zip(arg_vars, mb_args, strict=True))
        return env

    def make_branch(s: int, st: StageLayout):
        def branch(carry, mb_args, params):
            env = stage_env(s, params, mb_args)
            if s > 0:
                env.update(zip(st.carry_in, unpack(carry, carry_slots[s - 1]), strict=True))
            _eval(st.segments, env, s)
            return pack([env[v] for v in st.carry_out], carry_slots[s], carry_sizes)

        return branch

    def idle(carry, mb_args, params):
        return zeros(carry_sizes)

    def epilogue(params, final, mb_args) -> list:
        """The last stage's epilogue on one microbatch's final carry -> the model's outputs."""
        env = stage_env(last, params, mb_args)
        env.update(zip(cuts[-1], unpack(final, carry_slots[-1]), strict=True))
        _eval((graph.epilogue,), env, last)
        outs = [v.val if isinstance(v, JaxLiteral) else env[v] for v in jaxpr.outvars]
        return [jnp.broadcast_to(jnp.asarray(o, a.dtype), a.shape)
                for o, a in zip(outs, out_avals, strict=True)]

    branches = [make_branch(k, st) for k, st in enumerate(stages)] + [idle]
    batch_shaped = graph.traced.batch_shaped
    perm = [(i, (i + 1) % num_stages) for i in range(num_stages - (0 if sched.ring else 1))]

    def microbatch(mb_args_all, mb) -> list:
        """Microbatch ``mb`` of each argument (interleaved: ``passes/outputs.py``)."""
        return [microbatch_view(a, mb) if b else a
                for a, b in zip(mb_args_all, batch_shaped, strict=True)]

    def per_device(params, *mb_args_all):
        stage = jax.lax.axis_index(AXIS)

        def step(state, mb, valid, k):
            carry, finals = state
            index = jnp.where(valid, k, num_virtual)
            carry_out = jax.lax.switch(index, branches, carry, microbatch(mb_args_all, mb),
                                       params)
            # The last stage's un-sent carry feeds the epilogue: it is written to its
            # microbatch's slot of M, every other tick to a spare slot M, so a device holds
            # M + 1 carries whatever the tick count (stacking each tick's output would hold
            # M + S - 1, and virtual x M + S - 1 under the circular schedule).
            slot = jnp.where(valid & (k == last), mb, m)
            finals = {dt: jax.lax.dynamic_update_index_in_dim(f, carry_out[dt], slot, 0)
                      for dt, f in finals.items()}
            sent = carry_out
            if num_stages > 1:
                # one ppermute per tick: the carry's dtypes travel as one uint8 buffer
                sent = send(carry_out, AXIS, perm)
            return (sent, finals), None

        finals = {dt: jnp.zeros((m + 1, *b.shape), b.dtype)
                  for dt, b in zeros(carry_sizes).items()}
        (_, finals), _ = sched.run(step, (zeros(carry_sizes), finals), stage=stage,
                                   num_stages=num_stages, num_microbatches=m, virtual=virtual)

        # The epilogue (final norm, LM head) runs after the loop, on the last stage only, one
        # microbatch at a time: its outputs are written once, not carried through every tick,
        # and each microbatch's are spread over the stages as soon as they exist, so no
        # device holds all of them.
        def emit(held, x):
            final, k = x
            outs = jax.lax.cond(
                stage == num_stages - 1,
                lambda: epilogue(params, final, microbatch(mb_args_all, k)),
                lambda: [jnp.zeros(a.shape, a.dtype) for a in out_avals])
            if tp > 1:  # whole pieces on every tp device of a stage, as the model returns
                outs = [jax.lax.with_sharding_constraint(o, NamedSharding(mesh, P()))
                        for o in outs]
            return [spread(o, h, sp, k, num_stages)
                    for o, h, sp in zip(outs, held, splits, strict=True)], None

        held = [held_zeros(a, sp, m, interleave) for a, sp in zip(out_avals, splits, strict=True)]
        held, _ = jax.lax.scan(emit, held, ({dt: f[:m] for dt, f in finals.items()},
                                            jnp.arange(m)))
        outs = [held_result(h) for h in held]
        if tp > 1:
            outs = [jax.lax.with_sharding_constraint(o, NamedSharding(mesh, P())) for o in outs]
        return outs

    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(storage.specs(), *[P() for _ in arg_vars]),
        out_specs=[sp.spec() for sp in splits], axis_names={AXIS}, check_vma=False,
    )

    def program(packed_params, *arg_leaves):
        split = [batch_view(a, m, interleave) if b else a
                 for a, b in zip(arg_leaves, batch_shaped, strict=True)]
        return sharded(packed_params, *split)

    prog = PipelineProgram(graph=graph, mesh=mesh, stages=tuple(stages), storage=storage,
                           num_microbatches=m, schedule=schedule, fn=jax.jit(program),
                           output_splits=splits, virtual=virtual)
    if tp > 1:
        verify_split(prog, tp)
    return prog


# ---- split stages: the split rule per stage, and the check that nothing can hang -------------

def _stage_axes(graph: LayerGraph, stages: Sequence[StageLayout], tp: int
                ) -> list[dict[int, int | None]]:
    """Per stage, each parameter's split axis (``passes.tp.split_axes``, the planner's rule),
    from the first of the stage's segments that reads it."""
    out = []
    for s, st in enumerate(stages):
        segs = (*st.segments, graph.epilogue) if s == len(stages) - 1 else st.segments
        axes: dict[int, int | None] = {}
        for seg in segs:
            for i, axis in split_axes(graph, seg, tp).items():
                axes.setdefault(i, axis)
        out.append(axes)
    return out


def verify_split(program: PipelineProgram, tp: int) -> None:
    """Compiles ``program`` (abstractly: nothing runs; the call that follows reuses the
    compilation) and refuses it when a collective inside a stage's branch needs devices of
    another stage (``passes/collectives.py``): such a program would hang.

    Raises:
        SplitError: naming the stage, its layers, the collective, the weights split in the
            layer it came from, and what to change.
    """
    text = program.fn.lower(*program.abstract_args()).compile().as_text()
    graph, stages, storage = program.graph, program.stages, program.storage
    device_ids = [int(d.id) for d in program.mesh.devices.ravel()]
    views = []
    for s, st in enumerate(stages):
        keys = dict(zip(st.params, (key for key, _ in storage.where[s]), strict=True))
        segs = (*st.segments, graph.epilogue) if s == len(stages) - 1 else st.segments
        split = tuple((seg.name, tuple(
            f"{graph.params[i].path} {list(shape)} on axis {axis} "
            f"({shape[axis]} -> {shape[axis] // tp} per device)"
            for i in seg.params for shape, _, axis in [keys[i]] if axis is not None))
            for seg in segs)
        views.append(StageView(devices=tuple(device_ids[s * tp:(s + 1) * tp]),
                               layers=tuple(seg.name for seg in st.segments), split=split))
    check(text, views, tp)
