"""Decode projections (part of ``passes/cost``): one token per sequence against a KV cache,
under a schedule of ``DECODE_SCHEDULES`` -- lwjax's ring or the baseline's GPipe.

Example:
    >>> p = project_decode(configs.seed_dense(), hardware.H100_SXM, [1] * 16, 1, 16)
    >>> p.bubble
    0.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

from lwjax.hardware import HardwareSpec
from lwjax.models.configs import DenseConfig
from lwjax.passes.cost_blocks import (
    _batch_seq,
    _even_stages,
    _local_dims,
    block_cost,
    block_flops,
)
from lwjax.passes.cost_core import allreduce_time, layer_time, transfer_time
from lwjax.passes.cost_energy import pipeline_energy
from lwjax.passes.roofline import LayerCost, _is_count, _require


def decode_block_cost(
    cfg: DenseConfig,
    *,
    batch_size: int | None = None,
    cache_len: int | None = None,
    tp: int = 1,
) -> LayerCost:
    """Closed-form LayerCost of one block's decode step on one of ``tp`` devices:
    ``batch_size`` sequences, one new token each, attending over a KV cache of ``cache_len``
    positions (default ``cfg.seq_len``: decoding after a full-length prompt).

    FLOPs: ``block_flops`` at one token, with ``QK^T`` and ``PV`` over the cache,
    ``2 * 2*B*Nl*H*L`` (the XLA attention computes every cache position; masking does not skip
    work). Weights: as ``block_cost`` (a MoE block's experts all run their capacity slots, so
    all are read). Activations: ``block_cost`` at one token plus the cache read, ``2*B*L*Nl*H``
    elements, and the new K/V written, ``2*B*Nl*H``.

    Example:
        >>> c = decode_block_cost(configs.tiny_dense(), cache_len=16)   # B=4 D=64 N=4 H=16
        >>> c.activation_bytes - block_cost(configs.tiny_dense(), seq_len=1).activation_bytes
        34816
    """
    b, length = _batch_seq(cfg, batch_size, cache_len)
    n, _ = _local_dims(cfg, tp)
    h, s = cfg.head_dim, cfg.dtype.itemsize
    one = block_cost(cfg, batch_size=b, seq_len=1, tp=tp, attention="flash")
    f = block_flops(cfg, batch_size=b, seq_len=1, tp=tp)
    flops = f.attention_projections + f.mlp + 2 * 2 * b * n * h * length
    kv = s * (2 * b * length * n * h + 2 * b * n * h)
    return LayerCost(float(flops), one.weight_bytes, one.activation_bytes + kv)


def embedding_cost(cfg: DenseConfig, *, tokens: int) -> LayerCost:
    """Closed-form LayerCost of the token embedding (a gather) of ``tokens`` positions.

    No matmul FLOPs. Each position reads one row of D elements from the table and writes it:
    ``weight_bytes = activation_bytes = s * tokens * D``. Under vocab-parallel TP each
    device's masked local gather still reads one row per token; the combine of the partial
    rows is an all-reduce, timed by the caller.

    Example:
        >>> embedding_cost(configs.tiny_dense(), tokens=4).weight_bytes   # 4 rows of 64 f32
        1024
    """
    _require(_is_count(tokens), f"tokens must be a positive integer, got {tokens!r}.")
    nbytes = cfg.dtype.itemsize * tokens * cfg.hidden_size
    return LayerCost(0.0, nbytes, nbytes)


def head_cost(cfg: DenseConfig, *, tokens: int, tp: int = 1) -> LayerCost:
    """Closed-form LayerCost of the final RMSNorm + LM head [D, V] on ``tokens`` positions,
    the vocabulary split over ``tp`` devices (column-parallel, logits never gathered).

    FLOPs ``2 * tokens * D * V/tp``; weights ``s * (D * V/tp + D)`` (the head's columns and
    the norm scale; a tied head reads the embedding table, the same bytes); activations
    ``s * tokens * (D + V/tp)``, the normed input read and the logits written (the greedy
    argmax is assumed fused into that write).

    Example:
        >>> head_cost(configs.tiny_dense(), tokens=4).flops   # 2 * 4 * 64 * 256
        131072.0
    """
    _require(_is_count(tokens), f"tokens must be a positive integer, got {tokens!r}.")
    _require(
        _is_count(tp) and cfg.vocab_size % tp == 0,
        f"tp={tp!r} does not divide vocab_size={cfg.vocab_size}; pick a divisor.",
    )
    d, v, s = cfg.hidden_size, cfg.vocab_size // tp, cfg.dtype.itemsize
    return LayerCost(float(2 * tokens * d * v), s * (d * v + d), s * tokens * (d + v))


# Bytes per sequence in the all-reduce that combines a vocab-sharded greedy argmax: the
# local maximum (float32) and its index (int32).
_ARGMAX_BYTES = 8


@dataclasses.dataclass(frozen=True)
class _Work:
    """Work besides the blocks (embedding, head): its roofline cost, the communication it
    adds, and the weights it keeps on its device (for the L2 residency check)."""

    cost: LayerCost
    comm_s: float
    resident_bytes: int


@dataclasses.dataclass(frozen=True)
class _Ends:
    """Where a schedule runs the embedding and LM head: on stage 0 (``first``), on the last
    stage (``last``, per microbatch, inside the tick) or after the pipeline on every device
    (``outside``, once per pass for the whole batch)."""

    first: tuple[_Work, ...]
    last: tuple[_Work, ...]
    outside: tuple[_Work, ...]


def _ends_on_stages(cfg: DenseConfig, hw: HardwareSpec, *, num_stages: int, tp: int,
                    microbatch: int, tokens: int) -> _Ends:
    """Ring decode (lwjax): the first stage embeds its microbatch's ``tokens`` positions, the
    last stage runs the head on one position per sequence and picks the next token."""
    s, d = cfg.dtype.itemsize, cfg.hidden_size
    table = s * d * (cfg.vocab_size // tp)
    embed = _Work(embedding_cost(cfg, tokens=microbatch * tokens),
                  allreduce_time(s * microbatch * tokens * d, tp, hw), table)
    shared = cfg.tie_embeddings and num_stages == 1  # one device holds the one table once
    head = _Work(head_cost(cfg, tokens=microbatch, tp=tp),
                 allreduce_time(_ARGMAX_BYTES * microbatch, tp, hw),
                 s * d + (0 if shared else table))
    return _Ends(first=(embed,), last=(head,), outside=())


def _ends_outside(cfg: DenseConfig, hw: HardwareSpec, *, num_stages: int, tp: int,
                  microbatch: int, tokens: int) -> _Ends:
    """GPipe decode (the TP x PP baseline): embedding and head in the automatically
    partitioned part, once per pass. Every device embeds the whole batch (vocab-parallel,
    then an all-reduce over ``tp``); the last stage's outputs move to the batch split over
    the stages, ``(S - 1) * B/S`` rows sent (the full batch to each peer when S does not
    divide B); each device runs the head on its ``B/S`` sequences and the argmax is combined
    over ``tp``."""
    del microbatch  # the ends see the whole batch
    s, d, batch = cfg.dtype.itemsize, cfg.hidden_size, cfg.batch_size
    table = s * d * (cfg.vocab_size // tp)
    head_batch = batch // num_stages if batch % num_stages == 0 else batch
    embed = _Work(embedding_cost(cfg, tokens=batch * tokens),
                  allreduce_time(s * batch * tokens * d, tp, hw), table)
    relayout = transfer_time(s * d * head_batch * (num_stages - 1), hw)
    head = _Work(head_cost(cfg, tokens=head_batch, tp=tp),
                 relayout + allreduce_time(_ARGMAX_BYTES * head_batch, tp, hw),
                 s * d + (0 if cfg.tie_embeddings else table))
    return _Ends(first=(), last=(), outside=(embed, head))


@dataclasses.dataclass(frozen=True)
class DecodeSchedule:
    """How a pipelined decode step runs: an entry of ``DECODE_SCHEDULES``.

    Attributes:
        name: the registry key.
        period_ticks: ``(S, M) -> ticks between two tokens of one sequence``.
        ends: places the embedding and the LM head (on the end stages or outside).
    """

    name: str
    period_ticks: Callable[[int, int], int]
    ends: Callable[..., _Ends]


DecodeScheduleName = Literal["ring", "gpipe"]
DECODE_SCHEDULES: dict[str, DecodeSchedule] = {
    # Stage s works on group (t - s) mod P, P = max(M, S): a group's token crosses S stages,
    # then waits for its turn at stage 0 (every M ticks); the sampled token rides the ring
    # ppermute back to stage 0 in the tick that carries the activations.
    "ring": DecodeSchedule("ring", lambda stages, m: max(m, stages), _ends_on_stages),
    # All M microbatches fill and drain the pipeline once per token.
    "gpipe": DecodeSchedule("gpipe", lambda stages, m: m + stages - 1, _ends_outside),
}


@dataclasses.dataclass(frozen=True)
class _PassTimes:
    stage_s: tuple[float, ...]
    transfer_s: float
    outside_s: float

    @property
    def tick_s(self) -> float:
        return max(self.stage_s) + self.transfer_s


def _pass_times(cfg: DenseConfig, hw: HardwareSpec, stages: tuple[int, ...], tp: int,
                microbatches: int, ends: _Ends, block: LayerCost, tokens: int,
                capacity: int) -> _PassTimes:
    """Per-stage seconds of one microbatch (``block`` per layer, the ends on their stages),
    the stage-to-stage transfer and the outside work. A device reads all its weights from L2
    when everything it holds -- its blocks and its share of the ends -- fits ``capacity``,
    else from HBM; the outside work runs on every device, at the fullest device's speed."""
    s, d = cfg.dtype.itemsize, cfg.hidden_size
    activation = s * (cfg.batch_size // microbatches) * tokens * d
    sync = 2 * allreduce_time(activation, tp, hw)  # Megatron: after attention and after MLP
    works: list[tuple[_Work, ...]] = [()] * len(stages)
    works[0] += ends.first
    works[-1] += ends.last
    outside_held = sum(w.resident_bytes for w in ends.outside)
    held = [k * block.weight_bytes + sum(w.resident_bytes for w in ws) + outside_held
            for k, ws in zip(stages, works, strict=True)]

    def run(cost: LayerCost, fits: bool) -> float:
        return layer_time(cost, hw, weights_on_chip=fits, dtype=cfg.dtype.name).total_s

    stage_s = tuple(
        k * (run(block, h <= capacity) + sync)
        + sum(run(w.cost, h <= capacity) + w.comm_s for w in ws)
        for k, ws, h in zip(stages, works, held, strict=True)
    )
    outside_s = sum(run(w.cost, max(held) <= capacity) + w.comm_s for w in ends.outside)
    transfer = transfer_time(activation, hw) if len(stages) > 1 else 0.0
    return _PassTimes(stage_s, transfer, outside_s)


@dataclasses.dataclass(frozen=True)
class DecodeProjection:
    """Projected (not measured) pipelined decode: every sequence gains one token per period.

    Attributes:
        tpot_ms: milliseconds between two tokens of one sequence:
            ``period_ticks * tick_s + outside_s``.
        tps: tokens per second over the whole batch: ``batch_size / TPOT``.
        tick_s: the slowest stage's time on one microbatch plus one stage-to-stage transfer.
        stage_s: seconds per stage per microbatch, the embedding (first stage) and LM head
            (last stage) included where the schedule runs them on the stages.
        transfer_s: seconds per transfer of one microbatch's [mb, 1, D] activation.
        microbatches: M.
        cache_len: KV-cache positions attended.
        kv_bytes_per_device: the KV cache a device of the busiest stage holds (all M
            microbatches), for checking against HBM.
        schedule: the ``DECODE_SCHEDULES`` entry.
        period_ticks: ticks per token: ``max(M, S)`` (ring), ``M + S - 1`` (gpipe).
        bubble: idle fraction of a stage's ticks, ``1 - M / period_ticks``.
        outside_s: seconds per token outside the pipeline (gpipe: embedding and head over
            all devices; ring: 0).
        tokens_per_j: projected tokens per joule of the steady decode (prefill excluded;
            ``passes/cost_energy.py``: busy devices at board power, waiting ones idle), None
            where the hardware has no power figures.
        prefill_ms: milliseconds of the prompt's GPipe prefill, ``(M + S - 1)`` prefill
            ticks plus its outside work: the time to the first token.
        prompt_len: positions in the prompt.
        layers_per_stage: blocks per stage.
        tp: tensor-parallel devices per stage.
    """

    tpot_ms: float
    tps: float
    tick_s: float
    stage_s: tuple[float, ...]
    transfer_s: float
    microbatches: int
    cache_len: int
    kv_bytes_per_device: int
    schedule: str
    period_ticks: int
    bubble: float
    outside_s: float
    prefill_ms: float
    prompt_len: int
    layers_per_stage: tuple[int, ...]
    tp: int
    tokens_per_j: float | None = None

    def summary(self) -> str:
        """A short, labelled report."""
        energy = "" if self.tokens_per_j is None else f", {self.tokens_per_j:.3f} tokens/J"
        return (
            f"projected {self.schedule} decode: TPOT {self.tpot_ms:.3f} ms, {self.tps:,.0f} "
            f"tokens/s{energy} ({len(self.stage_s)} stages x tp={self.tp}, M={self.microbatches}, "
            f"{self.period_ticks} ticks of {self.tick_s * 1e3:.3f} ms, bubble "
            f"{self.bubble:.1%}, outside {self.outside_s * 1e3:.3f} ms); prefill of "
            f"{self.prompt_len} positions {self.prefill_ms:.1f} ms; KV "
            f"{self.kv_bytes_per_device / 2**30:.2f} GiB per device"
        )


def project_decode(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    tp: int,
    microbatches: int,
    *,
    cache_len: int | None = None,
    cache_bytes: int | None = None,
    schedule: DecodeScheduleName = "ring",
    prompt_len: int | None = None,
) -> DecodeProjection:
    """Projected pipelined decode: S stages of ``layers_per_stage`` blocks, each over ``tp``
    devices (Megatron: two all-reduces per block), M microbatches of ``B / M`` sequences.

    ``schedule`` picks a ``DECODE_SCHEDULES`` entry. With ``tick = max(stage_s) + transfer``:

    - ``"ring"`` (lwjax): at tick t stage s works on group ``(t - s) mod P``,
      ``P = max(M, S)``; ``TPOT = P * tick``. The embedding is part of stage 0's time, the
      final norm, LM head and greedy argmax part of the last stage's.
    - ``"gpipe"`` (the TP x PP baseline): all M microbatches cross the pp stages per token;
      ``TPOT = (M + S - 1) * tick + outside``, where ``outside`` is the embedding (every
      device, whole batch, vocab over ``tp``), the move of the last stage's outputs to the
      batch split over the stages, and the head on ``B / S`` sequences per device.

    Both: ``tokens/s = B / TPOT``, ``bubble = 1 - M / P``; prefill is a GPipe pass of the
    ``prompt_len`` positions (default ``cfg.seq_len``), ``(M + S - 1)`` prefill ticks plus
    its outside work, the head on the last position only. A device reads its weights from L2
    when all it holds (blocks, embedding or head share) fits ``cache_bytes`` (default
    ``hw.l2_bytes``), else from HBM; the KV cache, ``cache_len`` positions (default
    ``prompt_len``), always comes from HBM. Tokens and vocab-sharded argmax results are too
    small to matter beside the activations; launch overhead is left out.

    Example:
        >>> p = project_decode(configs.seed_dense(), hardware.H100_SXM, [1] * 16, 1, 16)
        >>> p.tpot_ms == 16 * p.tick_s * 1e3, p.bubble
        (True, 0.0)
        >>> g = project_decode(configs.seed_dense(), hardware.H100_SXM, [8, 8], 8, 8,
        ...                    schedule="gpipe")
        >>> g.period_ticks, round(g.bubble, 4)
        (9, 0.1111)
    """
    _require(
        schedule in DECODE_SCHEDULES,
        f"schedule={schedule!r} is not one of {sorted(DECODE_SCHEDULES)}.",
    )
    entry = DECODE_SCHEDULES[schedule]
    stages = tuple(layers_per_stage)
    _require(
        len(stages) > 0 and all(_is_count(k) for k in stages) and sum(stages) == cfg.num_layers,
        f"layers_per_stage {stages} must be positive integers summing to "
        f"num_layers={cfg.num_layers}.",
    )
    _require(
        _is_count(microbatches) and cfg.batch_size % microbatches == 0,
        f"microbatches={microbatches!r} must be a positive divisor of "
        f"batch_size={cfg.batch_size}.",
    )
    prompt = cfg.seq_len if prompt_len is None else prompt_len
    length = prompt if cache_len is None else cache_len
    _require(
        _is_count(prompt) and _is_count(length),
        f"prompt_len and cache_len must be positive integers, got {prompt!r}, {length!r}.",
    )
    mb = cfg.batch_size // microbatches
    capacity = hw.l2_bytes if cache_bytes is None else cache_bytes

    def ends(tokens: int) -> _Ends:
        return entry.ends(cfg, hw, num_stages=len(stages), tp=tp, microbatch=mb, tokens=tokens)

    step = _pass_times(cfg, hw, stages, tp, microbatches, ends(1),
                       decode_block_cost(cfg, batch_size=mb, cache_len=length, tp=tp), 1,
                       capacity)
    prefill = _pass_times(cfg, hw, stages, tp, microbatches, ends(prompt),
                          block_cost(cfg, batch_size=mb, seq_len=prompt, tp=tp), prompt,
                          capacity)
    period = entry.period_ticks(len(stages), microbatches)
    tpot = period * step.tick_s + step.outside_s
    prefill_s = (microbatches + len(stages) - 1) * prefill.tick_s + prefill.outside_s
    n, _ = _local_dims(cfg, tp)
    kv = max(stages) * 2 * cfg.batch_size * length * n * cfg.head_dim * cfg.dtype.itemsize
    energy = pipeline_energy(step.stage_s, tp, step_s=tpot, microbatches=microbatches,
                             tokens=cfg.batch_size, hw=hw, shared_busy_s=step.outside_s)
    return DecodeProjection(
        tpot * 1e3, cfg.batch_size / tpot, step.tick_s, step.stage_s, step.transfer_s,
        microbatches, length, kv, schedule, period, 1 - microbatches / period, step.outside_s,
        prefill_s * 1e3, prompt, stages, tp, None if energy is None else energy.tokens_per_j,
    )


def project_decode_best(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    tp: int,
    *,
    schedule: DecodeScheduleName = "ring",
    microbatch_counts: Sequence[int] | None = None,
    cache_len: int | None = None,
    cache_bytes: int | None = None,
    prompt_len: int | None = None,
) -> DecodeProjection:
    """``project_decode`` at the microbatch count with the shortest TPOT (ties: fewer).

    ``microbatch_counts`` defaults to every divisor of ``cfg.batch_size``; counts that do not
    divide it are skipped.

    Example:
        >>> project_decode_best(configs.tiny_dense(), hardware.H100_SXM, [1] * 4, 1
        ...                     ).microbatches   # M = S: no bubble, fewest weight reads
        4
    """
    counts = (range(1, cfg.batch_size + 1) if microbatch_counts is None
              else microbatch_counts)
    fitting = [m for m in counts if _is_count(m) and cfg.batch_size % m == 0]
    _require(bool(fitting), f"no microbatch count in {tuple(counts)} divides "
                            f"batch_size={cfg.batch_size}.")
    projections = [
        project_decode(cfg, hw, layers_per_stage, tp, m, cache_len=cache_len,
                       cache_bytes=cache_bytes, schedule=schedule, prompt_len=prompt_len)
        for m in sorted(set(fitting))
    ]
    return min(projections, key=lambda p: p.tpot_ms)  # min keeps the first (fewest M) of ties


@dataclasses.dataclass(frozen=True)
class DecodeComparison:
    """One deployment's projected decode at its best microbatch count: a plain record.

    Attributes:
        method: ``"layerwise"`` (ring decode, tp=1) or ``"tp_pp"`` (GPipe under Megatron TP).
        hardware: ``HardwareSpec.name``.
        schedule, tp, layers_per_stage, microbatches, period_ticks, bubble, cache_len,
            prompt_len, kv_bytes_per_device: as in ``DecodeProjection``.
        tick_ms, slowest_stage_ms, transfer_ms, outside_ms: one tick, its slowest stage and
            transfer, and the per-token work outside the pipeline, in milliseconds.
        tpot_ms, tps, prefill_ms: time per output token, tokens/s over the batch, and the
            prompt's prefill.
    """

    method: Literal["layerwise", "tp_pp"]
    hardware: str
    schedule: str
    tp: int
    layers_per_stage: tuple[int, ...]
    microbatches: int
    period_ticks: int
    tick_ms: float
    slowest_stage_ms: float
    transfer_ms: float
    outside_ms: float
    bubble: float
    tpot_ms: float
    tps: float
    prefill_ms: float
    cache_len: int
    prompt_len: int
    kv_bytes_per_device: int
    tokens_per_j: float | None = None

    @classmethod
    def of(cls, method: Literal["layerwise", "tp_pp"], hw: HardwareSpec,
           p: DecodeProjection) -> DecodeComparison:
        """The record of projection ``p``."""
        return cls(method, hw.name, p.schedule, p.tp, p.layers_per_stage, p.microbatches,
                   p.period_ticks, p.tick_s * 1e3, max(p.stage_s) * 1e3, p.transfer_s * 1e3,
                   p.outside_s * 1e3, p.bubble, p.tpot_ms, p.tps, p.prefill_ms, p.cache_len,
                   p.prompt_len, p.kv_bytes_per_device, p.tokens_per_j)

    def summary(self) -> str:
        """One line: the layout, then TPOT and tokens/s."""
        return (
            f"{self.method} ({self.schedule}, {len(self.layers_per_stage)} stages x "
            f"tp={self.tp}, M={self.microbatches}) on {self.hardware}: TPOT "
            f"{self.tpot_ms:.3f} ms = {self.period_ticks} x {self.tick_ms:.4f} ms + "
            f"{self.outside_ms:.4f} ms, {self.tps:,.0f} tokens/s"
            + ("" if self.tokens_per_j is None else f" ({self.tokens_per_j:.3f} tokens/J)")
            + f", bubble {self.bubble:.1%}, "
            f"prefill {self.prefill_ms:.1f} ms, KV {self.kv_bytes_per_device / 2**30:.2f} GiB "
            f"per device (projected)"
        )


def project_decode_comparison(
    cfg: DenseConfig,
    hw: HardwareSpec,
    *,
    tp: int = 8,
    pp: int = 2,
    layerwise_stages: Sequence[int] | None = None,
    microbatch_counts: Sequence[int] | None = None,
    cache_len: int | None = None,
    cache_bytes: int | None = None,
    prompt_len: int | None = None,
) -> tuple[DecodeComparison, DecodeComparison]:
    """Layer-wise ring decode vs the TP x PP GPipe baseline, each at its best M.

    Layer-wise: ``layerwise_stages`` (default one block per stage), tp=1, ``"ring"``.
    Baseline: ``pp`` near-equal stages of ``tp`` devices, ``"gpipe"``. M ranges over
    ``microbatch_counts`` (default: the divisors of ``cfg.batch_size``) for both.

    Returns:
        ``(layerwise, tp_pp)`` records, for an experiment script to print.

    Example:
        >>> lw, base = project_decode_comparison(configs.seed_dense(), hardware.H100_SXM)
        >>> lw.microbatches, base.schedule
        (16, 'gpipe')
    """
    stages = [1] * cfg.num_layers if layerwise_stages is None else layerwise_stages

    def best(layers: Sequence[int], devices: int, schedule: DecodeScheduleName):
        return project_decode_best(
            cfg, hw, layers, devices, schedule=schedule, microbatch_counts=microbatch_counts,
            cache_len=cache_len, cache_bytes=cache_bytes, prompt_len=prompt_len)

    return (DecodeComparison.of("layerwise", hw, best(stages, 1, "ring")),
            DecodeComparison.of("tp_pp", hw, best(_even_stages(cfg, pp), tp, "gpipe")))
