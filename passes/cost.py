"""Pass: the roofline cost model -- per-layer time, link time, pipeline throughput.

A pure module: nothing here touches a device. Times are *projected*, never measured.

What the roofline includes:

- Compute: the FLOPs of matrix multiplications (``dot_general``, convolutions), at the
  device's peak for the compute dtype (``HardwareSpec.peak_flops``).
- Memory: the bytes each matmul reads and writes (operands and result), split into weight
  bytes and activation bytes. Bytes held on chip move at ``l2_bandwidth``, the rest at
  ``hbm_bandwidth``; every byte also passes through L2, so memory time is
  ``max(off_chip / hbm_bandwidth, all_bytes / l2_bandwidth)`` (a two-level roofline).
- Layer time is ``max(compute, memory)``: compute and memory traffic overlap perfectly.
- Links: ``latency + bytes / bandwidth`` per transfer; ring all-reduce for tensor
  parallelism; a GPipe schedule of ``M + S - 1`` ticks, each tick the slowest stage then the
  stage-to-stage transfer (not overlapped, as in lwjax's lowering).

What it leaves out: elementwise ops, norms, softmax, gathers and scatters (assumed fused
into the matmuls around them; jax's ``unfused_flops`` / ``unfused_hbm_bytes`` are kept on
``JaxprCost`` for reference), efficiency below peak (no MFU factor), kernel launch and
dispatch overhead, tile quantisation, cache conflicts and eviction (data that "fits" is
assumed to stay), overlap of communication with compute, and network topology beyond a ring.

Decode (the last section): one token per sequence against a KV cache read from HBM, under a
schedule from ``DECODE_SCHEDULES`` -- lwjax's ring (``TPOT = max(M, S)`` ticks, embedding
and LM head on the end stages) or the baseline's GPipe (``M + S - 1`` ticks plus embedding
and head over all devices) -- with the prompt's prefill as one GPipe pass.

FLOPs and bytes of traced functions come from ``passes/roofline.py`` (re-exported here).

Example:
    >>> from lwjax import hardware
    >>> t = layer_time(LayerCost(2e12, 10**9, 10**9), hardware.H100_SXM, weights_on_chip=False)
    >>> t.bound
    'compute'
"""


from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from lwjax.hardware import ComputeDtype, HardwareSpec
from lwjax.models.configs import DenseConfig, MoEConfig
from lwjax.passes.roofline import JaxprCost as JaxprCost
from lwjax.passes.roofline import LayerCost as LayerCost
from lwjax.passes.roofline import _is_count, _is_nonneg, _require
from lwjax.passes.roofline import cost_from_jaxpr as cost_from_jaxpr
from lwjax.passes.roofline import cost_of as cost_of

Bound = Literal["compute", "memory"]
AttentionKernel = Literal["flash", "materialized"]

# ---- one layer on one device ---------------------------------------------------------------

# Training (mode="train"): a rematerialising pipeline stage runs, per microbatch and layer, the
# forward (1x), the forward again in its backward tick (the recompute, 1x) and the backward
# (2x: each forward matmul x @ W has two of the same size in the backward, dx = dy @ W^T and
# dW = x^T @ dy): 1 + 1 + 2 = 4x the layer's forward roofline time. Elementwise work is taken
# to follow the same ratio. Split stages' all-reduces run in the forward, again in the
# recompute, and once on the cotangents in the backward: 3x.
TRAIN_TIME_FACTOR = 4
TRAIN_ALLREDUCE_FACTOR = 3


@dataclasses.dataclass(frozen=True)
class LayerTime:
    """Roofline time of a layer: ``total_s = max(compute_s, memory_s)``."""

    compute_s: float
    memory_s: float
    total_s: float
    bound: Bound


def layer_time(
    cost: LayerCost,
    hw: HardwareSpec,
    *,
    weights_on_chip: bool,
    activations_on_chip: bool = False,
    dtype: ComputeDtype | str | np.dtype = "bfloat16",
) -> LayerTime:
    """Roofline time of one layer on one device.

    Weights come from L2 (``hw.l2_bandwidth``) when ``weights_on_chip`` (the stage fits the
    cache), else from HBM; likewise activations with ``activations_on_chip``. Off-chip bytes
    also pass through L2, so memory time is ``max(off / hbm_bw, (on + off) / l2_bw)``.

    Args:
        cost: FLOPs and bytes of the layer.
        hw: the device.
        weights_on_chip: the layer's stage keeps its weights in L2.
        activations_on_chip: activations stay in L2 too (default: they go through HBM).
        dtype: compute dtype, selecting the peak FLOP/s.

    Returns:
        The compute, memory and total (max) seconds, and which bound dominates.

    Example:
        >>> cost = LayerCost(flops=1e11, weight_bytes=4 * 10**9, activation_bytes=10**9)
        >>> layer_time(cost, hardware.H100_SXM, weights_on_chip=False).bound
        'memory'
    """
    compute_s = cost.flops / hw.peak_flops(dtype)
    on_chip = cost.weight_bytes * weights_on_chip + cost.activation_bytes * activations_on_chip
    off_chip = cost.weight_bytes + cost.activation_bytes - on_chip
    memory_s = max(off_chip / hw.hbm_bandwidth, (on_chip + off_chip) / hw.l2_bandwidth)
    bound: Bound = "compute" if compute_s >= memory_s else "memory"
    return LayerTime(compute_s, memory_s, max(compute_s, memory_s), bound)


# ---- links and pipelines --------------------------------------------------------------------


def transfer_time(nbytes: float, hw: HardwareSpec) -> float:
    """Point-to-point send: ``link_latency + nbytes / link_bandwidth`` (0 for 0 bytes).

    Example:
        >>> transfer_time(450e9, hardware.H100_SXM)   # 1 s of NVLink, plus 5 us latency
        1.000005
    """
    _require(_is_nonneg(nbytes), f"nbytes must be finite and >= 0, got {nbytes!r}.")
    return 0.0 if nbytes == 0 else hw.link_latency + nbytes / hw.link_bandwidth


def allreduce_time(nbytes: float, n: int, hw: HardwareSpec) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` devices.

    ``2 (n-1)/n * nbytes / link_bandwidth + 2 (n-1) * link_latency`` (reduce-scatter then
    all-gather, ``n-1`` steps each); 0 for ``n == 1``.

    Example:
        >>> allreduce_time(8e9, 8, hardware.H100_SXM)   # 14e9 bytes / 450e9 + 14 * 5 us
        0.031181...
    """
    _require(_is_nonneg(nbytes), f"nbytes must be finite and >= 0, got {nbytes!r}.")
    _require(_is_count(n), f"n (devices) must be a positive integer, got {n!r}.")
    if n == 1 or nbytes == 0:
        return 0.0
    return 2 * (n - 1) / n * nbytes / hw.link_bandwidth + 2 * (n - 1) * hw.link_latency


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe idle fraction ``(S - 1) / (M + S - 1)``.

    Example:
        >>> bubble_fraction(2, 8)
        0.1111111111111111
    """
    _require(_is_count(stages), f"stages must be a positive integer, got {stages!r}.")
    _require(
        _is_count(microbatches), f"microbatches must be a positive integer, got {microbatches!r}."
    )
    return (stages - 1) / (microbatches + stages - 1)


@dataclasses.dataclass(frozen=True)
class Projection:
    """Projected (not measured) throughput of a pipelined forward pass.

    Attributes:
        tps: tokens per second.
        tpot_ms: milliseconds per token at that throughput (``1000 / tps``).
        step_s: seconds for all microbatches (fill + steady state + drain).
        bubble: idle fraction ``(S - 1) / (M + S - 1)``.
        stage_s: seconds per stage per microbatch.
        transfer_s: seconds per stage-to-stage transfer of one microbatch.
        microbatches: M.
        tokens_per_step: tokens processed in ``step_s``.
    """

    tps: float
    tpot_ms: float
    step_s: float
    bubble: float
    stage_s: tuple[float, ...]
    transfer_s: float
    microbatches: int
    tokens_per_step: int

    def summary(self) -> str:
        """A short, labelled report."""
        return (
            f"projected: {self.tps:,.0f} tokens/s, {self.tpot_ms:.6f} ms/token, "
            f"step {self.step_s * 1e3:.3f} ms ({len(self.stage_s)} stages x "
            f"{self.microbatches} microbatches, bubble {self.bubble:.1%}), slowest stage "
            f"{max(self.stage_s) * 1e3:.3f} ms, transfer {self.transfer_s * 1e3:.3f} ms"
        )


def pipeline_throughput(
    stage_times_s: Sequence[float],
    transfer_s: float,
    microbatches: int,
    tokens_per_microbatch: int,
) -> Projection:
    """GPipe over S stages and M microbatches: ``M + S - 1`` ticks, each the slowest stage
    plus one stage-to-stage transfer (none when S == 1).

    Example:
        >>> p = pipeline_throughput([1.0, 1.0], 0.0, microbatches=2, tokens_per_microbatch=10)
        >>> p.step_s, p.tps   # 3 ticks of 1 s for 20 tokens
        (3.0, 6.666666666666667)
    """
    times = tuple(float(t) for t in stage_times_s)
    _require(len(times) > 0, "stage_times_s is empty; give one time per pipeline stage.")
    _require(all(_is_nonneg(t) for t in times), f"stage times must be >= 0, got {times}.")
    _require(_is_nonneg(transfer_s), f"transfer_s must be finite and >= 0, got {transfer_s!r}.")
    _require(
        _is_count(tokens_per_microbatch),
        f"tokens_per_microbatch must be a positive integer, got {tokens_per_microbatch!r}.",
    )
    bubble = bubble_fraction(len(times), microbatches)
    tick = max(times) + (transfer_s if len(times) > 1 else 0.0)
    _require(tick > 0, "every stage time and the transfer time are 0; nothing to project.")
    step_s = (microbatches + len(times) - 1) * tick
    tokens = microbatches * tokens_per_microbatch
    tps = tokens / step_s
    return Projection(
        tps, 1e3 / tps, step_s, bubble, times, float(transfer_s), microbatches, tokens
    )


# ---- closed forms for lwjax's transformer blocks --------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockFlops:
    """Matmul FLOPs of one transformer block on one device (closed form).

    Attributes:
        attention_projections: q, k, v, out: ``4 * 2*B*T*D*(N/tp)*H``.
        attention_scores: ``QK^T`` and ``PV``: ``2 * 2*B*T*T*(N/tp)*H`` over the full T x T
            square (what the XLA attention computes; causal masking does not skip work), or
            ``2 * 2*B*(N/tp)*H * T(T+1)/2`` with ``causal_skip``.
        mlp: dense: ``3 * 2*B*T*D*(F/tp)``. MoE: router ``2*B*T*D*E`` (replicated) plus every
            expert on its capacity ``C`` slots per sequence: ``3 * 2*B*E*C*D*(F/tp)``.
    """

    attention_projections: int
    attention_scores: int
    mlp: int

    @property
    def total(self) -> int:
        return self.attention_projections + self.attention_scores + self.mlp


def _local_dims(cfg: DenseConfig, tp: int) -> tuple[int, int]:
    _require(_is_count(tp), f"tp must be a positive integer, got {tp!r}.")
    for name in ("num_heads", "mlp_hidden_size"):
        _require(
            getattr(cfg, name) % tp == 0,
            f"tp={tp} does not divide {name}={getattr(cfg, name)}; pick a divisor.",
        )
    return cfg.num_heads // tp, cfg.mlp_hidden_size // tp


def _batch_seq(cfg: DenseConfig, batch_size: int | None, seq_len: int | None) -> tuple[int, int]:
    b = cfg.batch_size if batch_size is None else batch_size
    t = cfg.seq_len if seq_len is None else seq_len
    _require(
        _is_count(b) and _is_count(t),
        f"batch_size and seq_len must be positive integers, got {b!r}, {t!r}.",
    )
    return b, t


def block_flops(
    cfg: DenseConfig,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    tp: int = 1,
    causal_skip: bool = False,
) -> BlockFlops:
    """Closed-form matmul FLOPs of one block (see ``BlockFlops``); defaults from ``cfg``.

    Example:
        >>> block_flops(configs.tiny_dense()).total   # B=4 T=16 D=64 N=4 H=16 F=128
        5505024
    """
    b, t = _batch_seq(cfg, batch_size, seq_len)
    n, f = _local_dims(cfg, tp)
    d, h = cfg.hidden_size, cfg.head_dim
    projections = 4 * 2 * b * t * d * n * h
    scores = 2 * 2 * b * n * h * (t * (t + 1) // 2 if causal_skip else t * t)
    if isinstance(cfg, MoEConfig):
        e, c = cfg.num_experts, cfg.capacity(t)
        mlp = 2 * b * t * d * e + 3 * 2 * b * e * c * d * f
    else:
        mlp = 3 * 2 * b * t * d * f
    return BlockFlops(projections, scores, mlp)


def block_cost(
    cfg: DenseConfig,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    tp: int = 1,
    attention: AttentionKernel = "flash",
    causal_skip: bool = False,
) -> LayerCost:
    """Closed-form LayerCost of one block on one of ``tp`` tensor-parallel devices.

    Weights: the device's share of q/k/v/out and MLP (router and norm scales replicated).
    Activations, counted per matmul as ``JaxprCost`` does (s = bytes per element, Nl = N/tp,
    Fl = F/tp): ``s * (7*B*T*D + 8*B*T*Nl*H + 3*B*T*Fl)`` for a dense block; a MoE MLP
    replaces ``3*B*T*D + 3*B*T*Fl`` by ``B*T*D + B*T*E + 3*B*E*C*D + 3*B*E*C*Fl``.
    ``attention="materialized"`` adds the T x T scores the XLA attention writes (float32)
    and reads back (in the model dtype): ``B*Nl*T*T*(4 + s)``; "flash" keeps them on chip.

    Example:
        >>> block_cost(configs.tiny_dense()).weight_bytes == 4 * configs.tiny_dense(
        ...     ).block_param_count()
        True
    """
    b, t = _batch_seq(cfg, batch_size, seq_len)
    n, f = _local_dims(cfg, tp)
    _require(
        attention in ("flash", "materialized"),
        f"attention must be 'flash' or 'materialized', got {attention!r}.",
    )
    d, h, s = cfg.hidden_size, cfg.head_dim, cfg.dtype.itemsize
    attention_weights = 4 * d * n * h
    attention_acts = 4 * b * t * d + 8 * b * t * n * h
    if isinstance(cfg, MoEConfig):
        e, c = cfg.num_experts, cfg.capacity(t)
        mlp_weights = d * e + e * 3 * d * f
        mlp_acts = b * t * d + b * t * e + 3 * b * e * c * d + 3 * b * e * c * f
    else:
        mlp_weights = 3 * d * f
        mlp_acts = 3 * b * t * d + 3 * b * t * f
    activation_bytes = s * (attention_acts + mlp_acts)
    if attention == "materialized":
        activation_bytes += b * n * t * t * (4 + s)
    flops = block_flops(cfg, batch_size=b, seq_len=t, tp=tp, causal_skip=causal_skip).total
    return LayerCost(float(flops), s * (attention_weights + mlp_weights + 2 * d), activation_bytes)


def _project(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    tp: int,
    microbatches: int,
    cache_bytes: int | None,
    attention: AttentionKernel,
) -> Projection:
    _require(
        _is_count(microbatches), f"microbatches must be a positive integer, got {microbatches!r}."
    )
    _require(
        cfg.batch_size % microbatches == 0,
        f"microbatches={microbatches} does not divide batch_size={cfg.batch_size}.",
    )
    _require(
        len(layers_per_stage) > 0 and all(_is_count(n) for n in layers_per_stage),
        f"layers_per_stage must be positive integers, got {tuple(layers_per_stage)}.",
    )
    _require(
        sum(layers_per_stage) == cfg.num_layers,
        f"layers_per_stage {tuple(layers_per_stage)} sums to {sum(layers_per_stage)}, "
        f"not num_layers={cfg.num_layers}.",
    )
    capacity = hw.l2_bytes if cache_bytes is None else cache_bytes
    mb = cfg.batch_size // microbatches
    cost = block_cost(cfg, batch_size=mb, tp=tp, attention=attention)
    activation = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
    sync = 2 * allreduce_time(activation, tp, hw)  # Megatron: after attention and after MLP
    stage_s = []
    for n in layers_per_stage:
        fits = n * cost.weight_bytes <= capacity
        block = layer_time(cost, hw, weights_on_chip=fits, dtype=cfg.dtype.name)
        stage_s.append(n * (block.total_s + sync))
    return pipeline_throughput(
        stage_s, transfer_time(activation, hw), microbatches, mb * cfg.seq_len
    )


def project_tp_pp(
    cfg: DenseConfig,
    hw: HardwareSpec,
    tp: int,
    pp: int,
    microbatches: int,
    *,
    cache_bytes: int | None = None,
    attention: AttentionKernel = "flash",
) -> Projection:
    """Projected forward-pass throughput of the transformer blocks under TP x PP.

    Megatron tensor parallelism over ``tp`` devices (heads and MLP width split; two ring
    all-reduces of the activations per block), GPipe over ``pp`` contiguous stages of
    near-equal layer counts. A stage's weights are read from L2 when the device's share fits
    ``cache_bytes`` (default ``hw.l2_bytes``), else from HBM; activations go through HBM.
    Each TP rank sends the full activation to its peer in the next stage. The embedding and
    LM head are left out (the seed documents state no vocabulary), as in
    ``project_layerwise``, so the two compare block for block.

    Example:
        >>> project_tp_pp(configs.seed_dense(), hardware.H100_SXM, 8, 2, 8).bubble
        0.1111111111111111
    """
    return _project(cfg, hw, _even_stages(cfg, pp), tp, microbatches, cache_bytes, attention)


def _even_stages(cfg: DenseConfig, pp: int) -> tuple[int, ...]:
    """``pp`` contiguous stages of near-equal layer counts, the longer ones first."""
    _require(
        _is_count(pp) and pp <= cfg.num_layers,
        f"pp must be a positive integer <= num_layers={cfg.num_layers}, got {pp!r}.",
    )
    base, extra = divmod(cfg.num_layers, pp)
    return tuple(base + (i < extra) for i in range(pp))


def project_layerwise(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    microbatches: int,
    *,
    cache_bytes: int | None = None,
    attention: AttentionKernel = "flash",
) -> Projection:
    """Projected forward-pass throughput of the blocks as a layer-wise pipeline.

    One device per stage (no tensor parallelism); stage ``i`` runs ``layers_per_stage[i]``
    consecutive blocks, reading weights from L2 when they fit ``cache_bytes`` (default
    ``hw.l2_bytes``), else from HBM. Same assumptions as ``project_tp_pp``.

    Example:
        >>> p = project_layerwise(configs.seed_dense(), hardware.H100_SXM, [1] * 16, 8)
        >>> len(p.stage_s)
        16
    """
    return _project(cfg, hw, tuple(layers_per_stage), 1, microbatches, cache_bytes, attention)



# ---- decode: one new token per sequence against a KV cache ----------------------------------


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

    def summary(self) -> str:
        """A short, labelled report."""
        return (
            f"projected {self.schedule} decode: TPOT {self.tpot_ms:.3f} ms, {self.tps:,.0f} "
            f"tokens/s ({len(self.stage_s)} stages x tp={self.tp}, M={self.microbatches}, "
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
    return DecodeProjection(
        tpot * 1e3, cfg.batch_size / tpot, step.tick_s, step.stage_s, step.transfer_s,
        microbatches, length, kv, schedule, period, 1 - microbatches / period, step.outside_s,
        prefill_s * 1e3, prompt, stages, tp,
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

    @classmethod
    def of(cls, method: Literal["layerwise", "tp_pp"], hw: HardwareSpec,
           p: DecodeProjection) -> DecodeComparison:
        """The record of projection ``p``."""
        return cls(method, hw.name, p.schedule, p.tp, p.layers_per_stage, p.microbatches,
                   p.period_ticks, p.tick_s * 1e3, max(p.stage_s) * 1e3, p.transfer_s * 1e3,
                   p.outside_s * 1e3, p.bubble, p.tpot_ms, p.tps, p.prefill_ms, p.cache_len,
                   p.prompt_len, p.kv_bytes_per_device)

    def summary(self) -> str:
        """One line: the layout, then TPOT and tokens/s."""
        return (
            f"{self.method} ({self.schedule}, {len(self.layers_per_stage)} stages x "
            f"tp={self.tp}, M={self.microbatches}) on {self.hardware}: TPOT "
            f"{self.tpot_ms:.3f} ms = {self.period_ticks} x {self.tick_ms:.4f} ms + "
            f"{self.outside_ms:.4f} ms, {self.tps:,.0f} tokens/s, bubble {self.bubble:.1%}, "
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
