"""Hardware descriptions for the cost model: datasheet presets and this machine, measured.

A ``HardwareSpec`` holds what the roofline in ``lwjax.passes.cost`` needs: on-chip cache
capacity and bandwidth, off-chip memory capacity and bandwidth, peak matmul throughput per
dtype, and the device-to-device link. Every preset figure cites its source beside it; figures
that are estimates say so.

Example:
    >>> from lwjax import hardware
    >>> hardware.H100_SXM.l2_bytes // 2**20
    50
    >>> hardware.by_name("h200").hbm_bandwidth
    4800000000000.0
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import time
from typing import Literal

import numpy as np

from lwjax.errors import ConfigError, LwjaxError, UnknownPresetError

ComputeDtype = Literal["bfloat16", "float16", "float32", "int8"]
HardwareKind = Literal["gpu", "cpu"]

_MiB = 2**20


def _check_number(spec: HardwareSpec, name: str, *, allow_zero: bool = False) -> None:
    value = getattr(spec, name)
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            f"HardwareSpec({spec.name!r}).{name} must be a finite number {bound}, got {value!r}."
        )


def _check_int(spec: HardwareSpec, name: str, *, optional: bool = False) -> None:
    value = getattr(spec, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        what = "None or a positive integer" if optional else "a positive integer"
        raise ConfigError(f"HardwareSpec({spec.name!r}).{name} must be {what}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """One device of a target machine, as the cost model sees it.

    Attributes:
        name: human-readable name ("H100 SXM5", "host CPU").
        kind: "gpu" or "cpu".
        l2_bytes: on-chip last-level cache capacity C the planner packs stages into
            (GPU L2; for a CPU, the per-core L2).
        persisting_l2_bytes: the part of L2 that can be reserved for persisting accesses
            (CUDA access-policy windows), or None where no such control exists.
        hbm_bytes: off-chip memory capacity (HBM on a GPU, RAM on a CPU).
        hbm_bandwidth: off-chip memory bandwidth, bytes/s.
        l2_bandwidth: on-chip cache bandwidth, bytes/s.
        peak_bf16_flops: dense matmul FLOP/s in bfloat16 (float16 is taken to be the same).
        peak_fp32_flops: matmul FLOP/s in float32.
        peak_int8_ops: dense int8 matmul op/s.
        link_bandwidth: device-to-device bandwidth, bytes/s per direction.
        link_latency: per-message latency of that link, seconds (may be 0).
        num_cores: streaming multiprocessors (GPU) or CPU cores, or None if unknown.
        l3_bytes: a CPU's L3 capacity (None for GPUs or where unknown).
        measured: True when the figures were measured on this machine (``host_cpu()``),
            False for datasheet presets.
        notes: where the figures come from and what they leave out.
        board_power_w: the device's maximum board power, watts (None: unknown); what the
            energy projection (``passes/cost_energy.py``) charges a device while it computes.
        idle_power_w: watts drawn while it waits (pipeline bubble, transfers), None: unknown.
    """

    name: str
    kind: HardwareKind
    l2_bytes: int
    persisting_l2_bytes: int | None
    hbm_bytes: int
    hbm_bandwidth: float
    l2_bandwidth: float
    peak_bf16_flops: float
    peak_fp32_flops: float
    peak_int8_ops: float
    link_bandwidth: float
    link_latency: float
    num_cores: int | None = None
    l3_bytes: int | None = None
    measured: bool = False
    notes: str = ""
    board_power_w: float | None = None
    idle_power_w: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"HardwareSpec.name must be a non-empty string, got {self.name!r}.")
        if self.kind not in ("gpu", "cpu"):
            raise ConfigError(
                f"HardwareSpec({self.name!r}).kind must be 'gpu' or 'cpu', got {self.kind!r}."
            )
        for name in ("l2_bytes", "hbm_bytes"):
            _check_int(self, name)
        for name in ("persisting_l2_bytes", "num_cores", "l3_bytes"):
            _check_int(self, name, optional=True)
        for name in (
            "hbm_bandwidth",
            "l2_bandwidth",
            "peak_bf16_flops",
            "peak_fp32_flops",
            "peak_int8_ops",
            "link_bandwidth",
        ):
            _check_number(self, name)
        _check_number(self, "link_latency", allow_zero=True)
        for name in ("board_power_w", "idle_power_w"):
            if getattr(self, name) is not None:
                _check_number(self, name)
        if (self.board_power_w is None) != (self.idle_power_w is None) or (
                self.board_power_w is not None and self.idle_power_w > self.board_power_w):
            raise ConfigError(
                f"HardwareSpec({self.name!r}): give board_power_w and idle_power_w together, "
                f"idle <= board; got {self.board_power_w!r} and {self.idle_power_w!r}.")
        if self.persisting_l2_bytes is not None and self.persisting_l2_bytes > self.l2_bytes:
            raise ConfigError(
                f"HardwareSpec({self.name!r}).persisting_l2_bytes ({self.persisting_l2_bytes}) "
                f"exceeds l2_bytes ({self.l2_bytes}); the persisting carve-out is part of L2."
            )

    def peak_flops(self, dtype: ComputeDtype | str | np.dtype) -> float:
        """Peak matmul throughput for a compute dtype, in FLOP/s (op/s for int8).

        Example:
            >>> H100_SXM.peak_flops("float16") == H100_SXM.peak_bf16_flops
            True
        """
        try:
            key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        except TypeError as e:
            raise ConfigError(f"{dtype!r} is not a dtype; use 'bfloat16', 'float32', ...") from e
        if key in ("bfloat16", "float16"):
            return self.peak_bf16_flops
        if key == "float32":
            return self.peak_fp32_flops
        if key == "int8":
            return self.peak_int8_ops
        raise ConfigError(
            f"No peak throughput for compute dtype {key!r} on {self.name}; "
            "use 'bfloat16', 'float16', 'float32' or 'int8'."
        )


# ---- presets -------------------------------------------------------------------------------
# NVIDIA H100 Tensor Core GPU datasheet (SXM5 column) and the Hopper architecture whitepaper /
# "NVIDIA Hopper Architecture In-Depth" blog. Datasheet tensor figures are quoted "with
# sparsity" (2:4); the dense figure is half of it.

H100_SXM = HardwareSpec(
    name="H100 SXM5",
    kind="gpu",
    # 50 MB L2 on H100 SXM5 / PCIe (whitepaper: "50 MB L2 cache"; the full GH100 die has 60 MB,
    # Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023). Taken as MiB,
    # the unit cudaDevAttrL2CacheSize reports in (52,428,800 bytes on H100).
    l2_bytes=50 * _MiB,
    # cudaDevAttrMaxPersistingL2CacheSize: at most 75% of L2 may be set aside for persisting
    # accesses (CUDA C++ Programming Guide, "L2 cache set-aside"): 37.5 MiB.
    persisting_l2_bytes=75 * _MiB // 2,
    hbm_bytes=80 * 10**9,  # datasheet: 80 GB HBM3
    hbm_bandwidth=3.35e12,  # datasheet: 3.35 TB/s
    # ASSUMPTION, not a datasheet figure: NVIDIA publishes no L2 bandwidth. Microbenchmarks
    # (Chips and Cheese 2023 on H100 PCIe; Luo et al., "Benchmarking and Dissecting the Nvidia
    # Hopper GPU Architecture", 2024) put H100 L2 read bandwidth in the ~5.5 TB/s class; SXM5
    # has more SMs and clocks, so this is conservative. Measure before relying on it.
    l2_bandwidth=5.5e12,
    peak_bf16_flops=989e12,  # datasheet: 1,979 TFLOPS BF16/FP16 with sparsity -> 989 dense
    peak_fp32_flops=67e12,  # datasheet: 67 TFLOPS FP32 (non-tensor; TF32 tensor: 494 dense)
    peak_int8_ops=1979e12,  # datasheet: 3,958 TOPS INT8 with sparsity -> 1,979 dense
    # NVLink 4: 900 GB/s total bidirectional per GPU (datasheet) -> 450 GB/s per direction.
    link_bandwidth=450e9,
    # ASSUMPTION: a few microseconds per NCCL point-to-point / collective step over NVLink is
    # the usual small-message figure (nccl-tests); 5 us is an estimate, not a measurement.
    link_latency=5e-6,
    num_cores=132,  # whitepaper: 132 SMs on H100 SXM5
    # datasheet (SXM5 column): "Max Thermal Design Power (TDP): Up to 700W (configurable)".
    board_power_w=700.0,
    # ASSUMPTION, not a datasheet figure: NVIDIA publishes no idle power. nvidia-smi on idle
    # H100 SXM5 boards commonly reads 60-90 W; 70 W is an estimate. Measure before relying on it.
    idle_power_w=70.0,
    notes="datasheet figures; l2_bandwidth, link_latency and idle_power_w are estimates (see "
    "source).",
)

H200 = dataclasses.replace(
    H100_SXM,
    name="H200 SXM",
    # TO CONFIRM ON HARDWARE: the GH100 die carries 60 MB of L2 and some H200 write-ups quote
    # it, but H200 keeps H100 SXM5's 132-SM configuration, so 50 MiB is just as plausible.
    # Query cudaDevAttrL2CacheSize on a real H200 and replace this figure.
    l2_bytes=60 * _MiB,
    # 75% of L2, by the same CUDA set-aside rule as H100 (follows l2_bytes; also to confirm).
    persisting_l2_bytes=60 * _MiB * 3 // 4,
    hbm_bytes=141 * 10**9,  # H200 datasheet: 141 GB HBM3e
    hbm_bandwidth=4.8e12,  # H200 datasheet: 4.8 TB/s
    # Compute (989 dense BF16 TFLOPS, 67 FP32, 1,979 dense INT8), NVLink 4 (900 GB/s
    # bidirectional) and max TDP (up to 700 W, configurable) are the same as H100 SXM5 on the
    # H200 datasheet; the 70 W idle figure is H100's estimate.
    notes="datasheet figures; l2_bytes to confirm on hardware; l2_bandwidth and link_latency "
    "are H100 estimates.",
)


# ---- this machine --------------------------------------------------------------------------

_SYSFS_CACHE = "/sys/devices/system/cpu/cpu0/cache"
_BANDWIDTH_BUFFER_BYTES = 256 * _MiB  # working set of the memory-bandwidth copy
_MATMUL_SIZE = 1024  # square f32 matmul for the FLOP/s figure
_REPEATS = 5
_MATMUL_REPEATS = 30  # ~10 ms each on a 2-core host


def _parse_size(text: str) -> int:
    """'2048K' / '1M' / '491520K' / '2097152' -> bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _caches_from_sysfs() -> dict[int, int]:
    sizes: dict[int, int] = {}
    if not os.path.isdir(_SYSFS_CACHE):
        return sizes
    for entry in sorted(os.listdir(_SYSFS_CACHE)):
        path = os.path.join(_SYSFS_CACHE, entry)
        try:
            with open(os.path.join(path, "level")) as f:
                level = int(f.read())
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(path, "size")) as f:
                size = _parse_size(f.read())
        except (OSError, ValueError):
            continue
        if kind in ("Unified", "Data") and size > 0:
            sizes[level] = max(size, sizes.get(level, 0))
    return sizes


def _caches_from_sysconf() -> dict[int, int]:
    sizes = {}
    for level, key in ((2, "SC_LEVEL2_CACHE_SIZE"), (3, "SC_LEVEL3_CACHE_SIZE")):
        if key in os.sysconf_names:
            value = os.sysconf(key)
            if value > 0:
                sizes[level] = value
    return sizes


def _caches_from_lscpu() -> dict[int, int]:
    try:
        out = subprocess.run(
            ["lscpu", "-J", "-B", "-C"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        caches = json.loads(out)["caches"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return {}
    sizes = {}
    for cache in caches:
        if cache.get("type") in ("Unified", "Data") and cache.get("one-size"):
            sizes[int(cache["level"])] = _parse_size(str(cache["one-size"]))
    return sizes


def _cache_sizes() -> tuple[dict[int, int], str]:
    for source, reader in (
        ("sysfs", _caches_from_sysfs),
        ("sysconf", _caches_from_sysconf),
        ("lscpu", _caches_from_lscpu),
    ):
        sizes = reader()
        if 2 in sizes:
            return sizes, source
    raise LwjaxError(
        f"Could not read this machine's L2 cache size (tried {_SYSFS_CACHE}/index*/size, "
        "os.sysconf('SC_LEVEL2_CACHE_SIZE') and `lscpu -J -B -C`). lwjax will not guess it: "
        "build a HardwareSpec by hand with l2_bytes set."
    )


def _best_seconds(fn, arg, repeats: int = _REPEATS) -> float:
    """The fastest of ``repeats`` timed calls: a peak rate is what the host reaches when
    nothing else takes its cores, and on a shared host the median of a few runs varied 2x
    between processes (1024^3 matmul: 80-178 GFLOP/s over six processes; the best of 30:
    160-198)."""
    fn(arg).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(arg).block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure(l2_bytes: int) -> tuple[float, float, float]:
    """(memory bytes/s, cache bytes/s, f32 matmul FLOP/s) on the first CPU device, < ~1 s."""
    import jax
    import jax.numpy as jnp

    device = jax.local_devices(backend="cpu")[0]  # this process's own, in multi-process runs
    # Memory: x + 1 over a buffer far larger than L2 reads and writes every byte once.
    n = _BANDWIDTH_BUFFER_BYTES // 4
    x = jax.device_put(jnp.ones((n,), jnp.float32), device)
    memory_bw = 2 * n * 4 / _best_seconds(jax.jit(lambda a: a + 1.0), x)
    del x
    # Cache: repeated in-place updates of a working set of half the L2 inside one jit, so the
    # data stays in cache and dispatch cost is amortised over the loop.
    m, reps = max(l2_bytes // 8, 4096), 100
    y = jax.device_put(jnp.ones((m,), jnp.float32), device)
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda _, b: b * 1.0001 + 1e-7, a))
    cache_bw = 2 * m * 4 * reps / _best_seconds(loop, y)
    # Compute: a square f32 matmul.
    k = _MATMUL_SIZE
    a = jax.device_put(jnp.ones((k, k), jnp.float32), device)
    flops = 2 * k**3 / _best_seconds(jax.jit(lambda b: b @ b), a, _MATMUL_REPEATS)
    return memory_bw, cache_bw, flops


@functools.cache
def host_cpu() -> HardwareSpec:
    """This machine's CPU as a HardwareSpec: caches read from the OS, speeds measured.

    L2 / L3 sizes come from ``/sys/devices/system/cpu/cpu0/cache`` (else ``os.sysconf``, else
    ``lscpu``); if none is readable this raises instead of guessing. Memory bandwidth
    (``x + 1`` over a 256 MiB buffer), cache bandwidth (a loop over half the L2) and f32
    matmul FLOP/s (1024^3) are the best of 5 (matmul: 30) runs of short jax benchmarks on the
    first CPU device, about a second in all, once per process (in a multi-process run process 0
    measures and the others take its figures, ``lwjax.distributed.shared``). The bf16 and
    int8 peaks are set to the measured f32 figure (not measured separately). Simulated CPU
    devices share RAM, so the link bandwidth is the memory bandwidth and the link latency is
    taken as 0 (not measured).

    Example:
        >>> spec = host_cpu()
        >>> spec.measured, spec.l2_bytes > 0
        (True, True)
    """
    sizes, source = _cache_sizes()
    l2_bytes, l3_bytes = sizes[2], sizes.get(3)
    from lwjax import distributed

    # every process of a multi-process run plans with process 0's figures, so plans agree
    memory_bw, cache_bw, flops = json.loads(
        distributed.shared("host_cpu", lambda: json.dumps(_measure(l2_bytes))))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    caveat = ""
    if l3_bytes is not None and l3_bytes >= _BANDWIDTH_BUFFER_BYTES // 2:
        caveat = (
            f" The L3 ({l3_bytes // _MiB} MiB) is not much smaller than the 256 MiB bandwidth "
            "buffer, so hbm_bandwidth may include L3 hits."
        )
    return HardwareSpec(
        name="host CPU",
        kind="cpu",
        l2_bytes=l2_bytes,
        persisting_l2_bytes=None,
        hbm_bytes=ram,
        hbm_bandwidth=memory_bw,
        l2_bandwidth=cache_bw,
        peak_bf16_flops=flops,
        peak_fp32_flops=flops,
        peak_int8_ops=flops,
        link_bandwidth=memory_bw,
        link_latency=0.0,
        num_cores=os.cpu_count(),
        l3_bytes=l3_bytes,
        measured=True,
        notes=(
            f"cache sizes from {source}; bandwidths and f32 FLOP/s measured with jax on this "
            "machine; bf16/int8 peaks = f32 figure; link = memory bandwidth (simulated devices "
            f"share RAM), latency 0 (not measured).{caveat}"
        ),
    )


_PRESETS = {"h100": H100_SXM, "h100-sxm": H100_SXM, "h100-sxm5": H100_SXM, "h200": H200}
_HOST_NAMES = ("cpu", "host")


def by_name(name: str) -> HardwareSpec:
    """Looks a hardware preset up by name: "h100", "h100-sxm", "h200", "cpu" / "host".

    Example:
        >>> by_name("H100_SXM") is H100_SXM
        True
    """
    key = str(name).strip().lower().replace("_", "-")
    if key in _PRESETS:
        return _PRESETS[key]
    if key in _HOST_NAMES:
        return host_cpu()
    known = ", ".join([*_PRESETS, *_HOST_NAMES])
    raise UnknownPresetError(f"Unknown hardware preset {name!r}; known: {known}.")
