"""``lwjax launch``: the processes of one multi-process run, started on this machine.

Each process runs the same command with ``LWJAX_COORDINATOR`` (127.0.0.1 and a free port),
``LWJAX_NUM_PROCESSES`` and ``LWJAX_PROCESS_ID`` set, which ``lwjax.distributed.initialize()``
reads; ``--cpu-devices`` and ``--heartbeat`` pass ``LWJAX_CPU_DEVICES`` and
``LWJAX_HEARTBEAT_SECONDS`` the same way. Output goes straight to this terminal.

The launcher waits for every process. When one fails, the others have ``--grace`` seconds
to stop by themselves (a survivor of a lost peer exits within the heartbeat bound:
``lwjax.distributed``); after that, and after ``--timeout`` for the whole run, it
terminates what is left. It then says on stderr how each process ended, and exits with the
status of the first process that failed (128 + N for signal N) -- the first whose status is
not 75, "lost a peer", when there is one: the culprit, not a survivor that ended before it
(process 0, failing, outlasts the others) -- 124 on ``--timeout``, else 0.

Example:
    $ lwjax launch -n 2 --cpu-devices 8 -- python experiments/demo.py
    $ python -m lwjax.launch -n 2 --heartbeat 3 -- python script.py --flag
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from lwjax import distributed

PROG = "lwjax launch"
EXIT_TIMEOUT = 124
_POLL_SECONDS = 0.05
_KILL_AFTER_SECONDS = 5.0  # SIGTERM first, SIGKILL this much later


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, description="Start the processes of a multi-process lwjax run on this "
        "machine: %(prog)s -n 2 [options] -- COMMAND [ARGS...]")
    p.add_argument("-n", "--num-processes", type=int, required=True,
                   help="how many processes to start")
    p.add_argument("--host", default="127.0.0.1",
                   help="the coordinator's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="the coordinator's port (default: free)")
    p.add_argument("--cpu-devices", type=int, default=None,
                   help="simulated CPU devices per process (sets LWJAX_CPU_DEVICES)")
    p.add_argument("--heartbeat", type=float, default=None,
                   help="seconds of silence after which a process is lost "
                        "(sets LWJAX_HEARTBEAT_SECONDS; default 10)")
    p.add_argument("--grace", type=float, default=None,
                   help="after a process fails, seconds the others get to stop by themselves "
                        "(default: 2 x heartbeat + 10)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds for the whole run, then every process is stopped (exit 124)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return p


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it).

    Example:
        >>> 1024 <= free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], coordinator: str, num_processes: int, process_id: int,
                cpu_devices: int | None = None, heartbeat: float | None = None
                ) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` plus the run's variables.

    Example:
        >>> process_env({}, "127.0.0.1:1234", 2, 1)["LWJAX_PROCESS_ID"]
        '1'
    """
    env = dict(base)
    env[distributed.ENV_COORDINATOR] = coordinator
    env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
    env[distributed.ENV_PROCESS_ID] = str(process_id)
    if cpu_devices is not None:
        env[distributed.ENV_CPU_DEVICES] = str(cpu_devices)
    if heartbeat is not None:
        env[distributed.ENV_HEARTBEAT] = repr(float(heartbeat))
    return env


def describe(code: int) -> str:
    """How a process ended, from its ``Popen.returncode``.

    Example:
        >>> describe(-9), describe(75)
        ('was killed by SIGKILL', 'exited with status 75 (it lost a peer)')
    """
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    if code == distributed.EXIT_PEER_LOST:
        return f"exited with status {code} (it lost a peer)"
    return f"exited with status {code}"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the launcher; returns its exit status (see the module docstring).

    Example:
        >>> main(["-n", "2", "--", sys.executable, "-c", "pass"])
        0
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help exits 0, bad arguments 2
        return int(e.code or 0)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(f"{PROG}: error: give the command after --, e.g. {PROG} -n 2 -- python "
              "script.py", file=sys.stderr)
        return 2
    if args.num_processes < 1:
        print(f"{PROG}: error: -n must be at least 1, got {args.num_processes}.",
              file=sys.stderr)
        return 2
    for flag, value in (("--heartbeat", args.heartbeat), ("--grace", args.grace),
                        ("--timeout", args.timeout)):
        if value is not None and not 0 < value < float("inf"):
            print(f"{PROG}: error: {flag} must be a positive number of seconds, got {value}.",
                  file=sys.stderr)
            return 2
    heartbeat = args.heartbeat or distributed.Timeouts().heartbeat_seconds
    grace = args.grace if args.grace is not None else 2 * heartbeat + 10
    coordinator = f"{args.host}:{args.port or free_port(args.host)}"
    procs = [subprocess.Popen(command, env=process_env(
                 dict(os.environ), coordinator, args.num_processes, i, args.cpu_devices,
                 args.heartbeat))
             for i in range(args.num_processes)]
    try:
        return _wait(procs, grace, args.timeout)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGINT)
        return 130


def _wait(procs: list[subprocess.Popen], grace: float, timeout: float | None) -> int:
    start = time.monotonic()
    ended: dict[int, tuple[int, float]] = {}  # process id -> (code, seconds since start)
    deadline = None if timeout is None else start + timeout
    timed_out = False
    while len(ended) < len(procs):
        now = time.monotonic()
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = (p.returncode, now - start)
                if p.returncode != 0:
                    first_fail = start + ended[i][1] + grace
                    deadline = first_fail if deadline is None else min(deadline, first_fail)
        if len(ended) < len(procs) and deadline is not None and now > deadline:
            timed_out = timeout is not None and now >= start + timeout
            _stop([p for i, p in enumerate(procs) if i not in ended], signal.SIGTERM)
            continue
        time.sleep(_POLL_SECONDS)
    failed = sorted((t, i, code) for i, (code, t) in ended.items() if code != 0)
    if failed or timed_out:
        lines = [f"process {i} {describe(code)} after {t:.1f} s"
                 for t, i, code in sorted((t, i, c) for i, (c, t) in ended.items())]
        if failed and failed[0][1] == 0 and any(c == -signal.SIGABRT for _, _, c in failed[1:]):
            lines.append("JAX aborts every other process at once when process 0, which hosts "
                         "its coordination service, is lost")
        if timed_out:
            lines.append(f"stopped: --timeout {timeout:g} s passed")
        print(f"{PROG}: " + "; ".join(lines) + ".", file=sys.stderr)
    if timed_out:
        return EXIT_TIMEOUT
    if failed:
        culprits = [c for _, _, c in failed if c != distributed.EXIT_PEER_LOST]
        code = (culprits or [failed[0][2]])[0]
        return 128 - code if code < 0 else code
    return 0


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    """Sends ``sig``, then SIGKILL to whatever still runs ``_KILL_AFTER_SECONDS`` later."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    end = time.monotonic() + _KILL_AFTER_SECONDS
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(_POLL_SECONDS)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
