"""Command line: ``lwjax plan`` prints the plan for a preset model on a hardware preset;
``lwjax launch -n 2 -- python script.py`` starts a multi-process run (``lwjax/launch.py``).

The model is abstract (``models.abstract``: no weights allocated) and its inputs are
``jax.ShapeDtypeStruct`` of the config's batch and sequence length, so planning a seed-size
model takes about a second on a laptop. Every figure printed is *projected* (footprints and
the roofline cost model), not measured.

Exit codes: 0 a plan was printed; 1 no plan fits (the message says what would); 2 bad
arguments (an unknown model, hardware or compression name, a bad number).

Messages speak in flags and preset names: the arguments are checked here, and what the
library says in Python terms (``residency='weights'``, ``cache_bytes``) is restated with the
flags that set it (``_for_shell``).

Example:
    $ lwjax plan --model seed-dense --hardware h100 --devices 16 --residency weights
    $ python -m lwjax.cli plan --model tiny-dense --devices 4 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import sys
from collections.abc import Sequence

from lwjax.errors import InfeasiblePlanError, LwjaxError, UnknownPresetError

PROG = "lwjax"
# The library's Python phrasing -> the flags that set the same thing (regex, replacement).
_SHELL_WORDS: tuple[tuple[str, str], ...] = (
    (r"\(cache_bytes=, or --cache-mib on the command line\)", "(--cache-mib)"),
    (r"\bresidency='(\w+)'", r"--residency \1"),
    (r"\braise cache_bytes\b", "raise --cache-mib"),
    (r"\bcache_bytes\b", "--cache-mib"),
    (r"add '(\w+)' to allow\b", r"add \1 to --allow"),
    (r"\bNot allowed: ([\w, ]+)\.", r"Not allowed by --allow: \1."),
    (r"\b([Ss])hrink the microbatch\b", r"\1hrink the microbatch (a larger --microbatches)"),
    (r"\bmicrobatches=(\d+)", r"--microbatches \1"),
    (r"\bnum_devices=(\d+)", r"--devices \1"),
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Cache-aware layer-wise deployment planner.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("plan", help="plan a preset model on a hardware preset")
    p.add_argument("--model", required=True,
                   help="model preset: seed-dense, seed-moe, seed004-dense, seed004-moe, "
                        "seed002-dense, tiny-dense, tiny-moe")
    p.add_argument("--hardware", default="h100", help="hardware preset: h100, h200, cpu")
    p.add_argument("--devices", type=int, default=16, help="number of devices (default 16)")
    p.add_argument("--compression", default=None,
                   help="starting compression preset: none, int8, int8-2:4, int4, int4-2:4, "
                        "int4-75%%, 2:4")
    p.add_argument("--microbatches", type=int, default=None,
                   help="M (default: the largest divisor of the batch <= devices)")
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--residency", choices=("all", "weights"), default="all")
    p.add_argument("--cache-mib", type=float, default=None,
                   help="capacity per device in MiB (default: the hardware's L2)")
    p.add_argument("--persisting", action="store_true",
                   help="plan against the persisting-L2 limit (37.5 MiB on H100)")
    p.add_argument("--allow", default="split,compress,microbatch",
                   help="edge-case strategies in order of preference, comma-separated; '' for "
                        "none (default: split,compress,microbatch)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--figure", default=None, metavar="PNG", help="also write a figure")
    sub.add_parser("launch", add_help=False,
                   help="start a multi-process run on this machine: launch -n 2 -- python "
                        "script.py (lwjax launch --help)")
    return parser


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {_for_shell(message)}", file=sys.stderr)
    return code


def _for_shell(message: str) -> str:
    """A library message with its Python phrasing restated as command-line flags.

    Example:
        >>> _for_shell("or plan with residency='weights'")
        'or plan with --residency weights'
    """
    for pattern, flag in _SHELL_WORDS:
        message = re.sub(pattern, flag, message)
    return message


def _allow(text: str) -> tuple[str, ...] | str:
    """``--allow split,compress`` as a tuple, or the error message."""
    from lwjax.passes.strategies import STRATEGIES

    allow = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in allow if a not in STRATEGIES]
    twice = sorted({a for a in allow if allow.count(a) > 1})
    if unknown or twice:
        what = (f"unknown strategy {', '.join(map(repr, unknown))}" if unknown
                else f"{', '.join(map(repr, twice))} listed twice")
        return (f"--allow {text}: {what}; give some of {', '.join(STRATEGIES)}, "
                "comma-separated, each at most once, in order of preference (e.g. --allow "
                "split,compress), or --allow '' for none.")
    return allow


def _check_numbers(args, batch: int, hw) -> str | None:
    """The error message for a bad --devices / --microbatches / --cache-mib / --persisting."""
    if args.devices < 1:
        return f"--devices must be at least 1, got {args.devices}."
    if args.microbatches is not None:
        if args.microbatches < 1:
            return f"--microbatches must be at least 1, got {args.microbatches}."
        if batch % args.microbatches:
            divisors = ", ".join(str(d) for d in range(1, batch + 1) if batch % d == 0)
            return (f"--microbatches {args.microbatches}: {args.model}'s batch of {batch} "
                    f"sequences does not divide into {args.microbatches} microbatches; use one "
                    f"of {divisors}.")
    if args.cache_mib is not None and not 2**-20 <= args.cache_mib < float("inf"):
        return (f"--cache-mib must be finite and at least one byte (2**-20 MiB), got "
                f"{args.cache_mib}.")
    if args.persisting and args.cache_mib is None and hw.persisting_l2_bytes is None:
        return (f"--persisting: {hw.name} has no persisting-L2 limit; give the capacity with "
                "--cache-mib, or use --hardware h100 / h200.")
    return None


def _plan(args) -> int:
    import jax
    import jax.numpy as jnp

    import lwjax
    from lwjax import hardware as hardware_lib
    from lwjax import models
    from lwjax.passes import compression as compression_lib

    for flag, value, lookup in (("--model", args.model, models.configs.by_name),
                                ("--hardware", args.hardware, hardware_lib.by_name)):
        try:
            lookup(value)
        except UnknownPresetError as e:  # "Unknown model preset 'x'; known: a, b."
            return _fail(f"{flag} {value}: unknown preset; {str(e).split('; ', 1)[-1]}", 2)
    cfg = models.configs.by_name(args.model)
    hw = hardware_lib.by_name(args.hardware)
    if args.compression is not None and args.compression not in compression_lib.PRESETS:
        return _fail(f"--compression {args.compression}: unknown preset; use one of "
                     f"{', '.join(compression_lib.PRESETS)}.", 2)
    message = _check_numbers(args, cfg.batch_size, hw)
    if message:
        return _fail(message, 2)
    allow = _allow(args.allow)
    if isinstance(allow, str):
        return _fail(allow, 2)
    if args.figure:
        folder = pathlib.Path(args.figure).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return _fail(f"--figure {args.figure}: cannot write into {folder} (no such "
                         "writable folder).", 2)
    tokens = jax.ShapeDtypeStruct(
        (cfg.batch_size, 1 if args.mode == "decode" else cfg.seq_len), jnp.int32)
    try:
        plan = lwjax.plan(
            models.abstract(cfg), tokens, num_devices=args.devices, hardware=hw,
            cache_bytes=None if args.cache_mib is None else int(args.cache_mib * 2**20),
            compression=args.compression, microbatches=args.microbatches, mode=args.mode,
            cache_len=cfg.seq_len if args.mode == "decode" else None,
            residency=args.residency, persisting=args.persisting, allow=allow)
    except InfeasiblePlanError as e:
        print(f"{PROG}: infeasible (projected): {_for_shell(str(e))}", file=sys.stderr)
        return 1
    except LwjaxError as e:
        return _fail(str(e), 2)
    plan = dataclasses.replace(plan, model=args.model)
    print(plan.to_json() if args.json else plan.summary())
    if args.figure:
        path = plan.figure(args.figure, title=f"{args.model} on {plan.num_devices} x {hw.name}")
        print(f"figure: {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when no plan fits, 2 for bad arguments; ``launch``: see
        ``lwjax.launch.main``.

    Example:
        >>> main(["plan", "--model", "tiny-dense", "--devices", "4"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # its own parser: everything after -- is the command
        from lwjax import launch

        return launch.main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help exits 0, bad arguments 2
        return int(e.code or 0)
    return _plan(args)


if __name__ == "__main__":
    sys.exit(main())
