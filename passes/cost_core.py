"""The roofline core of ``passes/cost``: one layer on one device, links, a GPipe pipeline.

A pure module: nothing here touches a device; times are *projected*. ``passes/cost.py`` is
the public door (it re-exports everything here) and says what the roofline includes.

Example:
    >>> t = layer_time(LayerCost(2e12, 10**9, 10**9), hardware.H100_SXM, weights_on_chip=False)
    >>> t.bound
    'compute'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lwjax.hardware import ComputeDtype, HardwareSpec
from lwjax.passes.roofline import LayerCost, _is_count, _is_nonneg, _require

Bound = Literal["compute", "memory"]

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
        tokens_per_j: projected tokens per joule (``passes/cost_energy.py``), None where
            the hardware has no power figures or the caller did not project energy.
    """

    tps: float
    tpot_ms: float
    step_s: float
    bubble: float
    stage_s: tuple[float, ...]
    transfer_s: float
    microbatches: int
    tokens_per_step: int
    tokens_per_j: float | None = None

    def summary(self) -> str:
        """A short, labelled report."""
        energy = "" if self.tokens_per_j is None else f" ({self.tokens_per_j:.3f} tokens/J)"
        return (
            f"projected: {self.tps:,.0f} tokens/s{energy}, {self.tpot_ms:.6f} ms/token, "
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

