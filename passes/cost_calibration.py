"""What the plain roofline gets wrong, per hardware kind (part of ``passes/cost``).

The roofline (``cost_core.layer_time``) assumes peak matmul rates, no per-tick cost and
every device its own hardware. Measured on CPU hosts (``experiments/cost_check.py
--calibrate``, ``experiments/replicated_check.py``, ``experiments/waiting_threads.py``), five
corrections carry most of the error:

- small-matmul efficiency: a layer reaches a fraction of the peak that grows with its FLOPs;
- a per-tick floor: dispatching the stage's branch and rendezvousing the devices' threads
  costs about the same every tick whatever the work, more with more stages, and every
  all-reduce of a split stage adds its own rendezvous;
- shared cores: a CPU's simulated devices share the host's cores, so a step lasts at least
  the work of all devices (``TickModel.concurrency``);
- replicated work: every device of a split stage runs the equations that touch no split axis
  whole (``passes.tp.replicated_eqns``), at a rate per byte (``TickModel.replicated_s``);
  the roofline divides all of a layer by tp;
- waiting threads: in a tick where few devices work and the others wait at its collective,
  the working ones run slower (``TickModel.waiting_slowdown``): layouts with few active
  devices per tick (one microbatch on many stages, the fill and drain) cost more than their
  work. (Every device's carry also crosses the host's memory each tick:
  ``layout.step_seconds`` charges all devices' transfers on shared cores.)

``tick_model(hw)`` returns them for a HardwareSpec from the registry ``TICK_MODELS`` (by
``hw.kind``). The GPU entry corrects nothing: no GPU measurement has been made to calibrate
it (kernel launch and NCCL step latency are in ``link_latency`` only), so GPU plans are scored
by the roofline itself.

Example:
    >>> m = tick_model(hardware.host_cpu())
    >>> 0 < m.efficiency(1e8) < 1
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lwjax.hardware import HardwareSpec

# Measured 2026-12-02 on this project's 2-core Xeon host (16 simulated devices, load ~1,
# JAX 0.10.2), ``python experiments/cost_check.py --calibrate``, after a tick became one
# ppermute (``passes/carry.py``):
# - efficiency (re-measured 2026-12-02 afternoon, load 1.4-2, when ``host_cpu()`` took the best
#   of 30 1024^3 matmuls as the peak instead of the median of 5, which varied 2x between
#   processes): the float32 dense model (16 layers, 8 heads, MLP 4x, seq 64) alone on one
#   device, hidden 64/128/256 x batch 1/2/4/8/32, per-block time vs the block's matmul FLOPs
#   at the measured peak (191 GFLOP/s): 8% (19 MFLOP) .. 58% (4.4 GFLOP); least squares in
#   log-log: 0.161 x (FLOPs / 1e8)^0.339.
# - floor: lwjax pipelines of a same-shaped model of negligible size (hidden 16, seq 8,
#   batch 16, M = 8): 1/2/4/16 stages x tp 1 -> 0.42 ms + 0.015 ms per stage per tick
#   (0.65 ms + 0.033 ms with a ppermute per carry dtype); 2 x tp 8 and 4 x tp 4 -> 0.28 /
#   0.24 ms more per all-reduce (two per layer) per tick.
# - all-reduce bytes: a psum over tp 8 with all 16 devices reducing at once (every group of a
#   split pipeline's tick), 64 KiB .. 2 MiB per device: 0.17 ms + 0.157 ms per MiB of all
#   devices' buffers (tp 2: 0.141 ms per MiB; two reruns at load 2-4: 0.173, 0.190), least
#   squares -- the host's cores do the adding, so the time grows with the bytes of every
#   device taking part. The floors above were not re-measured with it: at load 2-4 they
#   came out 0.58-0.72 ms + 0.03-0.05 ms per stage, noise the load-1 figures are free of.
# - the same --calibrate on this project's 2-core AMD EPYC host (2026-12-04, load 0.8):
#   efficiency 0.281 x (FLOPs / 1e8)^0.279 (1.75x the Xeon's at 1e8 FLOPs: the search's
#   projected steps there run 1.3-4.3x the measured ones, results/layout_check.md), floor
#   0.360 ms + 0.028 ms per stage, 0.33 / 0.31 ms per all-reduce, 0.131 ms per MiB. Not
#   adopted: with them the search puts the MoE model at hidden 64 on 8 x tp 2, M=4, which
#   measured 7% slower than the 4 x tp 4, M=2 these constants pick (59.7 against 55.8 ms,
#   tune=4 in the throughput run of 2026-12-04 at 57835b4); the ranking, not the absolute
#   step, picks the plan.
CPU_EFFICIENCY_AT_1E8 = 0.161
CPU_EFFICIENCY_EXPONENT = 0.339
CPU_TICK_FLOOR_S = 0.42e-3
CPU_TICK_FLOOR_PER_STAGE_S = 0.015e-3
CPU_ALLREDUCE_FLOOR_S = 0.26e-3
CPU_ALLREDUCE_S_PER_BYTE = 1.5e-10
# - replicated work (2026-12-04, this project's 2-core AMD EPYC host,
#   ``python experiments/replicated_check.py``): every device of a split stage runs the
#   equations that touch no split axis (``passes.tp.replicated_eqns``: norms, residual adds,
#   the router's softmax, top-k and scatters) whole, so on shared cores tp copies of them run.
#   The dense and MoE models of ``experiments/throughput.py`` at hidden 64 in one stage split
#   over tp = 4 and 8 at M = 1 and 2: the 4 more copies at tp 8 ran 7.7-20.7 GB/s of those
#   equations' unfused bytes (``roofline``) over three runs, medians 13.5, 11.7 and 13.5 GB/s
#   (the last is results/replicated_check.md). 11.5 GB/s, set after the first two runs with an
#   earlier timing of the MoE model, is in force: it charges them slightly more.
CPU_REPLICATED_BYTES_PER_S = 11.5e9
# - waiting threads (2026-12-04, this project's 2-core AMD EPYC host, load 0.4,
#   ``python experiments/waiting_threads.py``, results/waiting_threads.md): 16 ticks of an
#   MLP block (hidden 256) on k of 16 devices, the others waiting at each tick's ppermute,
#   less the ppermutes alone (k = 0: 17.7 / 94.9 ms for the 512 / 2048-row carries, which the
#   floor and every device's transfer price, ``layout.step_seconds``), against one device
#   alone: the k devices' work took f x k times one device's, f = 1.10 / 1.07 / 0.97 / 0.98
#   for k = 1 / 2 / 4 / 8 at 512 rows and 1.54 / 0.94 / 0.92 / 0.93 at 2048. f - 1 against
#   the waiting devices per working one, w / k, least squares in log-log over the 3 points
#   above 1: 0.0031 x (w / k)^1.59 (1.23 / 1.07 / 1.02 for k = 1 / 2 / 4 of 16). A first fit
#   that left the ppermutes in the slowdown (0.034 x (w / k)^1.08) charged them twice.
CPU_WAITING_COEFF = 0.0031
CPU_WAITING_EXPONENT = 1.59


@dataclasses.dataclass(frozen=True)
class TickModel:
    """Corrections to the roofline for one hardware kind.

    Attributes:
        concurrency: cores the devices share (None: every device its own hardware).
        efficiency_at_1e8: fraction of the peak a layer of 1e8 FLOPs reaches (1: peak).
        efficiency_exponent: how the fraction grows with a layer's FLOPs (0: constant).
        tick_floor_s: seconds every tick costs beyond its work.
        tick_floor_per_stage_s: and per stage in the pipeline.
        allreduce_floor_s: and per all-reduce a split stage's layer runs in a tick.
        allreduce_s_per_byte: and per byte every device taking part in it holds (a host
            whose cores do the reduction; 0: its bytes are in the roofline's link time).
        replicated_bytes_per_s: the rate at which a device of a split stage runs the
            equations it runs whole (``passes.tp.replicated_eqns``), in bytes they read and
            write unfused per second (0: not modelled -- the roofline divides all of a layer
            by tp).
        waiting_coeff, waiting_exponent: how much slower the devices working in a tick
            run while w others wait at its collective: ``waiting_slowdown`` (0: not at all).
        source: where the figures come from.
    """

    concurrency: int | None = None
    efficiency_at_1e8: float = 1.0
    efficiency_exponent: float = 0.0
    tick_floor_s: float = 0.0
    tick_floor_per_stage_s: float = 0.0
    allreduce_floor_s: float = 0.0
    allreduce_s_per_byte: float = 0.0
    replicated_bytes_per_s: float = 0.0
    waiting_coeff: float = 0.0
    waiting_exponent: float = 1.0
    source: str = "roofline, uncorrected"

    def efficiency(self, flops: float) -> float:
        """Fraction of the peak matmul rate a layer of ``flops`` reaches, at most 1.

        Example:
            >>> TickModel().efficiency(1e6)
            1.0
        """
        if flops <= 0 or self.efficiency_exponent == 0:
            return min(1.0, self.efficiency_at_1e8)
        return min(1.0, self.efficiency_at_1e8 * (flops / 1e8) ** self.efficiency_exponent)

    def floor_s(self, num_stages: int) -> float:
        """Seconds a tick of a pipeline of ``num_stages`` costs beyond its work."""
        return self.tick_floor_s + self.tick_floor_per_stage_s * num_stages

    def allreduce_s(self, nbytes: int, tp: int) -> float:
        """Seconds one all-reduce of ``nbytes`` per device over ``tp`` devices costs beyond the
        roofline (0 for tp = 1).

        Example:
            >>> TickModel(allreduce_floor_s=1e-4, allreduce_s_per_byte=1e-10).allreduce_s(
            ...     2**20, 8)
            0.000938860...
        """
        if tp <= 1:
            return 0.0
        return self.allreduce_floor_s + self.allreduce_s_per_byte * nbytes * tp

    def replicated_s(self, nbytes: float) -> float:
        """Seconds a device of a split stage spends on the equations it runs whole, from
        their unfused bytes (0 where not modelled).

        Example:
            >>> TickModel(replicated_bytes_per_s=1e9).replicated_s(1e6)
            0.001
        """
        return nbytes / self.replicated_bytes_per_s if self.replicated_bytes_per_s else 0.0

    def waiting_slowdown(self, active: int, devices: int) -> float:
        """The factor on the work of ``active`` devices in a tick while the rest of the
        program's ``devices`` wait at its collective: ``1 + coeff x (waiting / active) ^
        exponent`` (1 with none waiting or where not modelled).

        Example:
            >>> TickModel(waiting_coeff=0.1, waiting_exponent=1.0).waiting_slowdown(1, 16)
            2.5
        """
        waiting = devices - active
        if not self.waiting_coeff or waiting <= 0 or active <= 0:
            return 1.0
        return 1.0 + self.waiting_coeff * (waiting / active) ** self.waiting_exponent


def _cpu(hw: HardwareSpec) -> TickModel:
    return TickModel(
        concurrency=hw.num_cores, efficiency_at_1e8=CPU_EFFICIENCY_AT_1E8,
        efficiency_exponent=CPU_EFFICIENCY_EXPONENT, tick_floor_s=CPU_TICK_FLOOR_S,
        tick_floor_per_stage_s=CPU_TICK_FLOOR_PER_STAGE_S,
        allreduce_floor_s=CPU_ALLREDUCE_FLOOR_S, allreduce_s_per_byte=CPU_ALLREDUCE_S_PER_BYTE,
        replicated_bytes_per_s=CPU_REPLICATED_BYTES_PER_S, waiting_coeff=CPU_WAITING_COEFF,
        waiting_exponent=CPU_WAITING_EXPONENT,
        source="measured on a 2-core CPU host (passes/cost_calibration.py)")


def _gpu(hw: HardwareSpec) -> TickModel:
    del hw
    return TickModel(source="roofline, uncorrected (no GPU measurement to calibrate it)")


TICK_MODELS: dict[str, Callable[[HardwareSpec], TickModel]] = {"cpu": _cpu, "gpu": _gpu}


def tick_model(hw: HardwareSpec) -> TickModel:
    """The corrections for ``hw`` (``TICK_MODELS[hw.kind]``).

    Example:
        >>> tick_model(hardware.H100_SXM).tick_floor_s
        0.0
    """
    return TICK_MODELS[hw.kind](hw)
