"""Why a pipeline's weights sit in slots: one stage's tick loop reading its weights as slot
rows (a bitcast each) against one packed flat buffer (a static slice each), *measured* on
this machine's XLA:CPU.

Packing every stage's weights into one flat buffer per dtype would make every device store
only the largest stage's bytes (``passes/padding.py``: slots store more where stages hold
different kinds of weights). But a weight is then a slice of the buffer, and a slice is a
copy unless XLA can alias it. This script times the same tick loop -- ``M + S - 1`` ticks,
each running 2 blocks (x + tanh(x @ W1) @ W2, attention-sized and MLP-sized matrices) on a
microbatch -- with the weights read both ways, on one device, interleaved, and reads the
compiled programs: the slice copies inside the loop and XLA's temporary bytes
(``memory_analysis``).

Run from the repository root::

    python experiments/packed_weights.py [--repeats 15]

It prints its table and writes ``packed_weights.md`` to ``experiments/out/`` (git-ignored);
``--write-results`` writes ``experiments/results/``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import argparse  # noqa: E402
import re  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

TICKS = 8 + 16 - 1  # M = 8 microbatches through 16 stages
BLOCKS = 2
HIDDENS = (64, 256)
MICROBATCH_TOKENS = 64


def _shapes(hidden: int) -> list[tuple[int, int]]:
    """Per block: an attention-sized and two MLP-sized matrices (the MLP 4 x hidden)."""
    return [(hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)] * BLOCKS


def _run(weights: list[jax.Array], x: jax.Array) -> jax.Array:
    for k in range(BLOCKS):
        wa, w1, w2 = weights[3 * k:3 * k + 3]
        x = x + jnp.tanh(x @ wa)
        x = x + jnp.tanh(x @ w1) @ w2
    return x


def programs(hidden: int):
    """(slots, packed): each a jitted tick loop and its weight arguments."""
    shapes = _shapes(hidden)
    keys = jax.random.split(jax.random.key(0), len(shapes))
    weights = [jax.random.normal(k, s, jnp.float32) * 0.02 for k, s in zip(keys, shapes,
                                                                          strict=True)]
    rows = [w.reshape(1, -1) for w in weights]
    packed = jnp.concatenate([w.reshape(-1) for w in weights]).reshape(1, -1)
    offsets = np.cumsum([0, *(a * b for a, b in shapes)])

    def slots(rows_, x):
        def tick(c, _):
            return _run([r.reshape(s) for r, s in zip(rows_, shapes, strict=True)], c), None
        return jax.lax.scan(tick, x, None, length=TICKS)[0]

    def flat(buf, x):
        def tick(c, _):
            ws = [buf[0, offsets[i]:offsets[i + 1]].reshape(s) for i, s in enumerate(shapes)]
            return _run(ws, c), None
        return jax.lax.scan(tick, x, None, length=TICKS)[0]

    return (jax.jit(slots), rows), (jax.jit(flat), packed)


def _loop_copies(compiled_text: str) -> int:
    """Slice instructions the compiled program keeps (each one a copy of a weight)."""
    return len(re.findall(r"= f32\[[^\]]*\][^ ]* slice\(", compiled_text))


def measure(repeats: int) -> list[list[str]]:
    rows = []
    for hidden in HIDDENS:
        x = jax.random.normal(jax.random.key(1), (MICROBATCH_TOKENS, hidden), jnp.float32)
        (f_slots, a_slots), (f_flat, a_flat) = programs(hidden)
        np.testing.assert_array_equal(np.asarray(f_slots(a_slots, x)),
                                      np.asarray(f_flat(a_flat, x)))
        fns = {"slots": lambda f=f_slots, a=a_slots, x=x: f(a, x),
               "packed": lambda f=f_flat, a=a_flat, x=x: f(a, x)}
        t = _common.measure_interleaved(fns, repeats=repeats)
        weight_bytes = sum(4 * a * b for a, b in _shapes(hidden))
        for name, f, a in (("slots (bitcast rows)", f_slots, a_slots),
                           ("packed (static slices)", f_flat, a_flat)):
            c = f.lower(a, x).compile()
            key = name.split()[0]
            rows.append([str(hidden), name, f"{weight_bytes:,}", f"{t[key].median * 1e3:.2f}",
                         f"{t[key].median / t['slots'].median:.2f}",
                         str(_loop_copies(c.as_text())),
                         f"{c.memory_analysis().temp_size_in_bytes:,}"])
    return rows


def report(rows: list[list[str]], repeats: int) -> str:
    table = _common.markdown_table(
        ["hidden", "weights read as", "weight bytes", "ms (median)", "x slots",
         "slices kept", "XLA temp bytes"], rows, "llrrrrr")
    return "\n".join([
        "# Slots against a packed buffer: one stage's tick loop",
        "",
        f"*Measured* on {_common.machine_line()}: `python experiments/packed_weights.py "
        f"--repeats {repeats}`; medians of {repeats} interleaved runs of {TICKS} ticks of "
        f"{BLOCKS} blocks on a {MICROBATCH_TOKENS}-token microbatch, one device; outputs "
        "equal bit for bit.",
        "",
        table,
        "",
        "A packed buffer's weights are static slices: XLA:CPU keeps each as a copy inside "
        "the tick loop, so its temporaries hold a second copy of the stage's weights -- more "
        "than the padding packing would save -- and the loop runs slower. The slots' reshapes "
        "are bitcasts: no copy, no temporaries for weights. So lwjax keeps the slots and "
        "counts their padding in the plan (`passes/padding.py`).",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    _common.add_output_flags(ap)
    args = ap.parse_args(argv)
    text = report(measure(args.repeats), args.repeats)
    return _common.publish("packed_weights.md", text, args)


if __name__ == "__main__":
    main()
