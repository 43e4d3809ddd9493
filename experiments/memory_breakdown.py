"""Per-layer memory of the seed configurations, before and after compression (a script).

Every figure is computed by ``lwjax.analyze`` (trace -> segment -> footprint) on abstract models:
no weights are allocated and nothing runs on a GPU, so the figures are lwjax's static estimates
of the traced program, not measurements. The seed documents' per-layer claims are set beside
lwjax's figures as *claims*; none of their numbers is copied into a result.

Run from the repository root (wall times on a 2-core host: README, "Experiment scripts")::

    python experiments/memory_breakdown.py [--write-results]

It prints the tables and writes them to ``experiments/out/memory_breakdown.md``, which git
ignores; ``--write-results`` regenerates the committed ``experiments/results/memory_breakdown.md``
instead (its machine line and date change with every run).
The table builders are pure functions returning strings or rows (imported by
``tests/test_experiments_memory.py``); analyses are cached, so each runs once per process.
"""

from __future__ import annotations

import pathlib as _pathlib
import sys as _sys

_sys.path.insert(0, str(_pathlib.Path(__file__).parent))
import argparse
import dataclasses
import datetime
import functools
import os
import platform
import time
from collections.abc import Sequence

import _common  # noqa: E402
import flax
import jax
import jax.numpy as jnp

import lwjax
from lwjax import hardware, models
from lwjax.models import configs
from lwjax.passes import compression as compression_lib
from lwjax.passes.footprint import Footprint, output_channels
from lwjax.passes.segment import LayerGraph, segment
from lwjax.passes.trace import trace
from lwjax.report import ModelReport

MIB = 2**20
MB = 10**6  # the seeds' "MB" is decimal: their 4096 x 12288 x 2 B = 100.7 MB is 100.66e6 bytes
GB = 10**9
CONFIG_NAMES = ("seed_dense", "seed_moe", "seed004_dense", "seed004_moe", "seed002_dense")
COMPRESSIONS = {  # preset -> label
    "none": "none (FP16)",
    "int8": "INT8",
    "int8-2:4": "INT8 + 2:4 on MLP",
    "int4-75%": "INT4 + 75% (1:4) on MLP",
}
MICROBATCHES = (16, 1)  # seed 000: global batch 128 in 8 microbatches of 16; and one sequence
MODES = ("prefill", "decode")
ATTENTION = "fused"  # flash attention on H100 (cuDNN cannot be traced on CPU)
CLAIM_BATCH = 128  # the batch in the seeds' own arithmetic
CLAIM_CONFIG = "seed_dense"
L2 = hardware.H100_SXM
TOLERANCE = 0.01  # a claim agrees within 1%, or within half a unit of its last written digit
RESULTS_NAME = "memory_breakdown.md"  # in _common.output_dir(write_results)

ASSUMPTIONS = f"""\
- **Computed, not measured.** `lwjax.analyze` on `models.abstract(cfg)` (no weights allocated):
  weights = stored bytes of the parameters each segment reads; activations = peak live bytes by
  last-use liveness, layer input and output included, with elementwise chains fused as XLA
  fuses them; buffers = how far workspace raises that peak; KV cache = the cache the layer
  reads (decode). Per device, per microbatch, one whole layer on one device (no TP split).
- **Microbatch.** Seed 000 runs a global batch of 128 as 8 microbatches of 16. Tables show
  microbatch 16 and a single sequence (microbatch 1). The claims table uses batch
  {CLAIM_BATCH}, the batch in the documents' own arithmetic, and quotes microbatch 16 beside it.
- **Sequence and dtype.** seq_len 10,000; FP16 weights, activations and KV cache (the
  configs' dtype). Vocabulary 32,000 (an lwjax choice, the seeds give none): it changes only
  the prologue (embedding) and epilogue (final norm + LM head), never a layer.
- **Attention.** `attention="{ATTENTION}"`: a fused flash-attention kernel, as cuDNN would run
  on an H100, which cannot be traced on a CPU. The values between the score dot and the
  probabilities-times-values dot are not materialised; the kernel's f32 log-sum-exp rows are
  charged as workspace. One table shows `attention="as_traced"` (scores materialised, as XLA
  runs the traced program without a fused kernel) for seed_dense so the difference is visible.
- **Decode.** One new token per sequence (`mode="decode"`, tokens [microbatch, 1]) against a
  KV cache of `cache_len` = seq_len = 10,000 positions; each layer carries its own K and V
  caches, [microbatch, 10,000, heads, head_dim] FP16 each.
- **Compression** (`lwjax.passes.compression` presets): INT8 / INT4 = 1 / 0.5 byte per matmul
  weight plus one FP16 scale per output channel; "2:4" = half the MLP weights kept plus 2 index
  bits per kept value; "75%" = 1:4, a quarter of the MLP weights kept plus 2 index bits each;
  sparsity applies to MLP (and expert) weights only, attention weights stay dense. Norm scales
  and the embedding table stay FP16. Compression changes weights only: inference keeps no
  activations for a backward pass, so checkpointing saves nothing here.
- **MoE.** 8 experts, top-2, capacity factor 1.25; all experts' weights count toward the layer.
- **Units.** MiB = 2^20 bytes in the tables; MB = 10^6 and GB = 10^9 where figures are compared
  with the seeds' "MB" / "GB" (their arithmetic is decimal). "x L2" = total / the
  {L2.name} L2 capacity lwjax plans for ({L2.l2_bytes / MIB:.0f} MiB).
"""


# ---- analyses (cached: each configuration, batch, policy and mode is traced once) -------------

@functools.cache
def config(name: str) -> configs.DenseConfig:
    """A seed preset by its function name in ``lwjax.models.configs`` (e.g. 'seed_dense')."""
    return getattr(configs, name)()


@functools.cache
def _abstract(name: str):
    return models.abstract(config(name))


@functools.cache
def analysis(name: str, microbatch: int, compression: str = "none", mode: str = "prefill",
             attention: str = ATTENTION) -> ModelReport:
    """``lwjax.analyze`` of a seed config at one microbatch, policy, mode and attention choice.

    Example:
        >>> analysis("seed_dense", 16).layers[0].footprint.weights_bytes
        536887296
    """
    cfg = config(name)
    if mode == "decode":
        tokens = jax.ShapeDtypeStruct((microbatch, 1), jnp.int32)
        return lwjax.analyze(_abstract(name), tokens, mode="decode", cache_len=cfg.seq_len,
                             compression=compression, attention=attention)
    tokens = jax.ShapeDtypeStruct((microbatch, cfg.seq_len), jnp.int32)
    return lwjax.analyze(_abstract(name), tokens, compression=compression, attention=attention)


@functools.cache
def _graph(name: str, batch: int) -> LayerGraph:
    cfg = config(name)
    return segment(trace(_abstract(name), jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32)))


def layer_weight_bytes(name: str, compression: str = "none") -> dict[str, int]:
    """Stored bytes of each weight of the first layer, keyed by its path inside the layer
    ('attn/q', 'mlp/gate', 'attn_norm/scale', ...), as lwjax's footprint pass counts them
    (the policy's ``weight_bytes`` with the output channels read from the traced program).

    Example:
        >>> layer_weight_bytes("seed_dense")["attn/q"]
        33554432
    """
    graph = _graph(name, 1)
    policy = compression_lib.get(compression)
    channels = output_channels(graph)
    out = {}
    for i in graph.layers[0].params:
        p = graph.params[i]
        key = "/".join(p.path.split("/")[2:])  # drop 'layers/0/'
        out[key] = policy.weight_bytes(p.path, p.nbytes // p.dtype.itemsize, p.dtype.itemsize,
                                       channels.get(i))
    return out


def layer_input(name: str, batch: int) -> tuple[tuple[int, ...], str, int]:
    """(shape, dtype, bytes) of the largest activation entering the first layer: the hidden
    states [B, T, D] that one layer hands the next."""
    v = max(_graph(name, batch).layers[0].inputs,
            key=lambda v: v.aval.size * v.aval.dtype.itemsize)
    return tuple(v.aval.shape), v.aval.dtype.name, int(v.aval.size * v.aval.dtype.itemsize)


# ---- per-layer tables -----------------------------------------------------------------------

def segment_rows(report: ModelReport) -> list[tuple[str, Footprint]]:
    """(label, footprint) for the prologue, each run of identical consecutive layers, and the
    epilogue; a run reads 'layers_0 .. layers_15 (16, each)'."""
    rows = [("prologue", report.prologue.footprint)]
    layers = report.layers
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1].footprint == layers[i].footprint:
            j += 1
        label = layers[i].name if i == j else (
            f"{layers[i].name} .. {layers[j].name} ({j - i + 1}, each)")
        rows.append((label, layers[i].footprint))
        i = j + 1
    rows.append(("epilogue", report.epilogue.footprint))
    return rows


def _mib(n: float) -> str:
    return f"{n / MIB:,.2f}"


def _fill(n: float) -> str:
    return f"{n / L2.l2_bytes:,.2f}"


BREAKDOWN_HEAD = ("| microbatch | compression | segment | weights MiB | activations MiB | "
                  "buffers MiB | KV cache MiB | total MiB | total MB | x L2 |\n"
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")


def breakdown_table(name: str, mode: str) -> str:
    """Markdown: every microbatch x compression x segment of one config in one mode."""
    lines = [BREAKDOWN_HEAD]
    for mb in MICROBATCHES:
        for preset, label in COMPRESSIONS.items():
            for seg, f in segment_rows(analysis(name, mb, preset, mode)):
                lines.append(
                    f"| {mb} | {label} | {seg} | {_mib(f.weights_bytes)} | "
                    f"{_mib(f.activation_bytes)} | {_mib(f.buffer_bytes)} | "
                    f"{_mib(f.kv_cache_bytes)} | {_mib(f.total_bytes)} | "
                    f"{f.total_bytes / MB:,.1f} | {_fill(f.total_bytes)} |")
    return "\n".join(lines)


def weights_overview() -> str:
    """Markdown: weights of one layer (MiB) per config and policy (independent of batch)."""
    lines = ["| config | " + " | ".join(COMPRESSIONS.values()) + " |",
             "|---|" + "---:|" * len(COMPRESSIONS)]
    for name in CONFIG_NAMES:
        cells = [_mib(analysis(name, 1, p).layers[0].footprint.weights_bytes)
                 for p in COMPRESSIONS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def totals_overview() -> str:
    """Markdown: total footprint of one layer (MiB, and x L2) per config, mode, microbatch and
    policy. Every layer of a seed config has the same footprint (see the per-config tables)."""
    lines = ["| config | mode | microbatch | " + " | ".join(COMPRESSIONS.values()) + " |",
             "|---|---|---:|" + "---:|" * len(COMPRESSIONS)]
    for name in CONFIG_NAMES:
        for mode in MODES:
            for mb in MICROBATCHES:
                cells = []
                for p in COMPRESSIONS:
                    total = analysis(name, mb, p, mode).layers[0].footprint.total_bytes
                    cells.append(f"{_mib(total)} ({_fill(total)} x L2)")
                lines.append(f"| {name} | {mode} | {mb} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attention_table(name: str = "seed_dense") -> str:
    """Markdown: one layer's prefill footprint with fused vs materialised attention scores."""
    lines = ["| microbatch | attention | counted as | weights MiB | activations MiB | "
             "buffers MiB | total MiB | x L2 |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for mb in MICROBATCHES:
        for attention in ("fused", "as_traced"):
            f = analysis(name, mb, "none", "prefill", attention).layers[0].footprint
            lines.append(f"| {mb} | {attention} | {f.attention} | {_mib(f.weights_bytes)} | "
                         f"{_mib(f.activation_bytes)} | {_mib(f.buffer_bytes)} | "
                         f"{_mib(f.total_bytes)} | {_fill(f.total_bytes)} |")
    return "\n".join(lines)


def findings() -> str:
    """Markdown bullets: what drives the figures, each number computed here."""
    cfg = config("seed_dense")
    mb, t, f = MICROBATCHES[0], cfg.seq_len, cfg.mlp_hidden_size
    pre = analysis("seed_dense", mb).layers[0].footprint
    dec = analysis("seed_dense", mb, mode="decode").layers[0].footprint
    mlp_bytes = 3 * mb * t * f * cfg.dtype.itemsize
    totals = {(n, mode, m, p): analysis(n, m, p, mode).layers[0].footprint.total_bytes
              for n in CONFIG_NAMES for mode in MODES for m in MICROBATCHES for p in COMPRESSIONS}
    total = min(totals.values())
    smallest = [k for k, v in totals.items() if v == total]
    names = " and ".join(k[0] for k in smallest)  # seed002_dense has seed_dense's layers
    _, mode, m, p = smallest[0]
    return "\n".join([
        f"- Prefill activations dominate: in seed_dense at microbatch {mb}, the MLP's gate, up "
        f"and gated product, three [{mb}, {t:,}, {f:,}] FP16 tensors ({_mib(mlp_bytes)} MiB), "
        f"are live at once; the layer's peak is {_mib(pre.activation_bytes)} MiB against "
        f"{_mib(pre.weights_bytes)} MiB of weights, so compression, which shrinks weights "
        "only, barely moves prefill totals.",
        f"- Decode buffers ({_mib(dec.buffer_bytes)} MiB at microbatch {mb}) are about the size "
        f"of the KV cache ({_mib(dec.kv_cache_bytes)} MiB): lwjax charges a transposed copy of "
        "the K and V caches for the attention dots (caches are [B, L, N, H]; the dots batch "
        "over B and N). A flash-decoding kernel reading the cache in place needs no such copy, "
        "so decode totals here are an upper bound by about the KV cache.",
        f"- No configuration, policy, mode or microbatch here fits one layer in {L2.name} L2: "
        f"the smallest layer is {names}, {mode}, microbatch {m}, {COMPRESSIONS[p]}: "
        f"{_mib(total)} MiB = {_fill(total)} x L2.",
    ])


# ---- claims vs computed ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClaimRow:
    """One seed claim beside lwjax's figure.

    Attributes:
        seed: the seed document ('000', '001', '003').
        item: what the claim is about.
        claim: the claim as written in the document.
        claim_value: its number as written ('100.7'), in ``unit``.
        unit: 'MB' (10^6 bytes) or 'GB' (10^9 bytes).
        computed_bytes: lwjax's figure the claim is compared with.
        computed: that figure and its basis, in words.
        arithmetic: the plain arithmetic, where it helps.
        reason: why it agrees or not, briefly.
    """

    seed: str
    item: str
    claim: str
    claim_value: str
    unit: str
    computed_bytes: int
    computed: str
    arithmetic: str
    reason: str

    @property
    def claim_bytes(self) -> float:
        return float(self.claim_value) * {"MB": MB, "GB": GB}[self.unit]

    @property
    def agrees(self) -> bool:
        """Within ``TOLERANCE`` of the claim, or within half a unit of its last written digit
        (0.016 MB stands for anything from 0.0155 to 0.0165 MB)."""
        decimals = len(self.claim_value.split(".")[1]) if "." in self.claim_value else 0
        unit = {"MB": MB, "GB": GB}[self.unit]
        slack = max(TOLERANCE * self.claim_bytes, 0.5 * 10.0**-decimals * unit)
        return abs(self.computed_bytes - self.claim_bytes) <= slack

    @property
    def verdict(self) -> str:
        return "AGREES" if self.agrees else "DISAGREES"


def _mb(n: float, digits: int = 2) -> str:
    return f"{n / MB:,.{digits}f} MB"


def _gb(n: float, digits: int = 2) -> str:
    return f"{n / GB:,.{digits}f} GB"


def claim_rows(name: str = CLAIM_CONFIG) -> list[ClaimRow]:
    """Seeds 000, 001 and 003's per-layer claims beside lwjax's figures for ``name``.

    Example:
        >>> [r.verdict for r in claim_rows() if r.claim_value == "49.5"]
        ['DISAGREES']
    """
    cfg = config(name)
    b, t, d, f = CLAIM_BATCH, cfg.seq_len, cfg.hidden_size, cfg.mlp_hidden_size
    w = layer_weight_bytes(name)
    w8 = layer_weight_bytes(name, "int8")
    w824 = layer_weight_bytes(name, "int8-2:4")
    qkv = w["attn/q"] + w["attn/k"] + w["attn/v"]
    qkv8 = w8["attn/q"] + w8["attn/k"] + w8["attn/v"]
    mlp = w["mlp/gate"] + w["mlp/up"] + w["mlp/down"]
    mlp824 = w824["mlp/gate"] + w824["mlp/up"] + w824["mlp/down"]
    norms = w["attn_norm/scale"] + w["mlp_norm/scale"]
    norms8 = w8["attn_norm/scale"] + w8["mlp_norm/scale"]
    weights = sum(w.values())
    full = analysis(name, b).layers[0].footprint
    mb16 = analysis(name, 16).layers[0].footprint
    full824 = analysis(name, b, "int8-2:4").layers[0].footprint
    unfused16 = analysis(name, 16, attention="as_traced").layers[0].footprint
    tiny = analysis(name, 1, "int4-75%").layers[0].footprint
    shape, dtype, input_bytes = layer_input(name, b)
    all_weights = sum(r.footprint.weights_bytes for r in analysis(name, b).layers)
    if weights != full.weights_bytes or sum(w824.values()) != full824.weights_bytes:
        raise RuntimeError("per-weight bytes do not sum to the report's weights_bytes")
    product = b * t * d * 2 * 3  # the activation product exactly as seed 000 writes it
    peak_note = (f"peak live activations in the layer: {_gb(full.activation_bytes)} at batch {b}"
                 f", {_gb(mb16.activation_bytes)} per microbatch of 16")
    total_note = (f"lwjax total: {_gb(full.total_bytes)} at batch {b} (weights "
                  f"{_mb(full.weights_bytes, 1)} + activations {_gb(full.activation_bytes)} + "
                  f"buffers {_mb(full.buffer_bytes, 1)}); {_gb(mb16.total_bytes)} per "
                  "microbatch of 16")
    return [
        ClaimRow("000", "attention QKV weights", "4096 x 12288 x 2B = 100.7 MB", "100.7", "MB",
                 qkv, f"q + k + v: {_mb(qkv)}", f"4096*12288*2 = {4096 * 12288 * 2:,} B",
                 "same product"),
        ClaimRow("000", "attention output weights", "4096 x 4096 x 2B = 33.6 MB", "33.6", "MB",
                 w["attn/out"], f"out: {_mb(w['attn/out'])}", f"4096*4096*2 = {4096**2 * 2:,} B",
                 "same product"),
        *[ClaimRow("000", f"MLP {k} weights", "4096 x 16384 x 2B = 134.2 MB", "134.2", "MB",
                   w[f"mlp/{k}"], f"{k}: {_mb(w[f'mlp/{k}'])}", f"4096*16384*2 = {d * f * 2:,} B",
                   "same product") for k in ("gate", "up", "down")],
        ClaimRow("000", "layer norm", "2 x 4096 x 2B = 0.016 MB", "0.016", "MB", norms,
                 f"two RMSNorm scales: {_mb(norms, 4)}", f"2*4096*2 = {2 * 4096 * 2:,} B",
                 "0.0164 MB written to 3 decimals"),
        ClaimRow("000", "activations", "128 x 10000 x 4096 x 2B x 3 = 98.3 MB", "98.3", "MB",
                 input_bytes,
                 f"layer input {list(shape)} {dtype}: {_mb(input_bytes, 1)}; {peak_note}",
                 f"128*10000*4096*2 = {b * t * d * 2:,} B; x3 = {_gb(b * t * d * 2 * 3)}",
                 f"the product as written is {_gb(product)}, {product / (98.3 * MB):,.0f}x the "
                 f"claim; one [B, T, D] FP16 tensor alone is {_gb(input_bytes)}"),
        ClaimRow("000", "buffers", "Buffers: 10 MB workspace", "10", "MB", full.buffer_bytes,
                 f"{_mb(full.buffer_bytes)} at batch {b}; {_mb(unfused16.buffer_bytes, 1)} per "
                 "microbatch of 16 without fused attention", "--",
                 "an assumed figure; with fused attention the peak is in the MLP, where no "
                 "workspace is needed, so workspace adds nothing to the peak"),
        ClaimRow("000", "total per uncompressed layer", "Total per uncompressed layer: 537 MB",
                 "537", "MB", full.total_bytes, total_note,
                 f"weight lines alone: {_mb(weights, 1)}; with the document's 98.3 + 10 MB: "
                 f"{_mb(weights + 108.3 * MB, 1)}",
                 "537 MB is the weights alone; the document's own activation and buffer lines "
                 "are left out, and the real activations are far larger"),
        ClaimRow("000", "total for 16 layers", "Total for 16 layers: 8.59 GB", "8.59", "GB",
                 all_weights, f"16 layers' weights: {_gb(all_weights, 3)}",
                 f"16 x {_mb(weights, 1)} = {_gb(16 * weights, 3)}",
                 "equals the 16 layers' weights only (no activations or buffers, although "
                 "called a total)"),
        ClaimRow("000", "attention weights, INT8", "Attention weights: 100.7 MB -> 50.4 MB (INT8)",
                 "50.4", "MB", qkv8, f"q + k + v INT8 with FP16 per-channel scales: {_mb(qkv8)}",
                 f"100,663,296 / 2 + 3*4096*2 = {100_663_296 // 2 + 3 * 4096 * 2:,} B",
                 "QKV only: the output projection (INT8: "
                 f"{_mb(w8['attn/out'], 1)}) is missing from the document's 144.1 MB total"),
        ClaimRow("000", "MLP weights, INT8 + 2:4", "MLP weights: 268.4 MB -> 67.1 MB (INT8 + 50% "
                 "sparsity)", "67.1", "MB", mlp824,
                 f"gate + up + down, INT8 + 2:4 with index metadata and scales: {_mb(mlp824, 1)}",
                 f"3 x 134.2 = {_mb(mlp, 1)} dense FP16; /4 = {_mb(mlp / 4, 1)}; + n/8 "
                 f"metadata = {_mb(mlp / 2 / 8, 1)}",
                 "268.4 MB is two of the three MLP matrices; 2:4 also stores 2 index bits "
                 "per kept value"),
        ClaimRow("000", "layer norm, INT8", "Layer norm: 0.016 MB -> 0.008 MB (INT8)", "0.008",
                 "MB", norms8, f"norm scales kept FP16: {_mb(norms8, 4)}", "--",
                 "lwjax does not quantise norm scales (not matmul weights); negligible either "
                 "way"),
        ClaimRow("000", "activations, compressed", "Activations: 98.3 MB -> 24.6 MB "
                 "(checkpointing)", "24.6", "MB", full824.activation_bytes,
                 f"peak live activations under INT8 + 2:4: {_gb(full824.activation_bytes)} at "
                 f"batch {b} (unchanged by compression)", "98.3 / 4 = 24.6",
                 "checkpointing trades activations kept for a backward pass; inference keeps "
                 "none, and the 98.3 MB base is wrong"),
        ClaimRow("000", "buffers, compressed", "Buffers: 10 MB -> 2 MB (fusion)", "2", "MB",
                 full824.buffer_bytes, f"{_mb(full824.buffer_bytes)} at batch {b}", "--",
                 "assumed figures; see 'buffers' above"),
        ClaimRow("000", "total compressed per layer", "Total compressed per layer: 144.1 MB",
                 "144.1", "MB", full824.total_bytes,
                 f"lwjax INT8 + 2:4 total: {_gb(full824.total_bytes)} at batch {b} (weights "
                 f"{_mb(full824.weights_bytes, 1)})",
                 "50.4 + 67.1 + 0.008 + 24.6 + 2 = 144.108",
                 "adds up, but omits the output projection and one MLP matrix, and its "
                 f"activations are 1/{full824.activation_bytes / (24.6 * MB):,.0f} of lwjax's"),
        ClaimRow("000", "further optimisation", "Further optimization: 144.1 MB -> 49.5 MB",
                 "49.5", "MB", tiny.total_bytes,
                 f"most aggressive preset (INT4 + 75% on MLP) at microbatch 1: "
                 f"{_mb(tiny.total_bytes, 1)} (weights alone {_mb(tiny.weights_bytes, 1)})", "--",
                 "no derivation given; the weights alone exceed 49.5 MB, and one sequence's "
                 f"activations are {_mb(tiny.activation_bytes, 0)}"),
        ClaimRow("001", "parameters per layer", "Total per layer: ~268.4M parameters -> "
                 "536.8MB in BF16", "536.8", "MB", weights, f"layer weights: {_mb(weights)}",
                 f"4*4096^2 + 3*4096*16384 = {4 * d * d + 3 * d * f:,} params", "same product"),
        ClaimRow("001", "activations per layer", "~10.49GB per layer for activations", "10.49",
                 "GB", input_bytes, f"layer input {list(shape)} {dtype}: {_gb(input_bytes)}; "
                 f"{peak_note}", f"128*10000*4096*2 = {_gb(b * t * d * 2, 3)}",
                 "right for one [B, T, D] tensor; the layer's peak is "
                 f"{full.activation_bytes / input_bytes:.0f}x that (the MLP's [B, T, {f}] "
                 "tensors)"),
        ClaimRow("001", "memory per layer", "Per layer memory: ~11GB (weights + activations + "
                 "buffers)", "11", "GB", full.total_bytes, total_note,
                 f"{_gb(weights)} weights + {_gb(b * t * d * 2)} = {_gb(weights + b * t * d * 2)}",
                 "counts one [B, T, D] tensor; the MLP's gate, up and product "
                 f"[{b}, {t}, {f}] FP16 ({_gb(b * t * f * 2)} each) are live at once"),
        ClaimRow("003", "memory per layer", "fitting 376.7MB per layer into 50MB L2 cache",
                 "376.7", "MB", full.total_bytes, total_note,
                 "268.4 + 98.3 + 10 = 376.7 (the MLP, activation and buffer lines of seed 000)",
                 f"smaller than the weights alone ({_mb(weights, 1)}): it leaves out the "
                 "attention weights"),
    ]


def claims_table(rows: list[ClaimRow]) -> str:
    """Markdown: claim as written, lwjax's figure, plain arithmetic, verdict and reason."""
    lines = ["| seed | item | claim (as written) | lwjax computed | plain arithmetic | verdict | "
             "reason |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.seed} | {r.item} | {r.claim} | {r.computed} | {r.arithmetic} | "
                     f"**{r.verdict}** | {r.reason} |")
    return "\n".join(lines)


# ---- the results file -----------------------------------------------------------------------



def machine_line() -> str:
    """Machine, core count, Python, JAX and Flax versions, JAX backend and today's date."""
    return (f"{_common.cpu_name()}, {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, JAX {jax.__version__}, Flax "
            f"{flax.__version__}, backend {jax.default_backend()}; "
            f"{datetime.date.today().isoformat()}")


def report_markdown() -> str:
    """The whole results file."""
    rows = claim_rows()
    agree = sum(r.agrees for r in rows)
    parts = [
        "# Per-layer memory of the seed configurations",
        "Computed by `experiments/memory_breakdown.py` with `lwjax.analyze` (static estimates "
        "of the traced program on abstract models; nothing measured on a GPU).\n\n"
        f"Machine: {machine_line()}.",
        "## Assumptions",
        ASSUMPTIONS,
        "## Weights of one layer (MiB)",
        "Independent of batch, sequence and mode.\n\n" + weights_overview(),
        "## Total footprint of one layer (MiB, and multiples of L2)",
        totals_overview(),
        "## What drives the figures",
        findings(),
        "## Fused vs materialised attention (seed_dense, prefill, uncompressed, one layer)",
        attention_table(),
        "## Claims vs computed (seed_dense; batch 128 unless stated)",
        f"{agree} of {len(rows)} claims agree with lwjax (within {TOLERANCE:.0%} or half a unit "
        "of the last digit written). The claims are quoted, never used as results.\n\n"
        + claims_table(rows),
        "## Per-layer tables",
        "Identical consecutive layers are shown once ('layers_0 .. layers_15 (16, each)': "
        "each of them has this footprint).",
    ]
    for name in CONFIG_NAMES:
        cfg = config(name)
        desc = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} x "
                f"{cfg.head_dim} heads, MLP {cfg.mlp_hidden_size}")
        if cfg.is_moe:
            desc += f", {cfg.num_experts} experts top-{cfg.experts_per_token}"
        for mode in MODES:
            extra = f", cache_len {cfg.seq_len:,}" if mode == "decode" else ""
            parts += [f"### {name} -- {mode} ({desc}; seq {cfg.seq_len:,}{extra})",
                      breakdown_table(name, mode)]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _common.add_output_flags(ap)
    a = ap.parse_args(argv)
    start = time.perf_counter()
    text = report_markdown()
    text += f"\nGenerated in {time.perf_counter() - start:.1f} s.\n"
    print(text)
    if not a.no_write:
        path = _common.write_results(RESULTS_NAME, text, _common.output_dir(a.write_results))
        print(f"written to {path}")
    return text


if __name__ == "__main__":
    main()
