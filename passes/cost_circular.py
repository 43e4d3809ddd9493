"""Projected forward pass of the circular (interleaved) schedule (``passes/schedules.py``):
S devices, each running ``virtual`` stages of L / (S x virtual) blocks, microbatches going
round the ring in groups of S. *Projected*, never measured: the same block costs, transfers
and energy model as ``cost_blocks.project_pipeline``.

A tick is one virtual stage's blocks plus one transfer; the step is the schedule's tick count
(``virtual x M + S - 1`` when S divides M) of the slowest tick. Against GPipe over the same S
devices (M + S - 1 ticks of ``virtual`` times the blocks), the fill and drain shrink by
``virtual``, and every microbatch crosses ``virtual`` times as many device boundaries. A
device holds all of its stages' weights: they are read from L2 when that whole share fits.

Example:
    >>> p = project_circular(configs.seed_dense(), hardware.H100_SXM, devices=8, virtual=2,
    ...                      microbatches=8)
    >>> round(p.bubble, 3)    # (S - 1) / (vM + S - 1) = 7 / 23
    0.304
"""

from __future__ import annotations

import dataclasses

from lwjax.hardware import HardwareSpec
from lwjax.models.configs import DenseConfig
from lwjax.passes.cost_blocks import AttentionKernel, block_cost
from lwjax.passes.cost_core import Projection, _require, layer_time, transfer_time
from lwjax.passes.cost_energy import pipeline_energy
from lwjax.passes.schedules import SCHEDULES


def project_circular(
    cfg: DenseConfig,
    hw: HardwareSpec,
    *,
    devices: int,
    virtual: int,
    microbatches: int,
    cache_bytes: int | None = None,
    attention: AttentionKernel = "flash",
) -> Projection:
    """Projected throughput of the blocks under the circular schedule (module docstring).

    Raises:
        ValueError: the blocks do not split into ``devices x virtual`` equal stages, or
            ``microbatches`` does not divide the batch.

    Example:
        >>> project_circular(configs.seed_dense(), hardware.H100_SXM, devices=4, virtual=4,
        ...                  microbatches=8).stage_s[0] > 0
        True
    """
    stages = devices * virtual
    _require(devices >= 1 and virtual >= 1 and cfg.num_layers % stages == 0,
             f"{cfg.num_layers} blocks do not split into {devices} devices x {virtual} "
             "virtual stages of equal size.")
    _require(microbatches >= 1 and cfg.batch_size % microbatches == 0,
             f"microbatches={microbatches} does not divide batch_size={cfg.batch_size}.")
    capacity = hw.l2_bytes if cache_bytes is None else cache_bytes
    mb = cfg.batch_size // microbatches
    cost = block_cost(cfg, batch_size=mb, tp=1, attention=attention)
    per_stage = cfg.num_layers // stages
    fits = (cfg.num_layers // devices) * cost.weight_bytes <= capacity  # all its stages
    chunk_s = per_stage * layer_time(cost, hw, weights_on_chip=fits,
                                     dtype=cfg.dtype.name).total_s
    activation = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
    transfer_s = transfer_time(activation, hw) if stages > 1 else 0.0
    ticks = int(SCHEDULES["circular"].output_ticks(devices, microbatches, virtual)[-1]) + 1
    step_s = ticks * (chunk_s + transfer_s)
    busy = microbatches * virtual  # stage runs per device
    tokens = microbatches * mb * cfg.seq_len
    p = Projection(tps=tokens / step_s, tpot_ms=1e3 * step_s / tokens, step_s=step_s,
                   bubble=1 - busy / ticks, stage_s=tuple([chunk_s] * stages),
                   transfer_s=transfer_s, microbatches=microbatches, tokens_per_step=tokens)
    energy = pipeline_energy([virtual * chunk_s] * devices, 1, step_s=step_s,
                             microbatches=microbatches, tokens=tokens, hw=hw)
    return p if energy is None else dataclasses.replace(p, tokens_per_j=energy.tokens_per_j)
