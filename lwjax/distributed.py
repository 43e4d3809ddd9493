"""Several processes, one pipeline: ``jax.distributed`` with bounded timeouts, and a lost peer
as an error, not a hang.

A multi-process run is the same script on every process (SPMD): each calls
``lwjax.distributed.initialize()`` before anything touches JAX, then makes the same lwjax calls
with ``devices=jax.devices()``, which lists every process's devices. CPU processes exchange
activations through gloo, GPU hosts through NCCL; lwjax adds no transport of its own.

- **Start**: ``lwjax launch -n 2 -- python script.py`` (``lwjax/launch.py``) starts the
  processes on this machine with ``LWJAX_COORDINATOR``, ``LWJAX_NUM_PROCESSES`` and
  ``LWJAX_PROCESS_ID`` set, which ``initialize()`` reads (on separate hosts, set them by hand:
  README, "Running on GPU hosts"). Without them ``initialize()`` does nothing and the script
  runs as one process.
- **Outputs** are jax Arrays over every process's devices: each process holds the pieces on
  its own devices (``x.addressable_shards``); ``gather(x)`` gives every process the whole
  value as numpy.
- **Gradients and weights**: ``sm.value_and_grad(...)`` and ``sm.export_params(...)`` are
  collectives: every process calls them and gets the whole tree (gathered), on its first
  local device, equal bit for bit to a single process's.
- **Same plan everywhere**: processes must run the same program. ``hardware.host_cpu()``
  measures once, on process 0, and shares the figures (``shared``), so plans made from it
  agree; ``ShardedModel``, ``Generator`` and the training programs (``value_and_grad``,
  ``train_step``) check that every process planned the same (``agree``, ``agree_plan``):
  ``ConfigError`` on every process, naming the processes that differ, instead of a hang.
- **A lost peer**: every process writes a heartbeat counter into the coordination service's
  key-value store every ``heartbeat_seconds / 4``; a peer whose counter stands still for
  ``heartbeat_seconds``, or that wrote that it failed, is lost. The survivor then raises
  ``PeerLostError`` naming it: from a ``ShardedModel`` call, or in place of the error a broken
  collective raised when that error is not caught. Whatever its main thread is doing (a
  collective whose peer died may never return: seen with gloo on CPU), the process exits
  with status 75 at most ``exit_seconds`` after the loss was found, so within
  ``Timeouts.bound_seconds`` of the death (6.5 s for a 2 s heartbeat, measured 2.9-6.0 s in
  tests/test_multiprocess.py's scenario; 20.5 s by default). JAX's own heartbeat is set
  longer, as a backstop (when it fires, JAX aborts the process). A process done with its
  work waits at exit, still watching, for the others to finish.
- **Losing process 0**, which hosts JAX's coordination service:
  - when it *fails* (an uncaught error), it publishes the error and waits (at most
    ``bound_seconds``) until the others have named it in their PeerLostError and are
    exiting with status 75, then exits with status 1;
  - when it *dies* (killed, crashed), the service dies with it, and JAX's client in every
    other process notices at once (its error poll's RPC fails) and aborts the process:
    stderr shows "Terminating process because the JAX distributed service detected fatal
    errors ... UNAVAILABLE: Failed to send RPC to coordination service", then SIGABRT (status
    134 from a shell), within a second of the death, before lwjax's heartbeat (which beats
    every ``heartbeat_seconds / 4``) can see anything. lwjax cannot word it: jax 0.10.2 lets
    a client take a ``missed_heartbeat_callback`` instead of aborting, but calling it
    crashes with ``std::bad_cast`` (the error status does not convert to Python), and a
    SIGABRT handler cannot resume. ``lwjax launch`` names process 0 in its summary.

Example:
    >>> from lwjax import distributed
    >>> distributed.initialize()          # first, before anything touches JAX
    >>> sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices())
    >>> logits = distributed.gather(sm(tokens))   # numpy, the whole batch, on every process
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np

from lwjax import peers
from lwjax._compat import distributed_client
from lwjax.errors import ConfigError, LwjaxError
from lwjax.peers import EXIT_PEER_LOST as EXIT_PEER_LOST
from lwjax.peers import Processes as Processes
from lwjax.peers import Timeouts as Timeouts

ENV_COORDINATOR = "LWJAX_COORDINATOR"
ENV_NUM_PROCESSES = "LWJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LWJAX_PROCESS_ID"
ENV_CPU_DEVICES = "LWJAX_CPU_DEVICES"
ENV_HEARTBEAT = "LWJAX_HEARTBEAT_SECONDS"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_devices: int | None = None,
               timeouts: Timeouts | None = None) -> Processes | None:
    """Joins a multi-process run: ``jax.distributed.initialize`` with bounded timeouts, gloo
    collectives on CPU, and lwjax's watch for lost peers. Call it first, before anything
    touches JAX (``jax.devices()`` included).

    Args:
        coordinator: host:port of process 0's coordination service (default
            ``$LWJAX_COORDINATOR``).
        num_processes: the run's process count (default ``$LWJAX_NUM_PROCESSES``).
        process_id: this process's index (default ``$LWJAX_PROCESS_ID``).
        cpu_devices: simulated CPU devices per process (``jax_num_cpu_devices``; default
            ``$LWJAX_CPU_DEVICES``, else JAX's default). Ignored by GPU backends.
        timeouts: Timeouts (default: ``Timeouts()``, with ``heartbeat_seconds`` from
            ``$LWJAX_HEARTBEAT_SECONDS`` when set).

    Returns:
        Processes, or None when neither the arguments nor the environment describe a run
        (the script then runs as one process and this call changes nothing).

    Raises:
        ConfigError: a run described in part, a bad value, a second call, or JAX already
            started.
        LwjaxError: the processes did not all connect within ``connect_seconds``.

    Example:
        >>> run = lwjax.distributed.initialize()   # under `lwjax launch -n 2 -- python ...`
        >>> run.process_id, run.num_processes, len(jax.devices())
        (0, 2, 16)
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _int_env(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _int_env(ENV_PROCESS_ID)
    if cpu_devices is None:
        cpu_devices = _int_env(ENV_CPU_DEVICES)
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(
            f"a multi-process run needs the coordinator address, the process count and this "
            f"process's index; {', '.join(missing)} not given (arguments, or ${ENV_COORDINATOR}, "
            f"${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}: `lwjax launch` sets them).")
    if not (isinstance(num_processes, int) and isinstance(process_id, int)
            and 0 <= process_id < num_processes):
        raise ConfigError(f"process_id={process_id} with num_processes={num_processes}: the "
                          "ids of a run are 0 .. num_processes - 1.")
    if cpu_devices is not None and cpu_devices < 1:
        raise ConfigError(f"cpu_devices must be at least 1, got {cpu_devices}.")
    if timeouts is None:
        heartbeat = os.environ.get(ENV_HEARTBEAT)
        timeouts = Timeouts() if not heartbeat else Timeouts(
            heartbeat_seconds=_float_env(ENV_HEARTBEAT, heartbeat))
    if peers.active() is not None or distributed_client() is not None:
        raise ConfigError("lwjax.distributed.initialize (or jax.distributed.initialize) was "
                          "called already; call it once, first thing in the script.")
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id,
            initialization_timeout=math.ceil(timeouts.connect_seconds),
            heartbeat_timeout_seconds=timeouts.jax_heartbeat_seconds,
            shutdown_timeout_seconds=math.ceil(timeouts.shutdown_seconds))
    except RuntimeError as e:
        if "before any JAX calls" in str(e):
            raise ConfigError("lwjax.distributed.initialize must run before anything touches "
                              "JAX (jax.devices(), an array, a jit): call it first in the "
                              "script.") from e
        raise LwjaxError(
            f"process {process_id}: the {num_processes} processes did not all reach the "
            f"coordinator {coordinator} within {timeouts.connect_seconds:g} s; start every "
            f"process (ids 0 .. {num_processes - 1}) with the same address, or raise "
            "Timeouts.connect_seconds.") from e
    run = Processes(process_id=process_id, num_processes=num_processes,
                    coordinator=str(coordinator), timeouts=timeouts)
    peers.start(distributed_client(), run)
    return run


def gather(tree):
    """Every array's whole value as numpy, on every process: a collective, so every process
    must call it, on the same arrays. Arrays over devices of every process go through
    ``jax.experimental.multihost_utils.process_allgather``; arrays that some process holds no
    piece of (a plan whose stages all sit on other processes) are assembled from what each
    process holds (each sends an array of the full shape); numpy passes through.

    Example:
        >>> logits = lwjax.distributed.gather(sm(tokens))   # [B, S, V] numpy everywhere
    """
    return jax.tree.map(_whole, tree)


def _whole(x):
    from jax.experimental import multihost_utils

    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return np.asarray(x)
    # decided on what every process sees alike (not is_fully_addressable): all take one path
    holders = {d.process_index for d in x.sharding.device_set}
    if holders == set(range(jax.process_count())):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    value, held = np.zeros(x.shape, x.dtype), np.zeros(x.shape, bool)
    for shard in x.addressable_shards:
        value[shard.index], held[shard.index] = np.asarray(shard.data), True
    values, helds = multihost_utils.process_allgather((value, held))  # [processes, ...]
    out = np.zeros(x.shape, x.dtype)
    for v, h in zip(values, helds, strict=True):
        out[h] = v[h]
    return out


def lost_processes() -> tuple[int, ...]:
    """The processes found lost so far (empty in a single-process run).

    Example:
        >>> lwjax.distributed.lost_processes()
        ()
    """
    watch = peers.active()
    return () if watch is None else tuple(sorted(watch.lost))


def check() -> None:
    """Raises PeerLostError when a peer has been found lost (a no-op in a single-process run):
    for loops that want to stop between steps rather than inside one.

    Example:
        >>> for batch in batches:
        ...     lwjax.distributed.check()
        ...     state, loss = step(state, *batch)
    """
    watch = peers.active()
    if watch is not None:
        watch.raise_if_lost()


@contextlib.contextmanager
def peer_guard():
    """Runs a multi-process lwjax call: fails at once with PeerLostError when a peer is known
    lost, and turns the error a broken collective raises into PeerLostError once the loss is
    found (waiting at most ``heartbeat_seconds``). A no-op in a single-process run.

    Example:
        >>> with peer_guard():
        ...     out = program(params, *leaves)
    """
    watch = peers.active()
    if watch is None:
        yield
        return
    watch.raise_if_lost()
    try:
        yield
    except LwjaxError:
        raise
    except Exception as e:
        if watch.explains(e):
            watch.raised = True
            raise watch.error() from e
        raise


def agree(text: str, what: str) -> None:
    """Checks that every process computed the same ``text`` (e.g. a plan's stages): runs that
    differ would compile different programs and wait on each other forever. Every process
    must call it, in the same order. A no-op in a single-process run.

    Raises:
        ConfigError: naming the processes whose ``what`` differs from process 0's, and both.

    Example:
        >>> agree(json.dumps([s.layer_range for s in plan.stages]), "plan")
    """
    watch = peers.active()
    if watch is None or watch.run.num_processes == 1:
        return
    n = watch.next_agreement()
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    watch.client.key_value_set(f"lwjax/agree/{n}/{watch.run.process_id}",
                               json.dumps({"digest": digest, "text": text[:4000]}))
    values = {p: json.loads(watch.wait_value(f"lwjax/agree/{n}/{p}", f"its {what}"))
              for p in range(watch.run.num_processes)}
    differ = [p for p, v in values.items() if v["digest"] != values[0]["digest"]]
    if differ:
        raise ConfigError(
            f"processes {differ} computed a different {what} from process 0's, so they would "
            f"run different programs and wait on each other. Process 0: {values[0]['text']}; "
            f"process {differ[0]}: {values[differ[0]]['text']}. Give every process the same "
            f"arguments (and a hardware preset, e.g. hardware='h100', if figures measured on "
            f"each process differ), or plan once and pass plan=.")


def agree_plan(plan, what: str, **extra) -> None:
    """``agree`` on what a program compiled from ``plan`` depends on: its stages (layers,
    devices), microbatches and tp, and ``extra`` (JSON-able: a schedule, input shapes).
    Every process must call it, in the same order; a no-op in a single-process run.

    Raises:
        ConfigError: as ``agree``, naming the processes that differ from process 0.

    Example:
        >>> agree_plan(g.plan, "generation plan", prompt_shape=[4, 8], max_new_tokens=16)
    """
    if peers.active() is None:
        return
    agree(json.dumps({"stages": [[list(s.layer_range), list(s.devices)] for s in plan.stages],
                      "microbatches": plan.microbatches, "tp": plan.tp,
                      "virtual": plan.virtual, **extra},
                     default=str), what)


def shared(name: str, compute: Callable[[], str]) -> str:
    """Process 0's ``compute()`` on every process: process 0 computes and publishes the text,
    the others wait for it (at most ``connect_seconds``) instead of computing their own (e.g.
    measured hardware figures, which would differ). Outside a run: ``compute()``.

    Example:
        >>> speeds = shared("host_cpu", lambda: json.dumps(measure()))
    """
    watch = peers.active()
    if watch is None or watch.run.num_processes == 1:
        return compute()
    key = f"lwjax/shared/{name}"
    if watch.run.process_id == 0:
        value = compute()
        watch.client.key_value_set(key, value, allow_overwrite=True)
        return value
    return watch.wait_value(key, f"{name!r}", process=0)


def _int_env(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"${name}={text!r} is not an integer.") from None


def _float_env(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"${name}={text!r} is not a number of seconds.") from None
