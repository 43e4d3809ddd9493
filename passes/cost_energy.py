"""Projected energy (part of ``passes/cost``): tokens per joule of a pipelined pass.

A projection, never a measurement: the roofline's busy time per device and the hardware's
power figures (``HardwareSpec.board_power_w`` / ``idle_power_w``). The assumption, stated
once: a device draws its maximum board power while it computes a microbatch (compute- and
memory-bound time alike: an upper bound, real kernels draw less when memory-bound) and its
idle power for the rest of the step -- the pipeline bubble, stage-to-stage transfers and
waiting for the slowest stage. Host CPUs, the network and cooling are left out.

So ``joules = sum over devices of busy_s * P_board + (step_s - busy_s) * P_idle`` and
``tokens/J = tokens / joules``; with every device busy the whole step this is
``tps / (devices * P_board)``, the seed documents' formula (seed 000: 12,800 tokens/s /
11.2 kW = 1.14 tokens/J).

Example:
    >>> e = pipeline_energy([1.0, 1.0], 1, step_s=3.0, microbatches=2, tokens=20,
    ...                     hw=hardware.H100_SXM)
    >>> round(e.joules)   # each device: 2 s at 700 W + 1 s at 70 W
    2940
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lwjax.hardware import HardwareSpec
from lwjax.passes.roofline import _is_count, _is_nonneg, _require


@dataclasses.dataclass(frozen=True)
class Energy:
    """Projected energy of one step.

    Attributes:
        joules: energy of all devices over the step.
        tokens: tokens the step produces.
        busy_share: device-seconds computing / device-seconds of the step.
        devices: devices counted.
    """

    joules: float
    tokens: int
    busy_share: float
    devices: int

    @property
    def tokens_per_j(self) -> float:
        return self.tokens / self.joules


def pipeline_energy(stage_busy_s: Sequence[float], devices_per_stage: int, *, step_s: float,
                    microbatches: int, tokens: int, hw: HardwareSpec,
                    shared_busy_s: float = 0.0) -> Energy | None:
    """Energy of one step of a pipeline whose stage ``i`` computes ``stage_busy_s[i]`` per
    microbatch on each of its ``devices_per_stage`` devices, ``microbatches`` times, plus
    ``shared_busy_s`` on every device (work outside the pipeline); None when ``hw`` has no
    power figures.

    Example:
        >>> pipeline_energy([1.0], 1, step_s=1.0, microbatches=1, tokens=700,
        ...                 hw=hardware.H100_SXM).tokens_per_j
        1.0
    """
    if hw.board_power_w is None or hw.idle_power_w is None:
        return None
    _require(_is_count(devices_per_stage) and _is_count(microbatches) and _is_count(tokens),
             f"devices_per_stage, microbatches and tokens must be positive integers, got "
             f"{devices_per_stage!r}, {microbatches!r}, {tokens!r}.")
    _require(_is_nonneg(step_s) and step_s > 0, f"step_s must be > 0, got {step_s!r}.")
    busy = [min(step_s, microbatches * t + shared_busy_s) for t in stage_busy_s]
    joules = devices_per_stage * sum(
        b * hw.board_power_w + (step_s - b) * hw.idle_power_w for b in busy)
    devices = devices_per_stage * len(busy)
    return Energy(joules, tokens, sum(busy) * devices_per_stage / (devices * step_s), devices)


def flat_tokens_per_j(tps: float, devices: int, watts: float) -> float:
    """The seed documents' formula: tokens/s over the whole machine's power, every device
    drawing ``watts`` all the time.

    Example:
        >>> round(flat_tokens_per_j(12_800, 16, 700), 2)   # seed 000's baseline
        1.14
    """
    return tps / (devices * watts)
