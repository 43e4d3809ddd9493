"""The public entry points: each reads as a short chain of passes."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np

from lwjax import hardware as hardware_lib
from lwjax import tune as tune_lib
from lwjax.errors import CapacityError, ConfigError, DeviceError, InputError
from lwjax.hardware import HardwareSpec
from lwjax.passes import compression as compression_lib
from lwjax.passes import footprint as footprint_lib
from lwjax.passes import schedules
from lwjax.passes import train_footprint as train_lib
from lwjax.passes.backend import DEFAULT_BACKEND, Backend, check_runnable
from lwjax.passes.compression import Compression
from lwjax.passes.discovery import LayersSpec
from lwjax.passes.footprint import AttentionAssumption
from lwjax.passes.independence import Mixing, batch_mixing
from lwjax.passes.lower import lower
from lwjax.passes.planner import device_id
from lwjax.passes.segment import LayerGraph, segment
from lwjax.passes.strategies import STRATEGIES, Target, search_plans
from lwjax.passes.trace import Mode, TracedModel, trace
from lwjax.plan import Objective, Plan, PlanMode, Residency
from lwjax.plan_check import check_plan, check_plan_batch
from lwjax.report import LayerReport, ModelReport
from lwjax.sharded import ShardedModel


def _report(graph: LayerGraph, fp: footprint_lib.GraphFootprint, attention: str,
            cache_len: int | None) -> ModelReport:
    def row(seg, f):
        return LayerReport(name=seg.name, kind=seg.kind, footprint=f, signature=seg.signature,
                           num_params=len(seg.params))

    return ModelReport(
        layers=tuple(row(s, f) for s, f in zip(graph.layers, fp.layers, strict=True)),
        prologue=row(graph.prologue, fp.prologue),
        epilogue=row(graph.epilogue, fp.epilogue),
        mode=graph.traced.mode,
        microbatch_size=graph.traced.batch_size,
        compression=fp.compression.name,
        attention=attention,
        cache_len=cache_len,
        layers_found=graph.family.describe(graph.total_weights_bytes) if graph.family else "",
        outside_weights_share=graph.outside_weights_share,
        shared_weights_share=graph.shared_weights_share,
    )


def analyze(
    model,
    *args,
    mode: Mode = "prefill",
    cache_len: int | None = None,
    microbatch_size: int | None = None,
    compression: str | Compression | None = None,
    attention: AttentionAssumption = "as_traced",
    backend: Backend = DEFAULT_BACKEND,
    unbatched: Sequence[int | str] = (),
    batched: Sequence[int | str] = (),
    layers: LayersSpec = None,
    **kwargs,
) -> ModelReport:
    """Per-layer on-chip footprints of a model: trace -> segment -> footprint.

    Args:
        model: a Flax NNX module (real or ``models.abstract``), or a linen module followed
            by its variables in ``args``.
        *args: example call arguments (arrays or ``jax.ShapeDtypeStruct``).
        mode: "prefill" (forward over the sequence) or "decode" (one step, KV cache).
        cache_len: decode: KV-cache positions (default: the config's seq_len).
        microbatch_size: footprints for this batch (default: the arguments' batch).
        compression: None, a preset name ("int8", "int8-2:4", "int4", "int4-2:4",
            "int4-75%") or an ``lwjax.Compression``.
        attention: "as_traced", or "fused" to assume a flash-attention kernel (planning for
            a GPU from a CPU trace).
        backend: whose bytes to count: "gpu" (the traced dtypes) or "cpu" (with the float32
            copies XLA:CPU makes of 16-bit matmuls; see ``passes/backend.py``).
        unbatched: array arguments that are not per-example although their leading size is
            the batch (positional indices or keyword names; see ``passes.trace.trace``).
        batched: array arguments that are per-example, where lwjax cannot tell (see
            ``passes.trace.trace``: it asks when the model also accepts them whole).
        layers: None (find the layers from the model's structure), a scope pattern such as
            ``"transformer/h/*"`` (``*`` matches one scope; it may start at any depth), or a
            callable from an equation's name stack to its layer's name (None: no layer).
        **kwargs: further call arguments.

    Returns:
        ModelReport.

    Example:
        >>> report = lwjax.analyze(models.abstract(models.configs.seed_dense()),
        ...                        jax.ShapeDtypeStruct((16, 10000), jnp.int32),
        ...                        compression="int8", attention="fused")
        >>> report.layers[0].footprint.weights_bytes
        268558336
    """
    traced = trace(model, *args, mode=mode, cache_len=cache_len,
                   microbatch_size=microbatch_size, unbatched=unbatched, batched=batched,
                   **kwargs)
    graph = segment(traced, layers)
    fp = footprint_lib.footprint(graph, compression, attention=attention, backend=backend)
    if mode == "decode" and cache_len is None:
        cache_len = graph.traced.args[1].shape[1] if len(graph.traced.args) > 1 else None
    return _report(graph, fp, attention, cache_len)


# ---- planning and sharding ------------------------------------------------------------------

def _hardware(hardware, devices) -> HardwareSpec:
    if isinstance(hardware, HardwareSpec):
        return hardware
    if isinstance(hardware, str):
        return hardware_lib.by_name(hardware)
    if hardware is not None:
        raise ConfigError(f"hardware must be a HardwareSpec or a preset name, got {hardware!r}.")
    platform = devices[0].platform if devices is not None and len(devices) else "cpu"
    if platform == "gpu" and "H200" in getattr(devices[0], "device_kind", ""):
        return hardware_lib.H200
    if platform == "gpu":
        return hardware_lib.H100_SXM
    return hardware_lib.host_cpu()


def _devices(devices, num_devices) -> tuple[list | None, tuple[int, ...]]:
    """Device objects (None when planning abstractly) and their ids."""
    if devices is not None:
        try:
            devices = list(devices)
        except TypeError:
            raise DeviceError(f"devices= must be a list of jax devices or device ids, got "
                              f"{devices!r}.") from None
        if not devices:
            raise DeviceError("devices=[] is empty; pass at least one device.")
        ids = [device_id(d, "devices=") for d in devices]
        is_id = [not hasattr(d, "id") for d in devices]
        if any(is_id) and not all(is_id):
            raise DeviceError("devices= mixes jax devices and integer ids; pass one kind.")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise DeviceError(f"Duplicate devices {dup} in devices=; list each device once.")
        if num_devices is not None and num_devices != len(ids):
            raise DeviceError(f"num_devices={num_devices} but {len(ids)} devices were given.")
        objs = None if all(is_id) else devices
        return objs, tuple(ids)
    if num_devices is None:
        raise DeviceError("Give num_devices= or devices= to plan for.")
    count = _whole(num_devices)
    if count is None or count < 1:
        raise DeviceError(f"num_devices must be a positive integer, got {num_devices!r}.")
    return None, tuple(range(count))


def _whole(x) -> int | None:
    """``x`` as an int when it is a whole number (int, numpy integer, integral float), else
    None; booleans are not numbers here."""
    if isinstance(x, bool | np.bool_):
        return None
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real) and math.isfinite(x) and float(x).is_integer():
        return int(x)
    return None


def _microbatches(batch: int, microbatches: int | None, num_devices: int) -> int:
    if microbatches is None:
        return max(m for m in range(1, min(batch, num_devices) + 1) if batch % m == 0)
    count = _whole(microbatches)
    if count is None or count < 1:
        raise InputError(f"microbatches must be a positive integer, got {microbatches!r}.")
    microbatches = count
    if batch % microbatches:
        raise InputError(
            f"batch {batch} does not divide into {microbatches} microbatches; pick a divisor "
            f"of {batch} (e.g. {', '.join(str(d) for d in range(1, batch + 1) if batch % d == 0)})."
        )
    return microbatches


def _capacity(cache_bytes, hw: HardwareSpec, persisting: bool,
              train_devices: int | None = None) -> int:
    """The capacity per device: ``cache_bytes``, else the persisting L2 when asked, else for
    training (``train_devices``: the devices planned for) the device memory -- a training
    stage keeps weights, gradients, optimizer state and activations there, not in L2; the
    simulated devices of a CPU share its RAM, a share each -- else the L2."""
    if cache_bytes is None:
        if persisting:
            if hw.persisting_l2_bytes is None:
                raise CapacityError(f"{hw.name} has no persisting-L2 limit; give the capacity "
                                    "with cache_bytes=.")
            return hw.persisting_l2_bytes
        if train_devices is not None:
            return hw.hbm_bytes // train_devices if hw.kind == "cpu" else hw.hbm_bytes
        return hw.l2_bytes
    count = _whole(cache_bytes)
    if count is None or count < 1:
        raise CapacityError(
            f"cache_bytes must be a positive whole number of bytes, got {cache_bytes!r}; e.g. "
            f"50 * 2**20 for a 50 MiB L2."
        )
    return count


def _plan_graph(model, args, kwargs, *, devices, num_devices, hardware, cache_bytes,
                compression, microbatches, mode, cache_len, residency, attention, persisting,
                method, allow=(), objective="step", unbatched=(), batched=(), layers=None,
                given: Plan | None = None, run: bool = False,
                training: train_lib.Training | None = None, top: int = 1,
                schedules: tuple[str, ...] = ("gpipe", "circular")):
    """Plans and returns ``(plans, graph_at, device objects or None, full batch)``: the plan
    first, then (``top`` > 1, where the layout search decides) the next best layouts'
    (``strategies.search_plans``); ``graph_at(plan.microbatch_size)`` is a plan's graph.
    ``allow``: the edge-case strategies the search may use, in order
    (``passes/strategies.py``); none by default. ``training``: with mode="train".
    ``schedules``: those the layout search may pick (forward passes)."""
    objs, ids = _devices(devices, num_devices)
    hw = _hardware(hardware, objs)
    capacity = _capacity(cache_bytes, hw, persisting, len(ids) if training else None)
    allow = () if allow is None else (allow,) if isinstance(allow, str) else tuple(allow)
    if training is not None:  # training runs the weights uncompressed
        allow = tuple(a for a in allow if a != "compress")
    traced_mode = "prefill" if mode == "train" else mode  # training traces the forward
    graphs: dict[int, LayerGraph] = {}
    traces: dict[int, TracedModel] = {}

    def traced_at(size: int) -> TracedModel:  # a retrace per microbatch size, memoised
        if size not in traces:
            traces[size] = trace(model, *args, mode=traced_mode, cache_len=cache_len,
                                 microbatch_size=size, unbatched=unbatched, batched=batched,
                                 **kwargs)
        return traces[size]

    def graph_at(size: int) -> LayerGraph:
        if size not in graphs:
            graphs[size] = segment(traced_at(size), layers)
        return graphs[size]

    # The batch is the first call argument's leading size (after a linen module's variables);
    # read it without tracing at the full batch, or trace to get the error where it is unclear.
    first = jax.tree.leaves((args[1:] if isinstance(model, nn.Module) else args)[:1])
    shape = getattr(first[0], "shape", None) if first else None
    batch = int(shape[0]) if shape else trace(
        model, *args, mode=traced_mode, cache_len=cache_len, unbatched=unbatched,
        batched=batched, **kwargs).batch_size
    if batch < 1:
        raise InputError(f"the first argument has shape {tuple(shape)}: an empty batch. Pass at "
                         "least one example (the leading axis is the batch).")
    if given is not None:
        if microbatches is not None and _whole(microbatches) != given.microbatches:
            raise ConfigError(
                f"microbatches={microbatches!r} but the given plan runs "
                f"{given.microbatches}; a plan runs as it is: drop microbatches=, or plan "
                "again with it.")
        graph = graph_at(check_plan_batch(given, batch))
        mixing = _mixing(traced_at, batch) if given.microbatches > 1 else None
        if mixing is not None:
            raise _mixing_error(mixing, given.microbatches, "the given plan runs")
        check_plan(given, graph, ids)
        if run and objs is not None:
            check_runnable(graph, objs[0].platform)
        return [given], graph_at, objs, batch
    m = _microbatches(batch, microbatches, len(ids))
    graph_at(batch // m)  # an argument that does not split into microbatches is said first
    # the check traces the whole batch once more, where microbatches may be used
    mixing = _mixing(traced_at, batch) if m > 1 or "microbatch" in allow else None
    if mixing is not None:
        if microbatches is not None and m > 1:
            raise _mixing_error(mixing, m, "microbatches=")
        m, allow = 1, tuple(a for a in allow if a != "microbatch")
    if run and objs is not None:  # dtypes the devices cannot run are refused before planning
        check_runnable(graph_at(batch // m), objs[0].platform)
    if attention is None:
        attention = "fused" if hw.kind == "gpu" else "as_traced"
    # M unpinned: the layout search (passes/layout.py) picks it among the batch's divisors
    counts = tuple(d for d in range(1, batch + 1) if batch % d == 0) \
        if microbatches is None and "microbatch" in allow else ()
    target = Target(hardware=hw, capacity_bytes=capacity, device_ids=ids, batch_size=batch,
                    microbatch_size=batch // m, compression=compression_lib.get(compression),
                    mode=mode, residency=residency, attention=attention, method=method,
                    allow=allow, model=type(model).__name__, objective=objective,
                    training=training, microbatch_counts=counts, schedules=schedules)
    plans = search_plans(graph_at, target, top)
    if mixing is not None:
        plans = [dataclasses.replace(p, notes=(*p.notes, _mixing_note(mixing))) for p in plans]
    return plans, graph_at, objs, batch


def _mixing(traced_at, batch: int) -> Mixing | None:
    """The equation that makes one example's answer depend on another's (None: none found or
    a batch of one), from the trace at the whole batch (``passes/independence.py``): only
    there is a slice of some examples (``x[:4]`` of 8) seen as partial."""
    return None if batch == 1 else batch_mixing(traced_at(batch)).mixing


def _mixing_note(mixing: Mixing) -> str:
    return (f"microbatches: 1, because the model mixes the examples of its batch "
            f"({mixing.describe()}): microbatches run on their own would change its answers")


def _mixing_error(mixing: Mixing, m: int, asked: str) -> InputError:
    return InputError(
        f"{asked} {m} microbatches, but the model mixes the examples of its batch: "
        f"{mixing.describe()}. A pipeline runs each microbatch through the model on its own, "
        f"so with M = {m} one example's answer would no longer see the other examples it "
        "sees in the whole batch. Pass microbatches=1 (and leave \"microbatch\" out of "
        "allow=), or compute the model so that every example is handled on its own; if the "
        "value comes from an argument that is not per-example although its leading size is "
        "the batch (a [T, T] mask when T equals the batch), name it in unbatched=.")


def plan(
    model,
    *args,
    num_devices: int | None = None,
    devices=None,
    hardware: HardwareSpec | str | None = None,
    cache_bytes: int | None = None,
    compression: str | Compression | None = None,
    microbatches: int | None = None,
    mode: PlanMode = "prefill",
    cache_len: int | None = None,
    residency: Residency = "all",
    attention: AttentionAssumption | None = None,
    persisting: bool = False,
    method: str = "optimal",
    allow: Sequence[str] | None = STRATEGIES,
    objective: Objective = "step",
    unbatched: Sequence[int | str] = (),
    batched: Sequence[int | str] = (),
    layers: LayersSpec = None,
    schedule: str | None = None,
    optimizer=None,
    **kwargs,
) -> Plan:
    """Plans a layer-wise deployment: trace -> segment -> footprint -> cost -> partition.

    With the default objective="step" a forward pass's layout is searched first
    (``passes/layout.py``): stage count x tp per stage (when "split" is allowed) x microbatch
    count (when ``microbatches`` is not given and "microbatch" is allowed), the TP x PP meshes
    among the candidates, each scored by the projected step; the notes say what won and by
    how much over the runner-up and the best mesh. When nothing there fits (or for
    objective="bottleneck", decode and training), the edge-case strategies in ``allow`` are
    tried, least intrusive first (``passes/strategies.py``): "split" (every stage over
    tp = 2, 4, ... devices), "compress" (the next presets of ``compression.ESCALATION``),
    "microbatch" (smaller microbatches, retraced). ``Plan.strategy`` and ``Plan.notes`` say
    what was used and why.

    Args:
        model: NNX module (real or abstract), or linen module followed by its variables.
        *args: example call arguments (arrays or ShapeDtypeStructs).
        num_devices: plan for this many devices (ids 0..k-1), or
        devices: a list of jax devices or device ids.
        hardware: a HardwareSpec or preset name ("h100", "h200", "cpu"); default from the
            devices' platform (this machine's CPU when planning abstractly).
        cache_bytes: on-chip capacity per device (default: the hardware's L2 size; for
            mode="train" its device memory, ``hbm_bytes``, shared out among the devices on a
            CPU).
        compression: None, a preset name, or an lwjax.Compression (the starting policy).
        microbatches: M, pinned (default: the layout search picks it among the batch's
            divisors; without it, the largest divisor of the batch <= the device count); the
            "microbatch" strategy may raise it when nothing fits.
        mode: "prefill", "decode" or "train" (a stage also holds gradients, optimizer state
            and the stashed inputs of its microbatches in flight, and runs forward,
            recompute and backward: ``passes/train_footprint.py``; "compress" is dropped from
            ``allow``: training compressed weights is not supported).
        cache_len: decode: KV-cache positions.
        residency: "all" (weights + activations + buffers fit) or "weights".
        attention: "as_traced" or "fused" (default: fused on GPUs, as traced on CPUs).
        persisting: plan against the hardware's persisting-L2 limit instead of its L2 size.
        method: "optimal" (minimum bottleneck) or "greedy" (first fit) partitioning.
        allow: edge-case strategies, in order of preference: any of "split", "compress",
            "microbatch"; () or None plans exactly as requested.
        objective: "step" (default: the layout with the shortest projected GPipe step; on a
            CPU this counts the cores the simulated devices share and the measured per-tick
            floor) or "bottleneck" (the fewest stages with the smallest slowest-stage time).
        unbatched: array arguments that are not per-example although their leading size is
            the batch (see ``analyze``).
        batched: array arguments that are per-example, where lwjax cannot tell (see
            ``analyze``).
        layers: name the layers when discovery cannot decide (see ``analyze``).
        schedule: mode="train": "gpipe" (default; stashes all M microbatches' stage inputs)
            or "1f1b" (at most min(S, M)). mode="prefill": None (the layout search picks
            GPipe or the circular schedule), "gpipe" (one stage per device: a plan that
            training can also run) or "circular" (its layouts only).
        optimizer: mode="train": the optax GradientTransformation whose state is counted
            (default ``optax.adamw(1e-3)``).
        **kwargs: further call arguments of the model.

    Returns:
        Plan.

    Raises:
        ConfigError: an unknown schedule, an optimizer that is not an optax
            GradientTransformation, mode="train" with compression or residency="weights", or
            optimizer= without mode="train" (schedule= too, but for a forward one).
        InfeasiblePlanError: nothing allowed fits; the message and the attributes
            ``min_devices``, ``min_capacity`` and ``min_compression`` say what would.

    Example:
        >>> p = lwjax.plan(models.abstract(models.configs.tiny_dense()),
        ...                jax.ShapeDtypeStruct((4, 16), jnp.int32), num_devices=4,
        ...                hardware="h100")
        >>> print(p.summary())
        >>> t = lwjax.plan(models.abstract(models.configs.seed_dense()),
        ...                jax.ShapeDtypeStruct((16, 10000), jnp.int32), num_devices=16,
        ...                hardware="h100", mode="train", schedule="1f1b")
        >>> t.schedule, t.optimizer, t.capacity_bytes
        ('1f1b', 'optax.adamw(1e-3)', 80000000000)
    """
    if schedule is not None and mode != "train":
        if schedule not in schedules.SCHEDULES and schedule not in schedules.TRAIN_SCHEDULES:
            raise ConfigError(
                f"schedule={schedule!r} is neither a forward pass's schedule "
                f"{sorted(schedules.SCHEDULES)} (mode='prefill') nor a training one "
                f"{sorted(schedules.TRAIN_SCHEDULES)} (mode='train').")
        if schedule in FORWARD_SCHEDULES and mode != "prefill":
            raise ConfigError(
                f"schedule={schedule!r} picks a forward pass's pipeline schedule, for "
                f"mode='prefill' (got mode={mode!r}; decoding plans run their own ring). "
                "Leave schedule= out, or pass mode='prefill'.")
    forward = schedule in FORWARD_SCHEDULES and mode == "prefill"
    training = _training(mode, None if forward else schedule, optimizer, compression,
                         residency)
    found = _plan_graph(model, args, kwargs, devices=devices, num_devices=num_devices,
                        hardware=hardware, cache_bytes=cache_bytes, compression=compression,
                        microbatches=microbatches, mode=mode, cache_len=cache_len,
                        residency=residency, attention=attention, persisting=persisting,
                        method=method, allow=allow, objective=objective,
                        unbatched=unbatched, batched=batched, layers=layers,
                        training=training, schedules=_forward_schedules(
                            schedule if forward else None))[0][0]
    _check_circular(schedule if forward else None, found)
    return found


FORWARD_SCHEDULES = ("gpipe", "circular")


def _forward_schedules(schedule: str | None) -> tuple[str, ...]:
    """The schedules a forward pass's layout search may pick: both, or the one asked."""
    return FORWARD_SCHEDULES if schedule is None else (schedule,)


def _check_circular(schedule: str | None, plan: Plan) -> None:
    """schedule="circular" asked and planned, or why not (never a silent GPipe plan)."""
    if schedule == "circular" and plan.virtual == 1:
        raise ConfigError(
            f"schedule='circular' found no circular layout for this plan "
            f"({len(plan.stages)} stage(s) on {plan.num_devices} device(s)): the layout "
            "search, which alone plans several stages per device, runs with "
            "objective='step' and something to choose (allow= with 'split', or "
            "'microbatch' without microbatches=), and needs >= 2 devices, >= 4 layers and "
            "devices that hold their stages. Change those, or leave schedule= out.")


def _training(mode, schedule, optimizer, compression, residency) -> train_lib.Training | None:
    """The training configuration of ``plan(mode="train", ...)``, checked before tracing."""
    if mode != "train":
        if schedule is not None or optimizer is not None:
            raise ConfigError(f"schedule= and optimizer= plan training; pass mode='train' "
                              f"(got mode={mode!r}).")
        return None
    training = train_lib.training(schedule, optimizer)
    if compression_lib.get(compression).name != "none":
        raise ConfigError(f"mode='train' with compression={compression!r}: training compressed "
                          "weights is not supported; plan training with compression=None.")
    if residency != "all":
        raise ConfigError("mode='train' keeps weights, gradients, optimizer state and "
                          "activations in device memory: plan with residency='all'.")
    return training


def planned_compression(plan: Plan, asked: str | Compression | None) -> Compression:
    """The policy a plan counted on: the one asked for, or the preset the "compress"
    strategy escalated to (``Plan.compression`` names it)."""
    policy = compression_lib.get(asked)
    return policy if policy.name == plan.compression else compression_lib.get(plan.compression)


# lwjax.plan's options that layerwise_shard does not take (its other keyword arguments go to
# the model's call): what to use instead
_PLAN_ONLY = {
    "mode": "layerwise_shard runs the forward pass; to train, call sm.train_step(loss_fn, "
            "optimizer) or sm.value_and_grad(loss_fn) on the ShardedModel it returns, and to "
            "generate use lwjax.Generator; lwjax.plan(..., mode=) plans those without running",
    "cache_len": "KV caches belong to generation: use lwjax.Generator",
    "microbatch_size": "pass microbatches= (the number of microbatches M) instead",
}


def _refuse_plan_options(kwargs) -> None:
    for key in kwargs:
        if key in _PLAN_ONLY:
            raise ConfigError(f"layerwise_shard(..., {key}=...): {key} is not an option of "
                              f"layerwise_shard (its other keyword arguments go to the model's "
                              f"call): {_PLAN_ONLY[key]}.")


def layerwise_shard(
    model,
    *args,
    devices=None,
    hardware: HardwareSpec | str | None = None,
    cache_bytes: int | None = None,
    microbatches: int | None = None,
    compression: str | Compression | None = None,
    residency: Residency = "all",
    schedule: str | None = None,
    allow: Sequence[str] = ("split", "microbatch"),
    objective: Objective = "step",
    unbatched: Sequence[int | str] = (),
    batched: Sequence[int | str] = (),
    layers: LayersSpec = None,
    plan: Plan | None = None,
    tune: int = 0,
    **kwargs,
) -> ShardedModel:
    """Runs a model as a layer-wise pipeline: trace -> segment -> footprint -> partition ->
    lower, with each stage's weights on its own device.

    Args:
        model: NNX module, or linen module followed by its variables in ``args``.
        *args: example call arguments; calls must match their shapes and dtypes.
        devices: jax devices to use (default: all of ``jax.devices()``).
        hardware: HardwareSpec or preset name for footprints and costs (default: from the
            devices' platform).
        cache_bytes: on-chip capacity per device (default: the hardware's L2 size).
        microbatches: M, pinned (the batch must divide into M; default: the layout search
            picks it, see ``plan``); the "microbatch" strategy in allow= may raise it when a
            stage does not fit -- pin it fully with allow=("split",).
        compression: None, a preset name ("int8", "int4", "int8-2:4", "int4-75%", ...) or
            an ``lwjax.Compression``: matmul weights are stored compressed on their stage
            and decoded inside it (``passes/codec.py``); the plan counts the stored bytes.
        residency: "all" or "weights" (see ``plan``).
        schedule: None (default: the layout search picks GPipe or the circular schedule,
            several stages per device, whichever it projects faster), or a name in
            ``passes.schedules.SCHEDULES`` to search that schedule's layouts only: "gpipe"
            (one stage per device) or "circular" (2..8 stages per device; with a given plan
            of one stage per device it runs as GPipe does).
        allow: edge-case strategies when the plan does not fit: "split" (stages over tp
            devices, lowered to a "tp" mesh axis), "microbatch", and "compress" (the next
            presets of ``compression.ESCALATION``, stored and run compressed; not with
            split stages).
        objective: "step" or "bottleneck" (see ``plan``).
        unbatched: array arguments passed whole to every microbatch although their leading
            size is the batch (a [T, T] mask when T equals the batch): positional indices or
            keyword names. Every other array argument whose leading size is the batch is
            split into microbatches, so the model must treat the examples of a batch
            independently (no batch statistics) to give its own answers: a model found
            to mix them (``passes/independence.py``) is planned at M = 1, and
            ``microbatches`` > 1 then raises ``InputError``. When the model
            also accepts such an argument whole, lwjax asks (``InputError``) instead of
            guessing.
        batched: array arguments confirmed to hold one row per example.
        layers: name the layers when discovery cannot decide (see ``analyze``).
        plan: run this Plan (from ``lwjax.plan``, ``Plan.replan`` or ``Plan.from_json``) as
            it is, without planning: its layers, microbatches and devices. It must have been
            made for this model (same layers, shapes and dtypes) and batch, for prefill or
            training (``mode="train"``: ``train_step`` then uses its schedule); a compressed
            plan runs compressed; ``devices`` must hold its device ids. The planning options
            (``cache_bytes``, ``microbatches``, ``allow``, ...) are then ignored.
        tune: measure the layout search's ``tune`` best layouts (distinct stage count, tp
            and M) on the devices and keep the fastest (``lwjax/tune.py``; 0 or 1: its
            first choice, unmeasured). Each candidate is compiled and called 1 + 3 times on
            the example arguments (zeros where they are ShapeDtypeStructs), with all
            candidates' weights placed at once; ``plan.notes`` lists the medians. Single
            process only; ignored with ``plan=`` and where no layout search runs
            (``objective="bottleneck"``, or no split or microbatch count to choose).
        **kwargs: further call arguments (arrays are microbatched when batch-shaped).

    Returns:
        ShardedModel; ``sm(*args, **kwargs)`` equals ``model(*args, **kwargs)``.

    Example:
        >>> sm = lwjax.layerwise_shard(model, tokens, cache_bytes=2**20, microbatches=4)
        >>> logits = sm(tokens)
        >>> again = lwjax.layerwise_shard(model, tokens, plan=sm.plan.replan(exclude_devices=[1]))
    """
    if devices is None:
        devices = jax.devices()
    _refuse_plan_options(kwargs)
    allow = (allow,) if isinstance(allow, str) else tuple(allow or ())
    if schedule is not None:
        schedules.get(schedule)  # an unknown name fails here, before tracing and planning
    count = tune_lib.check_tune(tune, given=plan is not None)
    plans, graph_at, objs, batch = _plan_graph(
        model, args, kwargs, devices=devices, num_devices=None, hardware=hardware,
        cache_bytes=cache_bytes, compression=compression, microbatches=microbatches,
        mode="prefill", cache_len=None, residency=residency, attention=None,
        persisting=False, method="optimal", allow=allow, objective=objective,
        unbatched=unbatched, batched=batched, layers=layers, given=plan, run=True,
        top=max(count, tune_lib.FALLBACK), schedules=_forward_schedules(schedule))
    if plan is None:
        _check_circular(schedule, plans[0])
    if objs is None:
        raise DeviceError("layerwise_shard runs on jax devices: pass devices=jax.devices(), "
                          "not device ids.")
    by_id = {d.id: d for d in objs}

    def build(plan_: Plan) -> ShardedModel:
        graph = graph_at(plan_.microbatch_size)
        if plan_.virtual > 1 and schedule == "gpipe":
            raise ConfigError(
                f"schedule='gpipe' runs one stage per device, and the given plan runs "
                f"{plan_.virtual} per device (circular). Leave schedule= out, or plan again "
                "with schedule='gpipe'.")
        stage_devices = [by_id[i] for s in plan_.stages[:plan_.ring] for i in s.devices]
        program = lower(graph, [s.layer_range for s in plan_.stages], stage_devices,
                        plan_.microbatches, schedule=schedule or plan_.pipeline_schedule,
                        tp=plan_.tp, compression=planned_compression(plan_, compression),
                        virtual=plan_.virtual)
        return ShardedModel(plan_, program, graph.traced, batch)

    if plan is not None:
        return build(plans[0])  # a given plan runs as it is
    call_args = args[1:] if isinstance(model, nn.Module) else args  # not linen's variables
    return tune_lib.deploy(plans, build, call_args, kwargs, count)
