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
- **Same plan everywhere**: processes must run the same program. ``hardware.host_cpu()``
  measures once, on process 0, and shares the figures (``shared``), so plans made from it
  agree; ``ShardedModel`` checks that every process planned the same stages (``agree``).
- **A lost peer**: every process writes a heartbeat counter into the coordination service's
  key-value store every ``heartbeat_seconds / 4``; a peer whose counter stands still for
  ``heartbeat_seconds``, or that wrote that it failed, is lost. The survivor then raises
  ``PeerLostError`` naming it: from a ``ShardedModel`` call, or in place of the error a broken
  collective raised when that error is not caught. Whatever its main thread is doing (a
  collective whose peer died may never return: seen with gloo on CPU), the process exits
  with status 75 at most ``exit_seconds`` after the loss was found, so within
  ``Timeouts.bound_seconds`` of the death (6.5 s for a 2 s heartbeat, measured 6-7 s in
  tests/test_multiprocess.py; 20.5 s by default). JAX's own heartbeat is set longer, as a backstop
  (when it fires, JAX aborts the process). Losing process 0, which hosts the coordination
  service, is the one case lwjax cannot word: JAX aborts the other processes at once
  ("Terminating process because the JAX distributed service detected fatal errors");
  ``lwjax launch`` then names process 0 in its summary.

Example:
    >>> from lwjax import distributed
    >>> distributed.initialize()          # first, before anything touches JAX
    >>> sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices())
    >>> logits = distributed.gather(sm(tokens))   # numpy, the whole batch, on every process
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

import jax
import numpy as np

from lwjax._compat import distributed_client
from lwjax.errors import ConfigError, LwjaxError, PeerLostError

ENV_COORDINATOR = "LWJAX_COORDINATOR"
ENV_NUM_PROCESSES = "LWJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LWJAX_PROCESS_ID"
ENV_CPU_DEVICES = "LWJAX_CPU_DEVICES"
ENV_HEARTBEAT = "LWJAX_HEARTBEAT_SECONDS"
EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the run may be started again
_PEERS = "lwjax/peers/"
# What a collective says when the process at the other end is gone (gloo, NCCL, gRPC).
_TRANSPORT = re.compile(r"gloo|nccl|connection|peer|socket|unavailable|deadline|remote",
                        re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long a multi-process run waits, in seconds.

    Attributes:
        heartbeat_seconds: a peer whose heartbeat stands still this long is lost.
        exit_seconds: after a loss is found, the longest a survivor keeps running.
        connect_seconds: how long ``initialize`` waits for every process to connect (and a
            process waits for process 0's shared values).
        shutdown_seconds: how long a finishing process waits at JAX's exit barrier for the
            others to finish.

    Example:
        >>> t = Timeouts(heartbeat_seconds=2)
        >>> t.bound_seconds, t.jax_heartbeat_seconds
        (6.5, 12)
    """

    heartbeat_seconds: float = 10.0
    exit_seconds: float = 3.0
    connect_seconds: float = 120.0
    shutdown_seconds: float = 60.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ConfigError(f"Timeouts.{field.name} must be a positive number of "
                                  f"seconds, got {value!r}.")

    @property
    def jax_heartbeat_seconds(self) -> int:
        """JAX's own heartbeat timeout: longer than lwjax's finding and exiting, so lwjax
        names the lost process before JAX aborts."""
        return math.ceil(2 * self.heartbeat_seconds + self.exit_seconds) + 5

    @property
    def beat_seconds(self) -> float:
        """How often a process writes its heartbeat and reads the others'."""
        return self.heartbeat_seconds / 4

    @property
    def bound_seconds(self) -> float:
        """The longest a survivor runs after a peer dies: the heartbeat, up to three beats
        of sampling delay (the peer's last write, this process's read, the verdict), then
        ``exit_seconds``."""
        return self.heartbeat_seconds + 3 * self.beat_seconds + self.exit_seconds


@dataclasses.dataclass(frozen=True)
class Processes:
    """The run ``initialize`` joined.

    Attributes:
        process_id: this process's index, 0 .. num_processes - 1 (``jax.process_index()``).
        num_processes: how many processes the run has.
        coordinator: host:port of the coordination service (on process 0).
        timeouts: the Timeouts in force.
    """

    process_id: int
    num_processes: int
    coordinator: str
    timeouts: Timeouts


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
    if _watch is not None or distributed_client() is not None:
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
    _start_watch(run)
    return run


def gather(tree):
    """Every array's whole value as numpy, on every process (``jax.experimental.
    multihost_utils.process_allgather``): a collective, so every process must call it.
    Arrays a process holds whole (and numpy) pass through ``np.asarray``.

    Example:
        >>> logits = lwjax.distributed.gather(sm(tokens))   # [B, S, V] numpy everywhere
    """
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(whole, tree)


def lost_processes() -> tuple[int, ...]:
    """The processes found lost so far (empty in a single-process run).

    Example:
        >>> lwjax.distributed.lost_processes()
        ()
    """
    return () if _watch is None else tuple(sorted(_watch.lost))


def check() -> None:
    """Raises PeerLostError when a peer has been found lost (a no-op in a single-process run):
    for loops that want to stop between steps rather than inside one.

    Example:
        >>> for batch in batches:
        ...     lwjax.distributed.check()
        ...     state, loss = step(state, *batch)
    """
    if _watch is not None:
        _watch.raise_if_lost()


@contextlib.contextmanager
def peer_guard():
    """Runs a multi-process lwjax call: fails at once with PeerLostError when a peer is known
    lost, and turns the error a broken collective raises into PeerLostError once the loss is
    found (waiting at most ``heartbeat_seconds``). A no-op in a single-process run.

    Example:
        >>> with peer_guard():
        ...     out = program(params, *leaves)
    """
    watch = _watch
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
    watch = _watch
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


def shared(name: str, compute: Callable[[], str]) -> str:
    """Process 0's ``compute()`` on every process: process 0 computes and publishes the text,
    the others wait for it (at most ``connect_seconds``) instead of computing their own (e.g.
    measured hardware figures, which would differ). Outside a run: ``compute()``.

    Example:
        >>> speeds = shared("host_cpu", lambda: json.dumps(measure()))
    """
    watch = _watch
    if watch is None or watch.run.num_processes == 1:
        return compute()
    key = f"lwjax/shared/{name}"
    if watch.run.process_id == 0:
        value = compute()
        watch.client.key_value_set(key, value, allow_overwrite=True)
        return value
    return watch.wait_value(key, f"{name!r}", process=0)


# ---- the watch ------------------------------------------------------------------------------

_watch: _Watch | None = None


def _start_watch(run: Processes) -> None:
    global _watch
    _watch = _Watch(distributed_client(), run)
    _watch.start()
    sys.excepthook = _excepthook
    # atexit runs last-registered first: this runs before JAX's own clean-up, whose exit
    # barrier cannot complete once a peer is lost (JAX would abort there).
    atexit.register(_at_exit)


class _Watch:
    """Heartbeats through the coordination service's key-value store, and their verdict."""

    def __init__(self, client, run: Processes):
        self.client, self.run, self.timeouts = client, run, run.timeouts
        self.peers = [p for p in range(run.num_processes) if p != run.process_id]
        self.lock = threading.Lock()
        self.lost: dict[int, str] = {}
        self.found = threading.Event()
        self.raised = False  # PeerLostError reached the main thread
        self.state = "running"
        self.seq = 0
        self.agreements = 0
        now = time.monotonic()
        self.last_ok = now
        self.rpc_error = ""
        self.info: dict[int, dict] = {}
        self.beats: dict[int, object] = {}
        self.changed = dict.fromkeys(self.peers, now)
        self.stopped = threading.Event()

    def start(self) -> None:
        self._beat()
        threading.Thread(target=self._beat_loop, name="lwjax-heartbeat", daemon=True).start()
        threading.Thread(target=self._judge_loop, name="lwjax-peer-watch", daemon=True).start()

    # -- heartbeats: one write and one read per beat
    def _beat_loop(self) -> None:
        while not self.stopped.wait(self.timeouts.beat_seconds):
            self._beat()

    def _beat(self) -> None:
        self.seq += 1
        value = json.dumps({"beat": self.seq, "state": self.state, "pid": os.getpid(),
                            "host": socket.gethostname()})
        try:
            self.client.key_value_set(f"{_PEERS}{self.run.process_id}", value,
                                      allow_overwrite=True)
            entries = self.client.key_value_dir_get(_PEERS)
        except Exception as e:  # the coordination service is gone or not answering
            self.rpc_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            return
        now = time.monotonic()
        with self.lock:
            self.last_ok = now
            for key, text in entries:
                p = int(key.rsplit("/", 1)[-1])
                if p == self.run.process_id:
                    continue
                info = json.loads(text)
                self.info[p] = info
                if info["beat"] != self.beats.get(p):
                    self.beats[p], self.changed[p] = info["beat"], now

    # -- the verdict: a thread of its own, so a blocked RPC cannot hold it up
    def _judge_loop(self) -> None:
        while not self.stopped.wait(self.timeouts.beat_seconds / 2):
            self._judge()

    def _judge(self) -> None:
        limit = self.timeouts.heartbeat_seconds
        now = time.monotonic()
        found = {}
        with self.lock:
            if now - self.last_ok > limit:
                found[0] = (f"the coordination service it hosts ({self.run.coordinator}) has "
                            f"not answered for {now - self.last_ok:.1f} s ({self.rpc_error})")
            for p in self.peers:
                state = self.info.get(p, {}).get("state", "running")
                # silence counts up to the last read that worked: with the service down,
                # only process 0 is to blame
                silent = self.last_ok - self.changed[p]
                if state.startswith("failed"):
                    found[p] = state
                elif state == "running" and silent > limit:
                    found[p] = f"no heartbeat for {silent:.1f} s (heartbeat_seconds={limit:g})"
            new = {p: r for p, r in found.items() if p not in self.lost}
            self.lost.update(new)
        if new and not self.found.is_set():
            self.found.set()
            threading.Thread(target=self._exit_later, name="lwjax-peer-exit",
                             daemon=True).start()

    def _exit_later(self) -> None:
        """Ends the process ``exit_seconds`` after the loss was found, whatever the main
        thread is doing (it may wait in a collective that never returns)."""
        time.sleep(self.timeouts.exit_seconds)
        _die(None if self.raised else self.error(),
             f"exiting {self.timeouts.exit_seconds:g} s after the loss was found")

    # -- what the main thread asks
    def raise_if_lost(self) -> None:
        if self.lost:
            self.raised = True
            raise self.error()

    def explains(self, error: BaseException) -> bool:
        """Whether ``error`` comes from a lost peer: one is lost already, or ``error`` reads
        like a broken collective and a loss is found within ``heartbeat_seconds``."""
        if self.lost:
            return True
        if not _TRANSPORT.search(str(error)):
            return False
        wait = self.timeouts.heartbeat_seconds + 2 * self.timeouts.beat_seconds
        return self.found.wait(wait)

    def error(self) -> PeerLostError:
        with self.lock:
            lost = dict(sorted(self.lost.items()))
            info = dict(self.info)
        devices: dict[int, list[int]] = {}
        with contextlib.suppress(Exception):
            for d in jax.devices():
                devices.setdefault(d.process_index, []).append(int(d.id))
        n = self.run.num_processes
        parts = []
        for p, reason in lost.items():
            where = [f"pid {info[p]['pid']} on {info[p]['host']}"] if p in info else []
            if p in devices:
                where.append(f"devices {_ranges(devices[p])}")
            role = ", the coordinator" if p == 0 else ""
            parts.append(f"process {p} of {n}{role} ({'; '.join(where) or 'never seen'}): "
                         f"{reason}")
        err = PeerLostError(
            f"process {self.run.process_id} lost a peer: {'; '.join(parts)}. The pipeline's "
            f"stages on its devices are gone, so this run cannot go on: this process exits "
            f"(status {EXIT_PEER_LOST}) within {self.timeouts.exit_seconds:g} s. Start the run "
            "again (lwjax launch), or plan on the remaining devices.")
        err.processes = tuple(lost)
        err.reasons = tuple(lost.values())
        return err

    def next_agreement(self) -> int:
        self.agreements += 1
        return self.agreements

    def wait_value(self, key: str, what: str, process: int | None = None) -> str:
        """The value at ``key``, waiting for its writer (at most ``connect_seconds``; a lost
        peer ends the wait with PeerLostError)."""
        deadline = time.monotonic() + self.timeouts.connect_seconds
        step_ms = max(1, int(self.timeouts.beat_seconds * 1000))
        while True:
            self.raise_if_lost()
            try:
                return self.client.blocking_key_value_get(key, step_ms)
            except Exception as e:
                if time.monotonic() > deadline:
                    who = f"process {process}" if process is not None else "every process"
                    raise ConfigError(
                        f"process {self.run.process_id} waited "
                        f"{self.timeouts.connect_seconds:g} s for {who} to publish {what} "
                        f"({key}); every process must make the same lwjax calls in the same "
                        "order.") from e

    def publish_state(self, state: str) -> None:
        self.state = state
        with contextlib.suppress(Exception):
            self._beat()


def _excepthook(exc_type, exc, tb) -> None:
    """An uncaught error in a multi-process run: a lost peer's shows as PeerLostError and the
    process exits with status 75; any other is published (the peers name it) and the process
    exits at once, as its peers wait in collectives for it and cannot finish."""
    watch = _watch
    if watch is None:
        sys.__excepthook__(exc_type, exc, tb)
        return
    if not isinstance(exc, PeerLostError) and isinstance(exc, Exception) and \
            watch.explains(exc):
        err = watch.error()
        err.__cause__ = exc
        exc_type, exc, tb = PeerLostError, err, None
    traceback.print_exception(exc_type, exc, tb)
    if isinstance(exc, PeerLostError):
        _die(None, "")
    first = (traceback.format_exception_only(exc_type, exc) or [exc_type.__name__])[-1]
    watch.publish_state(f"failed: {first.strip()[:500]}")
    _flush()
    os._exit(1)


def _at_exit() -> None:
    watch = _watch
    if watch is None:
        return
    if watch.lost:
        _die(None if watch.raised else watch.error(), "")
    watch.stopped.set()
    watch.publish_state("exited")


def _die(error: PeerLostError | None, why: str) -> None:
    if error is not None:
        sys.stderr.write(f"lwjax: {type(error).__module__}.{type(error).__name__}: {error}"
                         f"{f' ({why})' if why else ''}\n")
    elif why:
        sys.stderr.write(f"lwjax: a peer was lost; {why} (status {EXIT_PEER_LOST})\n")
    _flush()
    os._exit(EXIT_PEER_LOST)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


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
