"""Projected (cost model, not measured) training-step time of a pipeline: layer-wise stages
or TP x PP, under a training schedule's tick table.

Every pipeline here runs in lockstep, one tick at a time, as the SPMD programs do (lwjax's
``passes/train.py``; the TP x PP baseline's GPipe scan, differentiated): a tick lasts as
long as its slowest stage's work plus one stage-to-stage transfer each way. Per stage and
microbatch, with f its forward time (``cost.block_cost`` / ``layer_time`` per block, the
Megatron all-reduces included when tp > 1):

- a forward (F) costs f (the last stage's F only stashes: 0);
- a backward (B) costs 3f: the recompute (f) and the backward's two matmuls per forward
  matmul (2f) -- ``cost.TRAIN_TIME_FACTOR`` - 1; on the last stage, whose F did nothing,
  4f - f = 3f as well, since its B runs the forward once.

So GPipe (every F, then every B) takes (M + S - 1)(f + t) + (M + S - 1)(3f + t), and 1F1B,
whose steady ticks mix F on some stages with B on others, takes about 2(M + S - 1) ticks of
the slower B: in lockstep 1F1B saves stash memory, not time. The optimizer's update reads
each device's weights, gradients and state once and writes weights and state
(elementwise, HBM-bound); the embedding and head are left out, as in ``project_tp_pp``.

Example:
    >>> p = project_train(configs.seed_dense(), hardware.H100_SXM, [1] * 16, tp=1,
    ...                   microbatches=16, schedule="gpipe")
    >>> p.ticks
    62
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lwjax.hardware import HardwareSpec
from lwjax.models.configs import DenseConfig
from lwjax.passes import cost, schedules
from lwjax.passes.schedules import BACKWARD, FORWARD

# Adam(W): read weights, gradients and two moments; write weights and two moments.
OPTIMIZER_BYTES_PER_WEIGHT_BYTE = 7


@dataclasses.dataclass(frozen=True)
class TrainProjection:
    """Projected (not measured) time of one training step.

    Attributes:
        step_s: the pipeline's ticks plus the optimizer update.
        ticks: ticks of the schedule's table.
        forward_s: f, one microbatch's forward on the slowest stage.
        transfer_s: one stage-to-stage transfer of a microbatch's activations (each way).
        optimizer_s: the elementwise update on one device.
        tps: tokens per second (batch x sequence / step).
        label: e.g. "layer-wise 16 stages, 1F1B, M=16".
    """

    step_s: float
    ticks: int
    forward_s: float
    transfer_s: float
    optimizer_s: float
    tps: float
    label: str


def project_train(cfg: DenseConfig, hw: HardwareSpec, layers_per_stage: Sequence[int], *,
                  tp: int, microbatches: int, schedule: str,
                  cache_bytes: int | None = None) -> TrainProjection:
    """Projected training step of the blocks over stages of ``layers_per_stage`` blocks,
    each on ``tp`` devices (Megatron within a stage), under ``schedule``'s tick table.

    Example:
        >>> project_train(configs.seed_dense(), hardware.H100_SXM, [8, 8], tp=8,
        ...               microbatches=8, schedule="gpipe").label
        'TP=8 x PP=2, GPipe, M=8'
    """
    if cfg.batch_size % microbatches:
        raise ValueError(f"microbatches={microbatches} does not divide batch {cfg.batch_size}.")
    mb = cfg.batch_size // microbatches
    block = cost.block_cost(cfg, batch_size=mb, tp=tp, attention="flash")
    capacity = hw.l2_bytes if cache_bytes is None else cache_bytes
    activation = mb * cfg.seq_len * cfg.hidden_size * cfg.dtype.itemsize
    sync = 2 * cost.allreduce_time(activation, tp, hw)
    forward = []
    for n in layers_per_stage:
        fits = n * block.weight_bytes <= capacity
        t = cost.layer_time(block, hw, weights_on_chip=fits, dtype=cfg.dtype.name).total_s
        forward.append(n * (t + sync))
    table = schedules.get_train(schedule).table(len(forward), microbatches)
    per_op = np.zeros((3, len(forward)))
    per_op[FORWARD] = forward
    per_op[FORWARD, -1] = 0.0  # the last stage's forward only stashes its input
    per_op[BACKWARD] = [(cost.TRAIN_TIME_FACTOR - 1) * f for f in forward]
    transfer = cost.transfer_time(activation, hw) if len(forward) > 1 else 0.0
    ticks_s = float(np.sum(np.max(per_op[table.op, np.arange(len(forward))], axis=1)))
    ticks_s += table.num_ticks * transfer
    weight_bytes = max(layers_per_stage) * block.weight_bytes
    optimizer_s = OPTIMIZER_BYTES_PER_WEIGHT_BYTE * weight_bytes / hw.hbm_bandwidth
    step_s = ticks_s + optimizer_s
    name = (f"TP={tp} x PP={len(forward)}" if tp > 1
            else f"layer-wise {len(forward)} stages")
    label = f"{name}, {'GPipe' if schedule == 'gpipe' else '1F1B'}, M={microbatches}"
    return TrainProjection(step_s=step_s, ticks=table.num_ticks, forward_s=max(forward),
                           transfer_s=transfer, optimizer_s=optimizer_s,
                           tps=cfg.batch_size * cfg.seq_len / step_s, label=label)


def project_train_best(cfg: DenseConfig, hw: HardwareSpec, layers_per_stage: Sequence[int], *,
                       tp: int, schedule: str) -> TrainProjection:
    """``project_train`` at the M (a divisor of the batch) with the shortest step.

    Example:
        >>> project_train_best(configs.seed_dense(), hardware.H100_SXM, [1] * 16, tp=1,
        ...                    schedule="1f1b").label
        'layer-wise 16 stages, 1F1B, M=128'
    """
    options = [project_train(cfg, hw, layers_per_stage, tp=tp, microbatches=m,
                             schedule=schedule)
               for m in range(1, cfg.batch_size + 1) if cfg.batch_size % m == 0]
    return min(options, key=lambda p: p.step_s)
