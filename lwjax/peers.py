"""The watch over a multi-process run's peers: heartbeats through the coordination
service's key-value store, the verdict on a lost peer, and how the process ends then
(``lwjax.distributed`` starts it; its docstring says what a user sees).

Every ``beat_seconds`` (``heartbeat_seconds / 4``) a thread writes this process's counter
and state ("running", "exited", "failed: <error>") under ``lwjax/peers/<id>`` and reads the
others'. A second thread judges, so a blocked RPC cannot hold the verdict up: a peer whose
counter stood still for ``heartbeat_seconds`` (counted up to the last read that worked), or
that wrote that it failed, is lost; when the service itself stops answering, process 0 is.
``exit_seconds`` after a verdict the process ends with status 75 whatever its main thread
is doing. An uncaught error ends it at once: as PeerLostError (status 75) when a lost peer
explains it, else published as "failed" for the peers to name (status 1), skipping JAX's
exit barrier, which cannot complete while the peers wait in collectives for this process.
A process ending on a lost peer first writes "exiting"; process 0, ending on an error,
waits for every peer's "exiting" first (``Watch.outlast_peers``), as JAX aborts the
processes still connected when process 0's coordination service goes.

Example:
    >>> watch = peers.start(client, run)      # lwjax.distributed.initialize does this
    >>> peers.active().lost                    # {process id: reason}
    {}
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback

import jax

from lwjax.errors import ConfigError, PeerLostError

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


_watch: Watch | None = None


def active() -> Watch | None:
    """The running watch, or None outside a multi-process run."""
    return _watch


def start(client, run: Processes) -> Watch:
    """Starts watching ``run``'s peers through ``client`` (the coordination service's), and
    takes over uncaught errors and the exit (see the module docstring)."""
    global _watch
    _watch = Watch(client, run)
    _watch.start()
    sys.excepthook = _excepthook
    # atexit runs last-registered first: this runs before JAX's own clean-up, whose exit
    # barrier cannot complete once a peer is lost (JAX would abort there).
    atexit.register(_at_exit)
    return _watch


class Watch:
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
                elif state in ("running", "exiting") and silent > limit:
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
                         f"{reason.rstrip('.')}")
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

    def wait_for_peers(self) -> None:
        """Returns when every peer is done ("exited"), one is lost, or ``shutdown_seconds``
        have passed (then JAX's exit barrier decides)."""
        end = time.monotonic() + self.timeouts.shutdown_seconds
        while not self.lost and time.monotonic() < end:
            with self.lock:
                done = all(self.info.get(p, {}).get("state") == "exited" for p in self.peers)
            if done:
                return
            time.sleep(self.timeouts.beat_seconds / 2)

    def outlast_peers(self) -> None:
        """Process 0, about to end on an error: waits (at most ``bound_seconds``) until every
        peer not found lost says it is ending ("exiting"). Process 0 hosts the coordination
        service, and JAX aborts every process still connected when it goes
        (``lwjax.distributed``): waiting lets them end as lwjax says, naming the culprit. (A
        peer that is done waits at exit for process 0, so it is still connected too.)"""
        if self.run.process_id != 0:
            return
        end = time.monotonic() + self.timeouts.bound_seconds
        while time.monotonic() < end:
            with self.lock:
                going = [p for p in self.peers if p not in self.lost and
                         self.info.get(p, {}).get("state") != "exiting"]
            if not going:
                time.sleep(min(0.2, self.timeouts.beat_seconds))  # their exit after the write
                return
            time.sleep(self.timeouts.beat_seconds / 4)


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
    watch.outlast_peers()
    os._exit(1)


def _at_exit() -> None:
    """A process done with its work waits, still watching, until every peer is done too:
    one that fails meanwhile ends it with status 75 here, rather than at JAX's exit barrier,
    which would wait for the dead peer until JAX aborts."""
    watch = _watch
    if watch is None:
        return
    if not watch.lost:
        watch.publish_state("exited")
        watch.wait_for_peers()
    if watch.lost:
        _die(None if watch.raised else watch.error(), "")
    watch.stopped.set()


def _die(error: PeerLostError | None, why: str) -> None:
    if error is not None:
        sys.stderr.write(f"lwjax: {type(error).__module__}.{type(error).__name__}: {error}"
                         f"{f' ({why})' if why else ''}\n")
    elif why:
        sys.stderr.write(f"lwjax: a peer was lost; {why} (status {EXIT_PEER_LOST})\n")
    _flush()
    watch = _watch
    if watch is not None:
        # tell process 0, which outlasts the others, that this one is going; a thread, so
        # that an RPC to a coordination service that no longer answers cannot hold the exit
        said = threading.Thread(target=watch.publish_state, args=("exiting",), daemon=True)
        said.start()
        said.join(min(1.0, watch.timeouts.beat_seconds))
        watch.outlast_peers()
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
