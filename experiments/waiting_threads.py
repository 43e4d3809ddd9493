"""Waiting threads: what idle device threads cost the working ones, measured on this host.

What the device threads that wait at a tick's collective cost the ones that work.
A pipeline tick runs each active stage's work, then a ppermute that every device joins. In
the fill and drain of a GPipe schedule, and in every tick of a layout with one microbatch
(M = 1), few devices work while the others wait. On a CPU host the 16 simulated devices are
threads sharing a few cores. This script measures what that costs: a program on 16 devices
runs 16 ticks of an MLP block (x + gelu(x W1) W2, hidden 256, ``tokens`` rows) on the first
k devices, the others skipping it (``lax.cond``), each tick ending in a ppermute around all
16; the same program with k = 0 (the ppermutes alone); and one device running the 16 blocks
alone, in one interleaved run. ``slowdown = (time - the k = 0 time) / (k x one device's
time)``: 1.00 where k devices' work costs k times one device's; above 1, the waiting
threads slow the working ones. The layout search's ``TickModel.waiting_slowdown``
(``passes/cost_calibration.py``) is fitted to these *measured* figures; the report sets its
values beside them.

Run from the repository root::

    python experiments/waiting_threads.py [--repeats 9] [--write-results]

It writes ``waiting_threads.md`` to ``experiments/out/`` (git-ignored); ``--write-results``
regenerates the committed copy in ``experiments/results/``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(16)  # before anything touches a device; under pytest conftest did

from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HIDDEN = 256
TOKENS = (512, 2048)  # rows of a tick's work: a microbatch of 8 / 32 sequences of 64
ACTIVE = (1, 2, 4, 8, 16)  # k = 0 is timed too: the ticks' ppermutes alone
TICKS = 16


def _block(x, w1, w2):
    return x + jax.nn.gelu(x @ w1) @ w2


def programs(tokens: int, hidden: int = HIDDEN, active: Sequence[int] = ACTIVE,
             devices: Sequence | None = None) -> dict:
    """Calls: ``k`` -> 16 ticks of the block on the first k of ``devices`` (the others wait
    at each tick's ppermute), ``0`` -> the ticks' ppermutes alone (no device works);
    ``"one"`` -> the 16 blocks on one device alone."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    mesh = Mesh(np.array(devices), ("d",))
    ring = [(i, (i + 1) % n) for i in range(n)]

    def place(shape, spec, scale):
        return jax.device_put(jnp.full(shape, scale, jnp.float32), NamedSharding(mesh, spec))

    w1 = place((hidden, 4 * hidden), P(), 1e-3)
    w2 = place((4 * hidden, hidden), P(), 1e-3)
    x = place((n * tokens, hidden), P("d"), 1e-2)
    calls = {}
    for k in (0, *active):
        def body(x, w1, w2, k=k):
            working = jax.lax.axis_index("d") < k

            def tick(c, _):
                c = jax.lax.cond(working, lambda c: _block(c, w1, w2), lambda c: c, c)
                return jax.lax.ppermute(c, "d", ring), None
            return jax.lax.scan(tick, x, None, length=TICKS)[0]

        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P(), P()),
                                  out_specs=P("d")))
        calls[k] = lambda f=f: f(x, w1, w2)
    alone = jax.jit(lambda x, w1, w2: jax.lax.scan(
        lambda c, _: (_block(c, w1, w2), None), x, None, length=TICKS)[0])
    one = [jax.device_put(a, devices[0]) for a in
           (jnp.full((tokens, hidden), 1e-2), np.asarray(w1), np.asarray(w2))]
    calls["one"] = lambda: alone(*one)
    return calls


def slowdowns(medians: dict) -> dict[int, float]:
    """k -> the k-device program's median less the ppermutes' alone (k = 0: the per-tick
    floor and transfer the layout search charges apart) over k x the one-device median."""
    return {k: (t - medians[0]) / (k * medians["one"]) for k, t in medians.items()
            if k not in ("one", 0)}


def fit(results: dict[int, dict], devices: int = 16) -> tuple[float, float] | None:
    """(coeff, exponent) of ``slowdown - 1 = coeff x (waiting / working) ^ exponent``, least
    squares in log-log over every size's points with someone waiting and a slowdown above 1
    (None with fewer than 2 such points): the form of ``TickModel.waiting_slowdown``."""
    points = [((devices - k) / k, f - 1) for medians in results.values()
              for k, f in slowdowns(medians).items() if k < devices and f > 1]
    if len(points) < 2:
        return None
    exponent, log_coeff = np.polyfit(np.log([p[0] for p in points]),
                                     np.log([p[1] for p in points]), 1)
    return float(np.exp(log_coeff)), float(exponent)


def measure(tokens: int, repeats: int, **kw) -> dict:
    timings = _common.measure_interleaved(programs(tokens, **kw), repeats=repeats)
    return {k: t.median for k, t in timings.items()}


def report(results: dict[int, dict], command: str) -> str:
    """The results file: per work size, each k's median and slowdown."""
    rows = []
    for tokens, medians in results.items():
        s = slowdowns(medians)
        rows.append([f"{tokens:,}", f"{medians['one'] * 1e3:.1f}", f"{medians[0] * 1e3:.1f}",
                     *(f"{medians[k] * 1e3:.1f} ({s[k]:.2f})" for k in s), _common.MEASURED])
    active = [k for k in next(iter(results.values())) if k not in ("one", 0)]
    from lwjax.passes import cost_calibration as cal  # noqa: PLC0415

    model = cal.TickModel(waiting_coeff=cal.CPU_WAITING_COEFF,
                          waiting_exponent=cal.CPU_WAITING_EXPONENT)
    rows.append(["the layout search's model", "--", "--",
                 *(f"({model.waiting_slowdown(k, 16):.2f})" for k in active),
                 _common.PROJECTED])
    fitted = fit(results)
    return "\n\n".join([
        _common.header("Waiting threads: what idle device threads cost the working ones",
                       "experiments/waiting_threads.py", command),
        f"16 simulated devices, {TICKS} ticks; each tick the first k devices run an MLP block "
        f"(hidden {HIDDEN}, 4 x {HIDDEN} inner, float32) on their rows, the others skip it "
        "(`lax.cond`), and all 16 join a ppermute. One device: the same 16 blocks alone; "
        "k = 0: the 16 ppermutes alone (what the search's per-tick floor and transfer "
        "price). Cells: median ms of interleaved runs (slowdown = (time - the k = 0 time) / "
        "(k x one device's time); 1.00: the k devices' work costs k times one device's, "
        "as on shared cores without the term).",
        _common.markdown_table(
            ["rows per tick", "one device ms", "k = 0 (ppermutes alone)",
             *(f"k = {k} of 16" for k in active), "figure"],
            rows, "rrr" + "r" * len(active) + "l"),
        "Above 1.00, the work of a tick in which few devices are active costs more than "
        "their share of the host: the working devices run slower while the others wait at "
        "the collective (XLA's CPU runtime on this host; why is not measured here). The "
        "layout search multiplies a tick's work by `TickModel.waiting_slowdown` "
        "(`passes/cost_calibration.py`: the last row, *projected*), so layouts with few "
        "active devices per tick (few microbatches on many stages) rank as they measure "
        "(`experiments/layout_check.py`).",
        "Fit of this run (slowdown - 1 = coeff x (waiting / working)^exponent, least squares "
        "in log-log over the points above 1.00): " + (
            f"coeff {fitted[0]:.3f}, exponent {fitted[1]:.2f}." if fitted else
            "too few points above 1.00."),
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    args = _common.parse_repeats_args(__doc__, argv)
    results = {}
    for tokens in TOKENS:
        _common.step(f"{tokens} rows per tick: timing k = {', '.join(map(str, ACTIVE))} "
                     "working devices of 16 and one device alone")
        results[tokens] = measure(tokens, args.repeats)
    text = report(results, _common.command_line("experiments/waiting_threads.py", argv))
    return _common.publish("waiting_threads.md", text, args)


if __name__ == "__main__":
    main()
