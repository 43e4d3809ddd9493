"""Collectives in the compiled pipeline program, and which of them would hang.

Each device runs its own stage's branch of a conditional (``lax.switch`` in
``passes/lower.py``), so a collective inside a branch is reached only by the devices of that
stage, at that tick. When a stage is split over "tp", XLA's SPMD partitioner puts the
collectives the split needs inside the branch. Measured on XLA:CPU (jax 0.10.2, 2 stages x
tp 2, one program compiled for all devices):

- all-reduce, all-gather, all-to-all: replica groups such as ``[2,2]<=[4]`` = {0,1}, {2,3};
  a device meets only its own group, which lies inside its stage: they run.
- collective-permute: ``source_target_pairs={{0,1},{2,3}}``; the rendezvous waits for every
  device named in the pairs (``RendezvousKey{global_devices=[0, 1, 2, 3], ...}``), and the
  other stage's devices are in another branch (or idle): the process waits 40 s and aborts
  ("Termination timeout for collective permute ..."). The partitioner emits the pairs of every
  stage at once, so any collective-permute in a stage's branch hangs.

Hence the test, for every collective nested in a conditional branch: each group of devices
that meet in it (a replica group; no groups: every device of the program; for a
collective-permute, every device its pairs name) must lie inside one stage. A one-stage
program split over tp (a vocabulary-split embedding's all-reduce over all devices) passes.
``collectives`` reads the post-optimisation HLO text; ``hanging`` applies the test.

Example:
    >>> text = program.fn.lower(*program.abstract_args()).compile().as_text()
    >>> hanging(collectives(text), stage_of=lambda d: d // tp)
    ()
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from lwjax.errors import SplitError

KINDS = ("collective-permute", "all-reduce", "all-gather", "all-to-all", "reduce-scatter",
         "collective-broadcast", "ragged-all-to-all", "send", "recv")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s(?P<op>[a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%?(?P<one>[\w.\-]+)"
                     r"|\b(?:calls|branch_computations|called_computations)=\{(?P<many>[^}]*)\}")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<many>[^}]*)\}"
                       r"|\b(?:true_computation|false_computation)=%?(?P<one>[\w.\-]+)")
_PAIRS = re.compile(r"source_target_pairs=\{(?P<pairs>(?:\{\d+,\d+\},?)*)\}")
_GROUPS_LIST = re.compile(r"replica_groups=\{(?P<groups>(?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<shape>[\d,]+)\]<=\[(?P<dims>[\d,]+)\]"
                          r"(?:T\((?P<perm>[\d,]+)\))?")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    Attributes:
        kind: the HLO opcode without "-start" ("collective-permute", "all-reduce", ...).
        groups: the sets of devices that meet in it (logical device ids, i.e. positions in
            the mesh's device order); None when the instruction names none (every device).
        in_branch: whether it sits (at any depth) inside a conditional's branch.
        computation: the HLO computation that holds it.
        op_name: the JAX operation it came from (metadata), e.g.
            "jit(program)/shard_map/while/body/.../layers_0/split".
        groups_text: the groups as the HLO prints them.
    """

    kind: str
    groups: tuple[tuple[int, ...], ...] | None
    in_branch: bool
    computation: str
    op_name: str
    groups_text: str


def collectives(hlo_text: str) -> tuple[Collective, ...]:
    """Every collective in a compiled module's text (``Compiled.as_text()``), in order.

    Example:
        >>> [c.kind for c in collectives(text) if c.in_branch]
        ['all-reduce', 'all-reduce', ...]
    """
    bodies = _computations(hlo_text)
    callees = {name: set() for name in bodies}
    branch_callees = {name: set() for name in bodies}
    for name, lines in bodies.items():
        for line in lines:
            for m in _CALLED.finditer(line):
                callees[name].update(_names(m.group("one") or m.group("many")))
            for m in _BRANCHES.finditer(line):
                branch_callees[name].update(_names(m.group("one") or m.group("many")))
    in_branch = _under_branches(bodies, callees, branch_callees)
    found = []
    for name, lines in bodies.items():
        for line in lines:
            m = _INSTR.match(line)
            if m is None:
                continue
            kind = m.group("op").removesuffix("-start")
            if kind not in KINDS:
                continue
            groups, text = _groups(kind, line)
            op = _OP_NAME.search(line)
            found.append(Collective(kind=kind, groups=groups, in_branch=name in in_branch,
                                    computation=name, op_name=op.group("name") if op else "",
                                    groups_text=text))
    return tuple(found)


def hanging(found: Iterable[Collective], stage_of: Callable[[int], int],
            num_devices: int | None = None) -> tuple[Collective, ...]:
    """The collectives in a branch whose devices do not all belong to one stage (see the
    module docstring); ``stage_of`` maps a logical device id to its stage.

    A collective without replica groups meets every device of the program: given
    ``num_devices``, it is one group of them all (inside one stage only when the program has
    one stage); without, it counts as hanging.

    Example:
        >>> [c.kind for c in hanging(collectives(text), lambda d: d // 2)]
        ['collective-permute', 'collective-permute']
    """
    bad = []
    for c in found:
        if not c.in_branch:
            continue
        groups = c.groups
        if groups is None and num_devices is not None and c.kind != "collective-permute":
            groups = (tuple(range(num_devices)),)
        if groups is None or c.kind in ("send", "recv") or any(
                len({stage_of(d) for d in group}) > 1 for group in groups):
            bad.append(c)
    return tuple(bad)


@dataclasses.dataclass(frozen=True)
class StageView:
    """What the check says about one stage.

    Attributes:
        devices: its device ids.
        layers: its segments' names, in order.
        split: per segment it runs (the last stage's epilogue included), the weights split
            over tp, each as 'path [shape] on axis a (n -> n/tp per device)'.
    """

    devices: tuple[int, ...]
    layers: tuple[str, ...]
    split: tuple[tuple[str, tuple[str, ...]], ...]


def check(hlo_text: str, stages: Sequence[StageView], tp: int) -> None:
    """Refuses a compiled program (stage-major devices, ``tp`` per stage) in which a
    collective inside a branch needs devices of more than one stage.

    Raises:
        SplitError: the first such collective's stage, layers, devices, groups and JAX
            operation, the weights split in that layer, and what to change.

    Example:
        >>> check(compiled.as_text(), views, tp=2)
    """
    # a collective over all devices stays inside a stage only when the program has one
    bad = hanging(collectives(hlo_text), stage_of=lambda d: d // tp,
                  num_devices=len(stages) * tp)
    if not bad:
        return
    # report the first collective whose stage and layer are known (from its op_name)
    first = min(bad, key=lambda c: _culprit(stages, c)[1] is None)
    stage, seg = _culprit(stages, first)
    spanned = sorted({d // tp for g in (first.groups or ()) for d in g}) or \
        list(range(len(stages)))
    if stage is None:
        who = f"A stage split over tp={tp}"
    else:
        view = stages[stage]
        who = (f"Stage {stage} (layers {', '.join(view.layers)}; devices "
               f"{list(view.devices)}) split over tp={tp}")
    split = dict(stages[stage].split).get(seg, ()) if stage is not None and seg else ()
    where = first.op_name[first.op_name.index(seg):] if seg else first.op_name
    msg = (
        f"{who} would hang: XLA put a {first.kind} ({first.groups_text or 'all devices'}: "
        f"devices of stages {spanned}) inside the stage's branch, at '{where}'. Only this "
        f"stage's devices run that branch, so the others never join it ({len(bad)} such "
        f"collective(s) in the program: {', '.join(sorted({c.kind for c in bad}))}). "
        + (f"Weights split in {seg}: {'; '.join(split[:8])}"
           + (f" (and {len(split) - 8} more)" if len(split) > 8 else "") + ". "
           if split else "")
        + f"Likely the layer moves data along a split dimension of one of their products (at "
        f"'{where.rsplit('/', 1)[-1]}'), which the split rule in passes/tp.py does not follow. "
        "Change: another tp (one that divides the head or expert count), fewer devices per "
        "stage (more stages, or more capacity per device), or allow=() to plan without "
        "splitting."
    )
    err = SplitError(msg)
    err.stage, err.tp, err.collective = stage, tp, first.kind
    err.layers = stages[stage].layers if stage is not None else ()
    raise err


def _culprit(stages: Sequence[StageView], c: Collective) -> tuple[int | None, str | None]:
    """The stage and segment a collective came from: the lowering binds a stage's equations
    under the scope ``stage_{s}`` (prologue and epilogue under their own names; a layer has
    its scope)."""
    m = re.search(r"(?:^|/)stage_(\d+)/", c.op_name)
    stage = int(m.group(1)) if m else None
    if stage is None or stage >= len(stages):
        return None, None
    inside = c.op_name[m.end() - 1:] + "/"
    return stage, next((name for name, _ in stages[stage].split if f"/{name}/" in inside), None)


# ---- parsing ---------------------------------------------------------------------------------

def _computations(text: str) -> dict[str, list[str]]:
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and not line.startswith((" ", "\t", "HloModule")):
                current = m.group("name")
                bodies[current] = []
        elif line.strip() == "}":
            current = None
        else:
            bodies[current].append(line)
    return bodies


def _names(text: str) -> list[str]:
    return [n.strip().lstrip("%") for n in text.split(",") if n.strip()]


def _under_branches(bodies, callees, branch_callees) -> set[str]:
    """Computations reachable from some conditional's branch computation."""
    todo = [c for name in bodies for c in branch_callees[name]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in bodies:
            continue
        seen.add(name)
        todo.extend(callees[name])
    return seen


def _groups(kind: str, line: str) -> tuple[tuple[tuple[int, ...], ...] | None, str]:
    """The device groups that meet in one collective, and their text."""
    if kind == "collective-permute":
        m = _PAIRS.search(line)
        if m is None:
            return None, ""
        ids = sorted({int(x) for x in re.findall(r"\d+", m.group("pairs"))})
        return (tuple(ids),), m.group(0)
    m = _GROUPS_LIST.search(line)
    if m is not None:
        groups = tuple(tuple(int(x) for x in g.split(",") if x)
                       for g in re.findall(r"\{([\d,]*)\}", m.group("groups")))
        groups = tuple(g for g in groups if g)
        return (groups or None), m.group(0)
    m = _GROUPS_IOTA.search(line)
    if m is not None:
        shape = [int(x) for x in m.group("shape").split(",")]
        dims = [int(x) for x in m.group("dims").split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group("perm"):
            ids = ids.transpose([int(x) for x in m.group("perm").split(",")])
        return tuple(tuple(int(x) for x in row) for row in ids.reshape(shape)), m.group(0)
    return None, ""
