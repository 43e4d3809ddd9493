"""Closed forms for lwjax's transformer blocks (part of ``passes/cost``): FLOPs and bytes of a
block, and the projected forward pass of a TP x PP or layer-wise pipeline of them.

Example:
    >>> project_tp_pp(configs.seed_dense(), hardware.H100_SXM, 8, 2, 8).bubble
    0.1111111111111111
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from lwjax.hardware import HardwareSpec
from lwjax.models.configs import DenseConfig, MoEConfig
from lwjax.passes.cost_core import (
    Projection,
    allreduce_time,
    layer_time,
    pipeline_throughput,
    transfer_time,
)
from lwjax.passes.cost_energy import pipeline_energy
from lwjax.passes.roofline import LayerCost, _is_count, _require

AttentionKernel = Literal["flash", "materialized"]

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
    p = pipeline_throughput(stage_s, transfer_time(activation, hw), microbatches, mb * cfg.seq_len)
    energy = pipeline_energy(stage_s, tp, step_s=p.step_s, microbatches=microbatches,
                             tokens=p.tokens_per_step, hw=hw)
    return p if energy is None else dataclasses.replace(p, tokens_per_j=energy.tokens_per_j)


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


def project_pipeline(
    cfg: DenseConfig,
    hw: HardwareSpec,
    layers_per_stage: Sequence[int],
    tp: int,
    microbatches: int,
    *,
    cache_bytes: int | None = None,
    attention: AttentionKernel = "flash",
) -> Projection:
    """Projected forward pass of any S x tp layout: stage ``i`` runs ``layers_per_stage[i]``
    blocks split over ``tp`` devices (``project_tp_pp`` is the even split, ``project_layerwise``
    tp = 1). Same assumptions as ``project_tp_pp``.

    Example:
        >>> project_pipeline(configs.seed_dense(), hardware.H100_SXM, [8, 8], 8, 8).step_s \
        ...     == project_tp_pp(configs.seed_dense(), hardware.H100_SXM, 8, 2, 8).step_s
        True
    """
    return _project(cfg, hw, tuple(layers_per_stage), tp, microbatches, cache_bytes, attention)


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


