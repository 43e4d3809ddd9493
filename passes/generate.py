"""Pass 6 for generation: a prefill LayerGraph, a decode LayerGraph and stage ranges -> one
jitted SPMD program that generates N tokens per sequence with KV caches resident on their
stage.

Both graphs trace the same step, ``(params, tokens [mb, T], cache, positions [mb, T]) ->
(next token [mb], cache)`` (``lwjax/causal_lm.py``), at the prompt's length and at one token;
the next token is the greedy argmax of the last position's logits, so the LM head's logits
never leave the last stage. The program runs over ``Mesh(devices, ("stage",))``:

- **Weights** as in the forward pipeline (``passes/storage.py``'s ``SlotStorage``): stage s
  holds only its own, read as bitcasts.
- **KV caches**: every cache leaf belongs to the stages whose segments read or write it (a
  layer's K and V: that layer's stage; a counter such as lwjax's ``length``, read by every
  layer: every stage, each advancing its own copy with the equations that update it). Leaves
  sit in slots ``[S, M, n]`` sharded over "stage" -- one row per group of sequences -- that
  live on their device for the whole generation (the slots are donated loop carries, so
  XLA updates them in place). A tick reads its group's row for the stage's equations; a
  prefill tick writes the whole row back (a fresh cache), a decode tick only the update of
  the model's own ``dynamic_update_slice`` (the new position's K and V) at its index --
  4x less time per tick than writing the row back, measured with 32 MiB of cache per
  device. Caches are never gathered or sent.
- **Prefill**: a GPipe pass over the M groups (M + S - 1 ticks) on the prompt's first P0
  tokens (at most the shortest prompt); the last stage's epilogue picks each group's first token.
- **Decode ring**: the last stage sends each token back to stage 0 with the same
  ``ppermute`` that moves activations (a ring: s -> s + 1, S - 1 -> 0), with the group it
  belongs to. At tick t stage s works on step k, group g of ``t - s = k * P + g``, period
  P = max(M, S): with M >= S no stage idles after the first S ticks; with M < S every
  token waits S - M ticks for its group's turn. Stage 0 keeps a per-group token buffer.
- **Prompts of different lengths**: steps at positions below a sequence's own length feed its
  prompt token instead of the predicted one (teacher forcing), so every sequence gets the
  tokens it would get alone; its first new token is the prediction at its own length.
  ``eos_id`` ends a sequence: later tokens are ``pad_id``.
- **Outputs**: the last stage writes each prediction into ``[M, mb, N]`` int32 tokens; every
  device holds that small array (B x N x 4 bytes), nothing output-sized from the vocabulary.

Example:
    >>> prog = lower_generate(prefill_graph, decode_graph, ranges=((0, 2), (2, 4)),
    ...                       devices=jax.devices()[:2], num_microbatches=2, ...)
    >>> tokens, caches = prog.fn(prog.place_params(leaves), prog.empty_caches(), prompt, lengths)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax._compat import Literal as JaxLiteral
from lwjax._compat import Var
from lwjax.errors import CacheLayoutError
from lwjax.passes.carry import layout, pack, send, unpack, zeros
from lwjax.passes.codec import build_codecs
from lwjax.passes.compression import Compression
from lwjax.passes.kv_slots import (
    CacheLeaf,
    CacheSlots,
    cache_arg_vars,
    cache_leaves,
    find_patch,
    patch_specs,
)
from lwjax.passes.lower import _eval, _param_values, cut_values
from lwjax.passes.segment import LayerGraph, Segment
from lwjax.passes.storage import AXIS, SlotStorage

TOKENS = 0  # the step's positional arguments: tokens, cache, positions


@dataclasses.dataclass(frozen=True)
class _Update:
    """How a stage gets a held leaf's new value: from its own equations (``var``), from
    equations it repeats on its copy (``eqns`` then ``var``), or unchanged (``var`` None)."""

    slot: int
    leaf: int
    var: Var | None
    eqns: tuple = ()
    const: object = None


@dataclasses.dataclass(frozen=True)
class _StagePhase:
    """What stage s runs in one phase (prefill or decode)."""

    segments: tuple[Segment, ...]
    params: tuple[int, ...]
    carry_in: tuple[Var, ...]
    carry_out: tuple[Var, ...]
    updates: tuple[_Update, ...]
    patches: dict  # leaf index -> its dynamic_update_slice equation (``_patch``)


@dataclasses.dataclass
class GenerationProgram:
    """The lowered generation program and what it needs to run.

    ``fn(placed_params, caches, prompt [M, mb, T], lengths [M, mb]) -> (tokens [S * M, mb, N],
    caches)``; ``caches`` are donated and come back updated (``empty_caches`` makes the first
    ones). ``tokens`` of the last stage are the new tokens (``new_tokens``).
    """

    mesh: Mesh
    storage: SlotStorage
    cache_slots: CacheSlots
    cache_leaves: tuple[CacheLeaf, ...]
    num_stages: int
    num_microbatches: int
    microbatch_size: int
    prefill_len: int
    prompt_len: int
    max_new_tokens: int
    decode_steps: int
    period: int
    fn: object
    _graph: LayerGraph
    _stage_params: tuple[tuple[int, ...], ...]

    @property
    def ticks(self) -> tuple[int, int]:
        """(prefill ticks, decode ticks) of one call."""
        s, m = self.num_stages, self.num_microbatches
        return m + s - 1, (self.decode_steps * self.period + s - 1) if self.decode_steps else 0

    def place_params(self, param_leaves: Sequence):
        values = _param_values(self._graph, param_leaves)
        return self.storage.place(self.mesh, [[values[i] for i in params]
                                              for params in self._stage_params])

    def abstract_caches(self) -> list:
        sharding = NamedSharding(self.mesh, P(AXIS))
        return [jax.ShapeDtypeStruct((self.num_stages, self.num_microbatches, size), dt,
                                     sharding=sharding)
                for (dt, size), _ in self.cache_slots.slots]

    def empty_caches(self) -> list:
        """The cache slots, allocated on their devices (the program fills them)."""
        slots = self.abstract_caches()
        if not slots:
            return []
        make = jax.jit(lambda: [jnp.zeros(a.shape, a.dtype) for a in slots],
                       out_shardings=[a.sharding for a in slots])
        return make()  # one program for every slot

    def new_tokens(self, stacked) -> jax.Array:
        """The last stage's [M, mb, N] tokens from ``fn``'s [S * M, mb, N], as [B, N] on the
        last stage's device, taken where they were written (no gather). In a multi-process
        run the process holding that device has them (``lwjax.distributed.gather`` hands
        them to every process); the others get the same array without local data."""
        m, last = self.num_microbatches, self.num_stages - 1
        device = self.mesh.devices.ravel()[last]
        _, mb, n = stacked.shape
        rows = [sh.data.reshape(m * mb, n) for sh in stacked.addressable_shards
                if sh.device == device]
        sharding = NamedSharding(Mesh(np.array([device]), (AXIS,)), P())
        return jax.make_array_from_single_device_arrays((m * mb, n), sharding, rows,
                                                        dtype=stacked.dtype)


def _closure(graph: LayerGraph, var: Var, available: set) -> tuple | None:
    """The equations that compute ``var`` from ``available`` values (in order), or None
    when it needs anything else (another stage's activations or weights)."""
    producer = {v: e for seg in graph.segments for e in seg.eqns for v in e.outvars}
    eqns: list = []
    done: set = set()

    def visit(v) -> bool:
        if isinstance(v, JaxLiteral) or v in available or v in done:
            return True
        e = producer.get(v)
        if e is None or not all(visit(x) for x in e.invars):
            return False
        if not any(o in done for o in e.outvars):
            eqns.append(e)
        done.update(e.outvars)
        return True

    return tuple(eqns) if visit(var) else None


def _phase(graph: LayerGraph, ranges, leaves, slots: CacheSlots, stage_params, name: str
           ) -> list[_StagePhase]:
    segs, num_stages = graph.segments, len(ranges)
    token_var = graph.arg_vars[0]
    # the new token is known on stage 0 only; cache outputs stay on their stages
    cuts = cut_values(graph, ranges, outputs=(), first_stage_args=(token_var,))[:-1]
    cache_vars = cache_arg_vars(graph)
    outs = graph.jaxpr.jaxpr.outvars[1:]
    consts = set(graph.jaxpr.jaxpr.constvars)
    param_vars = graph.param_vars
    out = []
    for s, (start, stop) in enumerate(ranges):
        stage_segs = list(segs[start + 1: stop + 1])
        if s == 0:
            stage_segs.insert(0, graph.prologue)
        if s == num_stages - 1:
            stage_segs.append(graph.epilogue)
        carry_in = cuts[s - 1] if s > 0 else ()
        available = consts | {param_vars[i] for i in stage_params[s]} | set(carry_in) | {
            v for v, c in zip(graph.arg_vars, graph.traced.cache_args, strict=True) if not c}
        available |= {cache_vars[j] for j in slots.where[s]}
        available |= {v for seg in stage_segs for e in seg.eqns for v in e.outvars}
        updates, patches = [], {}
        for j, slot in slots.where[s].items():
            o = outs[j]
            e = find_patch(stage_segs, cache_vars[j], o)
            if e is not None:
                patches[j] = e
            if isinstance(o, JaxLiteral):
                updates.append(_Update(slot, j, None, const=o.val))
                continue
            if o is cache_vars[j]:
                updates.append(_Update(slot, j, None))
                continue
            eqns = _closure(graph, o, available)
            if eqns is None:
                raise CacheLayoutError(
                    f"cache leaf {leaves[j].path!r} {list(leaves[j].shape)} is read on stage "
                    f"{s} but its {name} update needs values of other stages (its layer "
                    f"writes it from activations there). A stage can only keep caches it "
                    "updates itself: give the leaf one owner layer, or plan with fewer stages.")
            updates.append(_Update(slot, j, o, eqns))
        out.append(_StagePhase(segments=tuple(stage_segs), params=stage_params[s],
                               carry_in=carry_in,
                               carry_out=cuts[s] if s < num_stages - 1 else (),
                               updates=tuple(updates), patches=patches))
    return out



@dataclasses.dataclass(frozen=True)
class _Eqns:
    """Equations a stage repeats on its own copy of a cache leaf (``_eval`` binds them)."""

    eqns: tuple
    name: str = "cache_update"
    kind: str = "layer"


def lower_generate(
    prefill: LayerGraph,
    decode: LayerGraph,
    ranges: Sequence[tuple[int, int]],
    devices: Sequence,
    num_microbatches: int,
    *,
    prompt_len: int,
    max_new_tokens: int,
    cache_fills: Sequence,
    eos_id: int | None,
    pad_id: int,
    compression: Compression | None = None,
) -> GenerationProgram:
    """Builds the generation program for stages covering layer ``ranges``.

    Args:
        prefill: the step traced at the microbatch size and P0 tokens (P0: the tokens every
            sequence of a call has: at most its shortest prompt).
        decode: the step traced at the microbatch size and one token.
        ranges: per stage, the (start, stop) layer indices it runs.
        devices: one device per stage.
        num_microbatches: M groups of sequences in flight.
        prompt_len: T, the prompt array's length (prompts are right-padded to it).
        max_new_tokens: N.
        cache_fills: per cache leaf, the value ``init_cache`` fills it with.
        eos_id: a token that ends a sequence, or None.
        pad_id: what follows a sequence's eos_id.
        compression: store matmul weights compressed (``passes/codec.py``), decoded in
            each stage's branch.

    Returns:
        GenerationProgram.

    Example:
        >>> prog = lower_generate(pre, dec, [(0, 2), (2, 4)], jax.devices()[:2], 2,
        ...                       prompt_len=8, max_new_tokens=4, cache_fills=fills,
        ...                       eos_id=None, pad_id=0)
        >>> prog.ticks        # prefill M + S - 1; decode 3 steps x period 2 + S - 1
        (3, 7)
    """
    num_stages, m, n_new = len(ranges), num_microbatches, max_new_tokens
    mesh = Mesh(np.array(list(devices)[:num_stages]), (AXIS,))
    leaves = cache_leaves((prefill, decode), ranges, cache_fills)
    slots = CacheSlots(leaves, num_stages)
    stage_params = []
    for start, stop in ranges:
        segs = [*decode.segments[start + 1: stop + 1], *prefill.segments[start + 1: stop + 1]]
        if start == 0:
            segs += [decode.prologue, prefill.prologue]
        if stop == len(decode.layers):
            segs += [decode.epilogue, prefill.epilogue]
        stage_params.append(tuple(sorted({i for seg in segs for i in seg.params})))
    codecs = build_codecs(decode, compression) if compression is not None else None
    storage = SlotStorage(stage_params, decode.param_vars, codecs)
    mb = decode.traced.batch_size
    prefill_len = int(prefill.traced.args[TOKENS].shape[1])
    decode_steps = prompt_len - prefill_len + n_new - 1
    period = max(m, num_stages)
    message = jax.ShapeDtypeStruct((mb + 2,), jnp.int32)  # a token per sequence, group, valid
    msg_slots, msg_sizes = layout([message])

    def branches_for(graph: LayerGraph, name: str, patching: bool):
        phase = _phase(graph, ranges, leaves, slots, stage_params, name)
        patch = patch_specs(phase, slots, leaves) if patching else {}
        sizes = dict(msg_sizes)
        for st in phase:
            for dt, n in layout([v.aval for v in st.carry_out])[1].items():
                sizes[dt] = max(sizes.get(dt, 0), n)
        jaxpr = graph.jaxpr.jaxpr
        consts = dict(zip(jaxpr.constvars, graph.jaxpr.consts, strict=True))
        cache_vars = cache_arg_vars(graph)
        token_var, positions_var = graph.arg_vars[0], graph.arg_vars[-1]
        token_out = jaxpr.outvars[0]
        layouts = [layout([v.aval for v in st.carry_out])[0] for st in phase]

        def branch_for(s: int, st: _StagePhase):
            def branch(recv, rows, tokens, positions, params, group, valid):
                env = dict(consts)
                env.update(zip((graph.param_vars[i] for i in st.params),
                               storage.unpack(params, s, lazy=True), strict=True))
                env[token_var], env[positions_var] = tokens, positions
                for j, slot in slots.where[s].items():
                    env[cache_vars[j]] = rows[slot].reshape(leaves[j].shape)
                if s > 0:
                    env.update(zip(st.carry_in, unpack(recv, layouts[s - 1]), strict=True))
                _eval(st.segments, env, s)
                rows = list(rows)
                for u in st.updates:
                    if u.const is not None:
                        rows[u.slot] = jnp.full_like(rows[u.slot], u.const)
                    elif u.var is not None:
                        if u.eqns:
                            _eval((_Eqns(u.eqns),), env, s)
                        rows[u.slot] = jnp.ravel(env[u.var]).astype(rows[u.slot].dtype)
                held = {slot: j for j, slot in slots.where[s].items()}
                for n, spec in patch.items():  # these slots take an update, not a row
                    j = held.get(n)
                    if j is None:  # a padding slot on this stage: never read
                        rows[n] = spec.zeros()
                        continue
                    e = st.patches[j]
                    update, *index = (v.val if isinstance(v, JaxLiteral) else env[v]
                                      for v in e.invars[1:])
                    rows[n] = (jnp.asarray(update, spec.dtype),
                               jnp.stack([jnp.asarray(i, jnp.int32) for i in index]))
                if s < num_stages - 1:
                    return pack([env[v] for v in st.carry_out], layouts[s], sizes), rows
                tok = (jnp.full((mb,), token_out.val) if isinstance(token_out, JaxLiteral)
                       else env[token_out])
                msg = jnp.concatenate([tok.astype(jnp.int32).reshape(mb),
                                       jnp.stack([group, valid.astype(jnp.int32)])])
                return pack([msg], msg_slots, sizes), rows

            return branch

        def idle(recv, rows, tokens, positions, params, group, valid):
            rows = list(rows)
            for n, spec in patch.items():  # write back what is there: a no-op
                rows[n] = spec.unchanged(rows[n])
            return zeros(sizes), rows

        return [branch_for(s, st) for s, st in enumerate(phase)] + [idle], sizes, patch

    # a prefill writes whole rows (a fresh cache); a decode tick only its new positions
    pre_branches, pre_sizes, _ = branches_for(prefill, "prefill", False)
    dec_branches, dec_sizes, dec_patch = branches_for(decode, "decode", True)
    ring = [(i, (i + 1) % num_stages) for i in range(num_stages)]
    fills = slots.fills
    last = num_stages - 1

    def per_device(params, caches, prompt_MBT, lengths_MB):
        stage = jax.lax.axis_index(AXIS)
        is_first, is_last = stage == 0, stage == last
        # Every call starts from init_cache's values: a prefill tick reads its group's rows
        # as the fill values, not from the slots (reused across calls), and writes them back.
        fill_rows = [jnp.full(c.shape[2:], jnp.asarray(fills[:, n], c.dtype)[stage])
                     for n, c in enumerate(caches)]
        tokbuf = jnp.zeros((m, mb), jnp.int32)
        out = jnp.full((m, mb, n_new), pad_id, jnp.int32)
        done = jnp.zeros((m, mb), bool)

        def receive(recv, tokbuf):
            """Stage 0 stores a token the last stage sent (for its group's next step)."""
            msg = unpack(recv, msg_slots)[0]
            stored = jax.lax.dynamic_update_index_in_dim(tokbuf, msg[:mb], msg[mb], 0)
            return jnp.where(is_first & (msg[mb + 1] == 1), stored, tokbuf)

        def record(msg, q, out, done):
            """The last stage writes the prediction for position q of each sequence of the
            message's group at index q - length (when 0 <= q - length < N)."""
            tok, g = msg[:mb], msg[mb]
            idx = q - lengths_MB[g]
            finished = done[g]
            hit = (idx >= 0) & (idx < n_new)
            row = jnp.where(hit[:, None] & (jnp.arange(n_new)[None] == idx[:, None]),
                            jnp.where(finished, pad_id, tok)[:, None], out[g])
            if eos_id is not None:
                finished = finished | (hit & (tok == eos_id))
            keep = is_last & (msg[mb + 1] == 1)
            out = jnp.where(keep, jax.lax.dynamic_update_index_in_dim(out, row, g, 0), out)
            done = jnp.where(keep, jax.lax.dynamic_update_index_in_dim(done, finished, g, 0),
                             done)
            return out, done

        def tick(branches, is_prefill: bool):
            def run(state, t):
                recv, caches, tokbuf, out, done = state
                tokbuf = receive(recv, tokbuf)
                u = t - stage
                if is_prefill:
                    k, g, valid = jnp.int32(-1), u, (u >= 0) & (u < m)
                else:
                    k, g = u // period, u % period
                    valid = (u >= 0) & (k < decode_steps) & (g < m)
                g = jnp.clip(g, 0, m - 1).astype(jnp.int32)
                prompt_BT = prompt_MBT[g]
                if is_prefill:
                    tokens = prompt_BT[:, :prefill_len]
                    positions = jnp.broadcast_to(jnp.arange(prefill_len, dtype=jnp.int32),
                                                 (mb, prefill_len))
                    q = jnp.int32(prefill_len)
                else:
                    p = (prefill_len + k).astype(jnp.int32)
                    given = jax.lax.dynamic_index_in_dim(
                        prompt_BT, jnp.clip(p, 0, prompt_len - 1), 1, keepdims=False)
                    tokens = jnp.where(p < lengths_MB[g], given, tokbuf[g])[:, None]
                    positions = jnp.full((mb, 1), p, jnp.int32)
                    q = p + 1
                rows = [jax.lax.dynamic_index_in_dim(c[0], g, 0, keepdims=False) for c in caches]
                if is_prefill:  # a fresh cache; idle ticks keep the row they write back
                    rows = [jnp.where(valid, f, r) for f, r in zip(fill_rows, rows, strict=True)]
                sent, rows = jax.lax.switch(jnp.where(valid, stage, num_stages), branches, recv,
                                            rows, tokens, positions, params, g, valid)
                patch = {} if is_prefill else dec_patch
                caches = [patch[n].write(c, r, g) if n in patch else
                          jax.lax.dynamic_update_index_in_dim(c[0], r, g, 0)[None]
                          for n, (c, r) in enumerate(zip(caches, rows, strict=True))]
                out, done = record(unpack(sent, msg_slots)[0], q, out, done)
                if num_stages > 1:  # one collective per tick: every dtype as bytes
                    sent = send(sent, AXIS, ring)
                return (sent, caches, tokbuf, out, done), None

            return run

        state = (zeros(pre_sizes), caches, tokbuf, out, done)
        state, _ = jax.lax.scan(tick(pre_branches, True), state, jnp.arange(m + num_stages - 1))
        if decode_steps > 0:
            recv, *rest = state
            # the last group's first token is still in flight: carry it into the decode ring
            state = (pack(unpack(recv, msg_slots), msg_slots, dec_sizes), *rest)
            state, _ = jax.lax.scan(tick(dec_branches, False), state,
                                    jnp.arange(decode_steps * period + num_stages - 1))
        _, caches, _, out, _ = state
        return out, caches

    sharded = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(storage.specs(), [P(AXIS) for _ in slots.slots], P(), P()),
        out_specs=(P(AXIS), [P(AXIS) for _ in slots.slots]),
        axis_names={AXIS}, check_vma=False)
    return GenerationProgram(
        mesh=mesh, storage=storage, cache_slots=slots, cache_leaves=leaves,
        num_stages=num_stages, num_microbatches=m, microbatch_size=mb,
        prefill_len=prefill_len, prompt_len=prompt_len, max_new_tokens=n_new,
        decode_steps=decode_steps, period=period,
        fn=jax.jit(sharded, donate_argnums=(1,)), _graph=decode,
        _stage_params=tuple(stage_params))
