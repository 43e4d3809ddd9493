"""Re-planning a running ShardedModel to a stronger compression, from the weights already on
its devices (``ShardedModel.recompress``).

Seed 000 adjusts compression ratios under cache pressure "in < 100 ms". Here each stage's
device decodes the weights it stores (``SlotStorage.unpack``, as its branch reads them) and
encodes them under the new policy (``ParamCodec.encode``), in one jitted function per stage
committed to that device: nothing goes through the host. The new program is lowered and
compiled before ``recompress`` returns; the re-encoding's device work and the compiles
are timed apart (``Recompressed``): compiling is most of it, and what would remove it is
compiling the spare configurations ahead (their programs do not depend on the weights).
Re-encoding quantises the weights as they run now: int8 -> int4 rounds twice (the decoded
int8 values, not the original floats), which the accuracy of such a model reflects.

Example:
    >>> sm = lwjax.layerwise_shard(model, tokens, compression="int8", allow=("compress",))
    >>> smaller = sm.recompress("int4-75%", stages=[2, 3])
    >>> r = smaller.recompressed
    >>> r.reencode_s, r.encoder_compile_s, r.compile_s      # device work, then compiles
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from lwjax.errors import ConfigError, InputError
from lwjax.passes import compression as compression_lib
from lwjax.passes.codec import build_codecs
from lwjax.passes.compression import Compression
from lwjax.passes.lower import PipelineProgram, lower
from lwjax.passes.storage import SlotStorage
from lwjax.plan import Plan


@dataclasses.dataclass(frozen=True)
class Recompressed:
    """What a recompression did and how long it took (measured, wall clock).

    Attributes:
        stages: the stages whose weights were re-encoded.
        compression: the new policy's name.
        reencode_s: decode + encode on the chosen stages' devices, until the new slots
            exist (device work only: the re-encoders are compiled first).
        encoder_compile_s: compiling the per-stage re-encoders.
        compile_s: lowering and compiling the new program.
        bytes_before: per stage, its stored weight bytes before.
        bytes_after: per stage, after.
    """

    stages: tuple[int, ...]
    compression: str
    reencode_s: float
    encoder_compile_s: float
    compile_s: float
    bytes_before: tuple[int, ...]
    bytes_after: tuple[int, ...]

    @property
    def total_s(self) -> float:
        return self.reencode_s + self.encoder_compile_s + self.compile_s


def _stage_list(stages: Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    if stages is None:
        return tuple(range(num_stages))
    chosen = tuple(dict.fromkeys(stages))
    bad = [s for s in chosen if isinstance(s, bool) or not isinstance(s, int | np.integer)
           or not 0 <= s < num_stages]
    if bad or not chosen:
        raise InputError(f"stages={list(stages)!r}: give stage indices in 0..{num_stages - 1} "
                         "(or None for every stage).")
    return tuple(int(s) for s in chosen)


def recompress(sm, compression: str | Compression, stages: Sequence[int] | None = None
               ) -> tuple[Plan, PipelineProgram, list, Recompressed]:
    """``ShardedModel.recompress``'s work: the new plan, program, placed slots and record."""
    policy = compression_lib.get(compression)
    prog = sm.program
    if prog.virtual != 1:
        raise ConfigError(f"recompress re-encodes one stage per device; this program runs "
                          f"{prog.virtual} stages per device (circular). Shard with "
                          "layerwise_shard(..., schedule='gpipe') to recompress stages.")
    if not isinstance(prog.storage, SlotStorage):
        raise ConfigError(f"recompress runs plans with one device per stage; this plan splits "
                          f"stages over tp={sm.plan.tp} devices.")
    chosen = _stage_list(stages, len(prog.stages))
    graph, old = prog.graph, prog.storage
    fresh = build_codecs(graph, policy)
    codecs = list(old.codecs)
    for s in chosen:
        for i in prog.stages[s].params:
            codecs[i] = fresh[i]
    new = SlotStorage([st.params for st in prog.stages], graph.param_vars, codecs)
    devices = list(prog.mesh.devices.ravel())

    # compile each stage's re-encoder first, so that the device work is timed on its own
    start = time.perf_counter()
    locals_, encoders = [], {}
    for s, device in enumerate(devices):
        local = [next(sh.data for sh in a.addressable_shards if sh.device == device)
                 for a in sm.params]
        locals_.append(local)
        if s in chosen:  # decode what the device holds, encode it anew, on that device
            encoders[s] = jax.jit(lambda rows, s=s: new.encode(s, old.unpack(rows, s))
                                  ).lower(local).compile()
    encoder_compile_s = time.perf_counter() - start

    start = time.perf_counter()
    stage_arrays = []
    for s, local in enumerate(locals_):
        if s in encoders:
            stage_arrays.append(encoders[s](local))
        else:  # the stage keeps its stored arrays as they are
            stage_arrays.append(old.stored(local, s))
    params = new.assemble(prog.mesh, stage_arrays)
    jax.block_until_ready(params)
    reencode_s = time.perf_counter() - start

    start = time.perf_counter()
    program = lower(graph, [st.layer_range for st in sm.plan.stages], devices,
                    sm.plan.microbatches, schedule=prog.schedule, codecs=codecs)
    program.fn.lower(params, *program.abstract_args()[1:]).compile()
    compile_s = time.perf_counter() - start

    before = tuple(old.own_bytes(s) for s in range(len(devices)))
    after = tuple(new.own_bytes(s) for s in range(len(devices)))
    every = len(chosen) == len(devices)
    label = policy.name if every else \
        f"{sm.plan.compression}; {policy.name} on stages {list(chosen)}"
    # the layout search ranked the uncompressed layout: its projected step is not this one's
    plan = dataclasses.replace(sm.plan, compression=label, layout_step_s=None, stages=tuple(
        dataclasses.replace(st, footprint=dataclasses.replace(
            st.footprint, weights_bytes=after[s])) for s, st in enumerate(sm.plan.stages)))
    return plan, program, params, Recompressed(chosen, policy.name, reencode_s,
                                                encoder_compile_s, compile_s, before, after)
