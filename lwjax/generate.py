"""``layerwise_generate``: greedy text generation through the layer-wise pipeline, each
stage's KV caches resident on its device (trace -> segment -> footprint -> partition ->
``passes/generate.py``).

Example:
    >>> g = lwjax.layerwise_generate(model, prompt, max_new_tokens=32, microbatches=4)
    >>> new = g(prompt)              # [B, 32] int32 == models.generate(model, prompt, 32)
    >>> print(g.summary())           # the plan (decode mode: KV counted) and the schedule
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwjax._api import (
    _capacity,
    _devices,
    _hardware,
    _microbatches,
    _mixing_error,
    _mixing_note,
    _whole,
    planned_compression,
)
from lwjax.causal_lm import CausalLM, causal_lm
from lwjax.errors import (
    ConfigError,
    DeviceError,
    InfeasiblePlanError,
    InputError,
    LwjaxError,
    TraceError,
)
from lwjax.hardware import HardwareSpec
from lwjax.models.transformer import check_tokens
from lwjax.passes import compression as compression_lib
from lwjax.passes.backend import check_runnable
from lwjax.passes.compression import Compression
from lwjax.passes.discovery import LayersSpec
from lwjax.passes.footprint import Footprint, GraphFootprint, footprint
from lwjax.passes.generate import GenerationProgram, lower_generate
from lwjax.passes.independence import batch_mixing
from lwjax.passes.kv_slots import stored_caches
from lwjax.passes.planner import epilogue_time, layer_times, numbers_from, plan_from_numbers
from lwjax.passes.segment import LayerGraph, segment
from lwjax.passes.trace import TracedModel, _trace
from lwjax.plan import Objective, Plan
from lwjax.plan_check import check_plan, check_plan_batch


def trace_step(lm: CausalLM, batch: int, length: int, cache_len: int,
               mode: str, info: dict | None = None) -> TracedModel:
    """Traces ``lm.step`` on ``length`` new tokens per sequence against a cache of
    ``cache_len`` positions, followed by the greedy pick of the next token: ``(params,
    tokens [batch, length], cache, positions [batch, length]) -> (next token [batch], cache)``.

    Example:
        >>> t = trace_step(causal_lm(model), 2, 1, 32, "decode")
        >>> sum(t.cache_args)   # lwjax's models: K and V per layer, and the length
        9
    """
    try:
        cache = jax.eval_shape(lambda: lm.init_cache(batch, cache_len))
    except LwjaxError:
        raise
    except Exception as e:  # noqa: BLE001 -- the model's own code: say what lwjax needs
        raise TraceError(
            f"{lm.name}.init_cache({batch}, {cache_len}) failed ({type(e).__name__}: {e}); "
            "generation needs a causal LM with a KV cache (an encoder such as BERT has "
            "none).") from e
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def step(params, tokens_BT, cache_in, positions_BT):
        logits, cache_out = lm.step(params, tokens_BT, cache_in, positions_BT)
        if jax.tree.structure(cache_out) != jax.tree.structure(cache_in):
            raise ConfigError(
                f"{lm.name}'s step returns a cache of another structure than it was given "
                f"({jax.tree.structure(cache_out)} vs {jax.tree.structure(cache_in)}); "
                "return the updated cache in the structure init_cache makes.")
        if getattr(logits, "ndim", 0) != 3 or logits.shape[:2] != tokens_BT.shape:
            raise ConfigError(f"{lm.name}'s step returns logits of shape "
                              f"{getattr(logits, 'shape', None)}; expected [batch, tokens, "
                              f"vocab] = [{tokens_BT.shape[0]}, {tokens_BT.shape[1]}, V].")
        if info is not None:
            info["vocab"] = int(logits.shape[-1])
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache_out

    return _trace(step, lm.params, (tokens, cache, tokens), {}, mode, None, lm.kind, 1,
                  scoped_by_lwjax=lm.kind == "nnx")


def _cache_fills(lm: CausalLM, batch: int, cache_len: int) -> list:
    """The value each cache leaf starts at (``init_cache`` fills every leaf with one value:
    zeros, a position counter at 0)."""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(
        jax.jit(lambda: lm.init_cache(batch, cache_len))())[0]
    fills = []
    for path, leaf in leaves_with_path:
        flat = np.asarray(leaf).ravel()
        if flat.size and not (flat == flat[0]).all():
            raise ConfigError(
                f"{lm.name}.init_cache fills cache leaf {jax.tree_util.keystr(path)} with "
                "differing values; lwjax starts every leaf from one value (zeros, a counter).")
        fills.append(flat[0].item() if flat.size else 0)
    return fills


def _combined_numbers(prefill: LayerGraph, decode: LayerGraph, hw: HardwareSpec,
                      num_microbatches: int, attention: str,
                      compression: Compression | None = None):
    """Per layer, what a stage holds across the whole generation: weights, the caches of all
    M groups (decode's KV bytes x M), and the larger of the prefill and decode transient
    peaks; times are decode's (what every token pays)."""
    fps = [footprint(g, compression, attention=attention, backend=hw.kind)
           for g in (prefill, decode)]

    def both(p: Footprint, d: Footprint) -> Footprint:
        return dataclasses.replace(
            d, activation_bytes=max(p.activation_bytes, d.activation_bytes),
            buffer_bytes=max(p.buffer_bytes, d.buffer_bytes),
            kv_cache_bytes=d.kv_cache_bytes * num_microbatches,
            unknown_primitives=tuple(sorted({*p.unknown_primitives, *d.unknown_primitives})))

    pre, dec = fps
    # a cache leaf the layers read too (lwjax's position counter) is counted with them once
    in_layers = {v for seg in decode.layers for v in seg.cache_inputs}

    def outer(p: Footprint, d: Footprint, seg) -> Footprint:
        own = sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
                  for v in seg.cache_inputs if v not in in_layers)
        return dataclasses.replace(both(p, d), kv_cache_bytes=own * num_microbatches)

    fp = GraphFootprint(prologue=outer(pre.prologue, dec.prologue, decode.prologue),
                        layers=tuple(both(p, d) for p, d in zip(pre.layers, dec.layers,
                                                                strict=True)),
                        epilogue=outer(pre.epilogue, dec.epilogue, decode.epilogue),
                        compression=dec.compression, backend=dec.backend)
    stored = fp if fp.compression.name != "none" else None  # weights read as stored
    costs = layer_times(decode, hw, weights_on_chip=True, fp=stored)
    numbers = numbers_from(decode, fp, costs,
                           epilogue_time(decode, hw, weights_on_chip=True, fp=stored))
    # the caches sit in slots like the weights: uneven stages pad them (passes/padding.py)
    return dataclasses.replace(numbers,
                               cached=stored_caches((prefill, decode), num_microbatches))


def _plan_at(lm, graphs, batch, m, ids, hw, capacity, attention, objective, cache_len,
             compression: Compression):
    """The plan with M groups, and the prefill and decode graphs it was made from."""
    mb = batch // m
    pre, dec = graphs(mb)
    numbers = _combined_numbers(pre, dec, hw, m, attention, compression)
    try:
        plan = plan_from_numbers(
            numbers, capacity_bytes=capacity, device_ids=ids, hardware=hw.name,
            compression=compression.name, microbatches=m, microbatch_size=mb, mode="decode",
            attention=attention, objective=objective, model=lm.name,
            concurrency=hw.num_cores if hw.kind == "cpu" else None)
    except InfeasiblePlanError as e:
        e.args = (f"{e} For generation: each stage holds its layers' weights as stored and "
                  f"their KV caches for all {batch} sequences of {cache_len} positions, one "
                  f"device per stage (no split; compression={compression.name!r}): raise "
                  f"cache_bytes= (now "
                  f"{capacity:,} bytes), add devices, or generate for fewer sequences or "
                  "positions.",)
        raise
    return plan, pre, dec


class Generator:
    """A model generating text through a layer-wise pipeline: weights and KV caches placed on
    their stages once. One compiled program per (batch, prompt length T, N) when every prompt
    fills T; prompts of different lengths prefill the largest power of two no longer than the
    shortest prompt and feed the rest token by token, so they add at most log2(T) + 1
    programs however the lengths vary (``prefill_length``).

    Attributes:
        plan: the Plan it runs (mode "decode": each stage's footprint counts its layers' KV
            caches for all M groups, and the larger of the prefill and decode peaks).
        max_new_tokens: N, new tokens per sequence and call.
        prompt_shape: (B, T) of the prompts it takes (right-padded to T).
        cache_len: KV-cache positions per sequence (T + N).
        compile_seconds: measured compile time of each program, keyed by its prefill length.

    Example:
        >>> g = lwjax.layerwise_generate(model, prompt, max_new_tokens=8)
        >>> g(prompt).shape
        (4, 8)
    """

    def __init__(self, lm: CausalLM, plan: Plan, decode: LayerGraph, devices, *,
                 prompt_shape, max_new_tokens, cache_len, eos_id, pad_id, layers,
                 vocab=None, compression: Compression | None = None, place=None):
        self.lm, self.plan, self._decode, self._layers = lm, plan, decode, layers
        self.compression = compression
        self.prompt_shape, self.max_new_tokens, self.cache_len = prompt_shape, max_new_tokens, \
            cache_len
        self.eos_id, self.pad_id, self.vocab = eos_id, pad_id, vocab
        from lwjax import distributed  # multi-process: every process compiles the same

        distributed.agree_plan(plan, "generation plan", prompt_shape=list(prompt_shape),
                               max_new_tokens=max_new_tokens, cache_len=cache_len,
                               eos_id=eos_id, pad_id=pad_id, compression=compression)
        by_id = {d.id: d for d in devices}
        self._devices = [by_id[s.devices[0]] for s in plan.stages]
        self._fills = _cache_fills(lm, plan.microbatch_size, cache_len)
        self._programs: dict[int, GenerationProgram] = {}
        self.compile_seconds: dict[int, float] = {}
        first = self.program(prompt_shape[1])
        # place(program): the weights already on devices (``Generator.replan``)
        self.params = first.place_params(decode.traced.params) if place is None else \
            place(first)
        self.failover = None
        self.model_weights = True  # the running weights are the model's own arrays
        self.caches = first.empty_caches()

    def replan(self, exclude_devices=(), spare_devices=(), *, drain: bool = False
               ) -> Generator:
        """This generator on a new plan without ``exclude_devices`` (lost ones), its weights
        moved device to device to their new stages (``ShardedModel.replan``; excluded
        devices are not read unless ``drain``); the full-prompt program is compiled before
        it returns and ``.failover`` times the parts. A call runs prefill to its last token
        as one program, so between calls no sequence is in flight: the new generator's KV
        caches start empty on their new devices, as every call's do.

        Example:
            >>> g2 = g.replan(exclude_devices=[1])
            >>> g2(prompt)        # the same tokens
        """
        from lwjax import failover

        return failover.replan_generator(self, exclude_devices, spare_devices, drain=drain)

    def program(self, prefill_len: int) -> GenerationProgram:
        """The program that prefills ``prefill_len`` tokens of every prompt (built once)."""
        if prefill_len not in self._programs:
            mb = self.plan.microbatch_size
            prefill = segment(trace_step(self.lm, mb, prefill_len, self.cache_len, "prefill"),
                              self._layers)
            self._programs[prefill_len] = lower_generate(
                prefill, self._decode, [s.layer_range for s in self.plan.stages],
                self._devices, self.plan.microbatches, prompt_len=self.prompt_shape[1],
                max_new_tokens=self.max_new_tokens, cache_fills=self._fills,
                eos_id=self.eos_id, pad_id=self.pad_id, compression=self.compression)
        return self._programs[prefill_len]

    def _inputs(self, prompt, lengths, attention_mask):
        check_tokens(prompt, "Generator(prompt)", name="prompt")
        if tuple(prompt.shape) != self.prompt_shape:
            raise InputError(
                f"prompt has shape {tuple(prompt.shape)}, but this generator was built for "
                f"{self.prompt_shape} (batch, prompt length); right-pad prompts to length "
                f"{self.prompt_shape[1]} and pass lengths=, or call layerwise_generate again.")
        lengths_B = _lengths(prompt, lengths, attention_mask)
        prompt = np.asarray(prompt)
        if self.vocab is not None and prompt.size and (prompt.min() < 0 or
                                                       prompt.max() >= self.vocab):
            bad = int(prompt.min() if prompt.min() < 0 else prompt.max())
            raise InputError(f"prompt holds token {bad}, outside {self.lm.name}'s vocabulary "
                             f"0..{self.vocab - 1}.")
        prompt = prompt.astype(np.int32)
        if attention_mask is not None:  # left-padded rows move their tokens to the front
            mask = np.asarray(attention_mask).astype(bool)
            prompt = np.stack([np.concatenate([row[m], np.zeros((~m).sum(), np.int32)])
                               for row, m in zip(prompt, mask, strict=True)])
        m, mb = self.plan.microbatches, self.plan.microbatch_size
        return (prompt.reshape(m, mb, -1), lengths_B.reshape(m, mb).astype(np.int32),
                int(lengths_B.min()))

    def __call__(self, prompt, lengths=None, attention_mask=None) -> jax.Array:
        """The new tokens [B, N] (int32) for ``prompt`` [B, T].

        Args:
            prompt: int tokens [B, T], right-padded when prompts differ in length.
            lengths: each sequence's prompt length [B] (default: T for every sequence).
            attention_mask: instead of ``lengths``, a [B, T] 0/1 mask of the real tokens (a
                contiguous run per row; left padding is moved to the right).

        Returns:
            [B, N] int32: each sequence's greedy continuation, as it would get alone; after
            ``eos_id`` the tokens are ``pad_id``.
        """
        prompt_MBT, lengths_MB, shortest = self._inputs(prompt, lengths, attention_mask)
        shortest = prefill_length(shortest, self.prompt_shape[1])
        prog = self.program(shortest)
        if shortest not in self.compile_seconds:
            start = time.perf_counter()
            prog.fn.lower(self.params, prog.abstract_caches(), prompt_MBT, lengths_MB).compile()
            self.compile_seconds[shortest] = time.perf_counter() - start
        from lwjax import distributed  # several processes: a lost peer is PeerLostError

        with distributed.peer_guard():
            stacked, self.caches = prog.fn(self.params, self.caches, prompt_MBT, lengths_MB)
            return prog.new_tokens(stacked)

    def lower(self, prompt, lengths=None, attention_mask=None) -> jax.stages.Lowered:
        """The ``jax.stages.Lowered`` program for these prompts."""
        prompt_MBT, lengths_MB, shortest = self._inputs(prompt, lengths, attention_mask)
        shortest = prefill_length(shortest, self.prompt_shape[1])
        return self.program(shortest).fn.lower(self.params, self.caches, prompt_MBT, lengths_MB)

    def compile(self, prompt, lengths=None, attention_mask=None) -> jax.stages.Compiled:
        """``lower(...).compile()``: e.g. ``.memory_analysis()`` per device."""
        return self.lower(prompt, lengths, attention_mask).compile()

    def kv_cache_bytes(self) -> dict[int, dict[str, int]]:
        """Per device id, measured from the placed cache arrays: ``allocated`` (the bytes of
        its shards) and ``own`` (its stage's own leaves for all M groups; the rest of
        ``allocated`` pads a stage with fewer cache leaves than the largest one)."""
        prog = next(iter(self._programs.values()))
        m = self.plan.microbatches
        out = {}
        for s, stage in enumerate(self.plan.stages):
            dev = self._devices[s]
            allocated = sum(sh.data.nbytes for c in self.caches for sh in c.addressable_shards
                            if sh.device == dev)
            own = sum(m * prog.cache_leaves[j].nbytes for j in prog.cache_slots.where[s])
            out[stage.devices[0]] = {"allocated": allocated, "own": own}
        return out

    def schedule(self) -> str:
        """The decode schedule in words: ticks, period, bubble."""
        s, m = len(self.plan.stages), self.plan.microbatches
        period = max(m, s)
        bubble = 1 - m / period
        ends = [st.est_time_s + (self.plan.numbers.epilogue_s if st.index == s - 1 else 0.0)
                for st in self.plan.stages]
        tick = max(ends)
        slow = self.plan.stages[ends.index(tick)]
        return (f"ring decode: {s} stages, M={m} groups of {self.plan.microbatch_size} "
                f"sequences; a token every {period} ticks per sequence (period max(M, S)); "
                f"bubble {100 * bubble:.0f}%"
                + ("" if m >= s else f" (M < S: raise microbatches to {s} to remove it)")
                + f"; prefill: GPipe, {m + s - 1} ticks\n"
                f"projected TPOT: {period} ticks x {tick * 1e3:.3f} ms (stage {slow.index}, "
                f"epilogue included) = {period * tick * 1e3:.3f} ms; not measured, transfers "
                "and per-tick dispatch excluded" + self._padding_note())

    def _padding_note(self) -> str:
        """Where uneven stages make a device allocate more cache than its own layers'."""
        padded = {d: b for d, b in self.kv_cache_bytes().items() if b["allocated"] > b["own"]}
        if not padded:
            return ""
        worst = max(padded, key=lambda d: padded[d]["allocated"] - padded[d]["own"])
        return (f"\nKV cache slots are padded to the largest stage's leaves on "
                f"{len(padded)} device(s): device {worst} allocates "
                f"{padded[worst]['allocated']:,} bytes for {padded[worst]['own']:,} of its own "
                "(measured; even stages avoid it)")

    def summary(self) -> str:
        return f"{self.plan.summary()}\n{self.schedule()}"

    def __repr__(self) -> str:
        return f"Generator(\n{self.summary()}\n)"


def prefill_length(shortest: int, prompt_len: int) -> int:
    """Tokens a call prefills: all T when every prompt fills the array, else the largest
    power of two no longer than the shortest prompt (the rest is fed token by token), so that
    varying lengths compile at most log2(T) + 1 programs.

    Example:
        >>> prefill_length(8, 8), prefill_length(7, 8), prefill_length(3, 8)
        (8, 4, 2)
    """
    return prompt_len if shortest == prompt_len else 1 << (int(shortest).bit_length() - 1)


def _lengths(prompt, lengths, attention_mask) -> np.ndarray:
    b, t = prompt.shape
    if lengths is not None and attention_mask is not None:
        raise InputError("pass lengths= or attention_mask=, not both.")
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != (b, t) or not np.isin(mask, (0, 1)).all():
            raise InputError(f"attention_mask must be 0/1 of the prompt's shape {(b, t)}; got "
                             f"{mask.dtype} {mask.shape}.")
        edges = np.abs(np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)).sum(1)
        if (edges != 2).any():
            row = int(np.argmax(edges != 2))
            raise InputError(f"attention_mask row {row} is not one run of ones (padding on the "
                             "left or on the right, at least one real token).")
        return mask.sum(1).astype(np.int64)
    if lengths is None:
        return np.full((b,), t, np.int64)
    arr = np.asarray(lengths)
    if arr.shape != (b,) or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"lengths must be {b} integers (one prompt length per sequence); got "
                         f"{arr.dtype} {arr.shape}.")
    if (arr < 1).any() or (arr > t).any():
        bad = int(np.argmax((arr < 1) | (arr > t)))
        raise InputError(f"lengths[{bad}] = {int(arr[bad])} is outside 1..{t} (the prompt "
                         "array's length); every sequence needs at least one prompt token.")
    return arr.astype(np.int64)


def _token_id(value, name: str) -> int | None:
    if value is None:
        return None
    count = _whole(value)
    if count is None or count < 0 or count >= 2**31:
        raise InputError(f"{name} must be a non-negative integer token id (below 2**31) or "
                         f"None, got {value!r}.")
    return count


def layerwise_generate(
    model,
    prompt,
    *,
    max_new_tokens: int,
    devices=None,
    hardware: HardwareSpec | str | None = None,
    cache_bytes: int | None = None,
    microbatches: int | None = None,
    plan: Plan | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    cache_len: int | None = None,
    objective: Objective = "step",
    layers: LayersSpec = None,
    compression: str | Compression | None = None,
) -> Generator:
    """Greedy generation through a layer-wise pipeline: the step traced twice (prefill,
    decode), segmented, planned in decode mode (weights + all groups' KV caches + the larger
    transient peak per stage), lowered into one program whose ring of stages decodes every
    token on the devices (``passes/generate.py``).

    Args:
        model: an lwjax model (or NNX module with ``init_cache`` / ``decode_step``), a
            ``transformers`` Flax causal LM, or an ``lwjax.CausalLM``.
        prompt: example int tokens [B, T]; calls take this shape (right-padded).
        max_new_tokens: N >= 1 new tokens per sequence.
        devices: jax devices (default: all of ``jax.devices()``).
        hardware: HardwareSpec or preset name (default: from the devices' platform).
        cache_bytes: on-chip capacity per device (default: the hardware's L2 size).
        microbatches: M groups of sequences in flight (default: the fewest groups, a
            divisor of B, that cover the planned stages: M >= S leaves the ring no bubble,
            and more groups only add ticks).
        plan: run this Plan (made with mode="decode" for this model and batch) as it is.
        eos_id: a token id that ends a sequence, or None.
        pad_id: the token after a sequence's ``eos_id`` (default: ``eos_id``).
        cache_len: KV-cache positions per sequence (default and minimum: T + N - 1 ... T + N).
        objective: "step" or "bottleneck" (see ``lwjax.plan``).
        layers: name the layers when discovery cannot decide (see ``lwjax.analyze``).
        compression: None, a preset name ("int8", "int4", "int8-2:4", ...) or an
            ``lwjax.Compression``: matmul weights stored compressed on their stage and
            decoded inside it (``passes/codec.py``); the plan counts the stored bytes. A
            given ``plan=`` runs with the compression it was made with.

    Returns:
        Generator; ``g(prompt)`` returns the new tokens [B, N].

    Raises:
        InputError: a prompt that is not [B, T] integers, N < 1, a cache too short for the
            prompt and N, more positions than the model has.
        InfeasiblePlanError: the weights, caches and peaks do not fit the devices.

    Example:
        >>> g = layerwise_generate(model, prompt, max_new_tokens=32, microbatches=4)
        >>> (g(prompt) == models.generate(model, prompt, 32)).all()
        Array(True, dtype=bool)
    """
    lm = causal_lm(model)
    check_tokens(prompt, "layerwise_generate(model, prompt)", name="prompt")
    n_new = _whole(max_new_tokens)
    if n_new is None or n_new < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    eos, pad = _token_id(eos_id, "eos_id"), _token_id(pad_id, "pad_id")
    pad = pad if pad is not None else eos if eos is not None else 0
    batch, prompt_len = (int(x) for x in prompt.shape)
    if batch < 1 or prompt_len < 1:
        raise InputError(f"prompt has shape {(batch, prompt_len)}: pass at least one sequence "
                         "of at least one token.")
    need = prompt_len + n_new
    if cache_len is None:
        cache_len = need
    elif _whole(cache_len) is None or _whole(cache_len) < 1:
        raise InputError(f"cache_len must be a positive integer number of positions (at "
                         f"least {need - 1} here), got {cache_len!r}.")
    elif _whole(cache_len) < need - 1:
        raise InputError(
            f"cache_len={cache_len!r} holds fewer positions than the prompt ({prompt_len}) "
            f"plus {n_new} new tokens need ({need - 1} written); raise cache_len to {need} or "
            "shorten the prompt or max_new_tokens.")
    cache_len = int(cache_len)
    if lm.max_positions is not None and max(cache_len, need - 1) > lm.max_positions:
        raise InputError(
            f"{lm.name} has {lm.max_positions} positions, but a prompt of {prompt_len} plus "
            f"{n_new} new tokens needs a cache of {cache_len}; shorten the prompt or "
            f"max_new_tokens (at most {lm.max_positions - prompt_len} new tokens here).")
    if devices is None:
        devices = jax.devices()
    objs, ids = _devices(devices, None)
    if objs is None:
        raise DeviceError("layerwise_generate runs on jax devices: pass devices=jax.devices(), "
                          "not device ids.")
    hw = _hardware(hardware, objs)
    attention = "fused" if hw.kind == "gpu" else "as_traced"

    info: dict = {}

    def graphs(mb: int) -> tuple[LayerGraph, LayerGraph]:
        pre = segment(trace_step(lm, mb, prompt_len, cache_len, "prefill", info), layers)
        dec = segment(trace_step(lm, mb, 1, cache_len, "decode"), layers)
        if [s.name for s in pre.layers] != [s.name for s in dec.layers]:
            raise ConfigError(
                f"{lm.name}'s prefill and decode steps have different layers "
                f"({len(pre.layers)} vs {len(dec.layers)}: {pre.layers[0].name}.. vs "
                f"{dec.layers[0].name}..); name them with layers=.")
        return pre, dec

    def mixing_at(m: int | None):
        """One group's sequences run through the model apart from another's: the equation
        that mixes the examples of the batch (passes/independence.py), where ``m`` groups
        (None: not pinned) may split it."""
        if batch == 1 or m == 1:
            return None
        return batch_mixing(trace_step(lm, batch, prompt_len, cache_len, "prefill", {})).mixing

    if plan is not None:
        mb = check_plan_batch(plan, batch)
        mixing = mixing_at(plan.microbatches)
        if mixing is not None:
            raise _mixing_error(mixing, plan.microbatches, "the given plan runs")
        if plan.mode != "decode":
            raise ConfigError(f"the plan was made for mode={plan.mode!r}; generation needs a "
                              "plan made by layerwise_generate (mode='decode').")
        if microbatches is not None and _whole(microbatches) != plan.microbatches:
            raise ConfigError(f"microbatches={microbatches!r} but the given plan runs "
                              f"{plan.microbatches}; a plan runs as it is: drop microbatches=, "
                              "or plan again with it.")
        pre, dec = graphs(mb)
        try:
            check_plan(plan, dec, ids, mode="decode")
        except ConfigError as e:
            e.args = (f"{e} For generation the KV cache's length (here {cache_len} positions: "
                      f"the prompt's {prompt_len} + max_new_tokens {n_new}, or cache_len=) is "
                      "part of every layer's shapes: reuse a plan only with the prompt length, "
                      "max_new_tokens and cache_len it was made with, from "
                      "layerwise_generate(...).plan.",)
            raise
        if plan.tp != 1:
            raise ConfigError(f"the plan splits stages over tp={plan.tp} devices; generation "
                              "runs one device per stage. Plan again with more cache_bytes or "
                              "fewer layers per device.")
    else:
        capacity = _capacity(cache_bytes, hw, False)
        m = _microbatches(batch, microbatches, len(ids))
        mixing = mixing_at(None if microbatches is None else m)
        if mixing is not None:
            if microbatches is not None and m > 1:
                raise _mixing_error(mixing, m, "microbatches=")
            m = 1
        tried: dict[int, tuple] = {}
        while m not in tried:
            try:
                tried[m] = _plan_at(lm, graphs, batch, m, ids, hw, capacity, attention,
                                    objective, cache_len, compression_lib.get(compression))
            except InfeasiblePlanError:
                if not tried:
                    raise
                break  # fewer, larger groups do not fit: keep the plan before
            plan, pre, dec = tried[m]
            if microbatches is not None or mixing is not None:
                break
            # the ring decodes without a bubble when M >= S; more groups than stages only
            # add ticks: take the fewest groups that cover the stages
            s = len(plan.stages)
            m = min((d for d in range(s, batch + 1) if batch % d == 0), default=batch)
        check_runnable(dec, objs[0].platform)
        if mixing is not None:
            plan = dataclasses.replace(plan, notes=(*plan.notes, _mixing_note(mixing)))
    vocab = info.get("vocab")
    for name, token in (("eos_id", eos), ("pad_id", pad)):
        if token is not None and vocab is not None and token >= vocab:
            raise InputError(f"{name}={token} is not a token of {lm.name}'s vocabulary of "
                             f"{vocab}; pass an id below {vocab}.")
    abstract = [path for path, x in zip(dec.traced.param_paths, dec.traced.params, strict=True)
                if isinstance(x, jax.ShapeDtypeStruct)]
    if abstract:
        raise ConfigError(
            f"{lm.name}'s weights are abstract ({abstract[0]!r} is a ShapeDtypeStruct): "
            "layerwise_generate places and runs them. Build the model with real weights "
            "(models.build); plan an abstract one with lwjax.plan(..., mode='decode').")
    return Generator(lm, plan, dec, objs, prompt_shape=(batch, prompt_len),
                     max_new_tokens=n_new, cache_len=cache_len, eos_id=eos, pad_id=pad,
                     layers=layers, vocab=vocab,
                     compression=planned_compression(plan, compression))


__all__: Sequence[str] = ("Generator", "layerwise_generate", "trace_step")
