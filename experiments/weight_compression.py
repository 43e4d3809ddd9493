"""Compression that runs: held-out perplexity, stored bytes per device and decode speed of the
weight codecs (int8 / int4 / 2:4 / 1:4), measured, and projected decode for H100.

*Measured* on this machine (CPU, 16 simulated devices sharing its cores):

- **Accuracy**: the byte-level LM ``experiments/train.py`` trained
  (``results/train_model.msgpack``, ``bytelm.load_trained_with_meta``) runs its held-out text
  (windows evenly spaced over the held-out files of its own corpus spec) through
  ``lwjax.layerwise_shard(..., compression=preset)`` on 4 simulated devices (one layer per
  stage), weights stored compressed on their stage and decoded inside it. Every preset is
  checked against the same model holding ``sm.export_params()`` (the weights as the pipeline
  runs them) on one device: mean losses within ``AGREE_NATS``. Perplexity = exp(mean nats per
  byte), bits/byte = nats / ln 2; degradation = perplexity / none's - 1, with a paired
  standard error over the windows.
- **Bytes**: per stage, ``sm.program.storage.own_bytes(s)``, the same read from the placed
  arrays (the shards of the stage's slots on its device), everything allocated on the device
  (every slot's shard: the slot layout gives a stage rows of slots it does not use), beside
  the plan's ``footprint.weights_bytes``; own bytes must be within ``BYTES_TOLERANCE``.
- **Decode**: ``lwjax.layerwise_generate`` on ``decode.cpu_config("dense", 16)`` (16 layers,
  random weights: speed does not depend on what the weights learnt), 16 stages on 16 devices,
  M = 16, B = 16 prompts of T tokens; each preset built for N new tokens and for 1 (the same
  plan), all calls timed interleaved (``_common.measure_interleaved``, medians); TPOT =
  (t(N) - t(1)) / (N - 1), decode tokens/s = B / TPOT. Tokens are checked against
  ``models.generate`` on the model holding the preset's decoded weights.

*Projected* (cost model, H100 SXM5, seed_dense at 16 stages, the ring at its best M): the
cost model has no compression parameter (``passes/cost.py``) and the planner's per-stage
estimate prices the uncompressed program (its ``est ms`` is the same for every preset; the
table shows it), so the projection substitutes each preset's stored weight bytes (from
``lwjax.plan(..., compression=preset, mode="decode")``) into the cost model's decode pass:
bytes moved, not FLOPs -- no XLA path runs sparse tensor cores (JAX issue 19212), and the
dequantisation's own work is not counted.

This module measures and returns records; ``weight_compression_report.py`` formats them.
(Not ``compression.py``: a module of that name on the path shadows the standard library's
``compression`` package, new in Python 3.14, which JAX imports at start-up.) Run from the
repository root::

    python experiments/weight_compression.py [--quick] [--repeats 3] [--write-results]

It writes ``compression.md`` (``--quick``: ``compression-quick.md``) to
``experiments/out/`` (git-ignored); ``--write-results`` writes ``experiments/results/``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(16)  # before anything touches a device; under pytest conftest did

import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import bytelm  # noqa: E402
import decode  # noqa: E402  (its 16-layer CPU config)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import hardware, models  # noqa: E402
from lwjax.passes import cost  # noqa: E402

SCRIPT = "experiments/weight_compression.py"
NUM_DEVICES = 16
MODEL_PATH = _common.TRAINED_MODEL
AGREE_NATS = 1e-4  # pipeline vs export_params on one device, mean held-out loss
BYTES_TOLERANCE = 0.02  # stored bytes per device vs the plan's weights bytes
PROJECTED_ON = hardware.H100_SXM
PROJECTED_CONFIG = "seed_dense"
SEED_CLAIM = (
    "../shared/seeds/000_89c23fd103b20193.txt",
    "Proposed (INT8 + 50% sparsity): Perplexity degradation: <0.1% on validation set",
    "int8-2:4",  # the preset that is the claim's "INT8 + 50% sparsity" (2:4 in MLP layers)
    0.001,
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one run.

    Attributes:
        windows: held-out windows of the model's sequence length, evenly spaced.
        batch: windows per pipeline call.
        stages: pipeline stages (= devices) of the accuracy runs.
        microbatches: M of the accuracy runs.
        ppl_presets: presets whose perplexity and bytes are measured ("none" first).
        decode_presets: presets whose decode is timed ("none" first).
        decode_layers, decode_stages: the decode model's depth and its stages (one device each).
        batch_decode, prompt_len, new_tokens: B, T and N of the decode runs.
        repeats: interleaved timing rounds (medians).
    """

    windows: int
    batch: int
    stages: int
    microbatches: int
    ppl_presets: tuple[str, ...]
    decode_presets: tuple[str, ...]
    decode_layers: int
    decode_stages: int
    batch_decode: int
    prompt_len: int
    new_tokens: int
    repeats: int

    def __post_init__(self) -> None:
        if self.windows % self.batch:
            raise ValueError(f"windows ({self.windows}) must be a multiple of batch "
                             f"({self.batch}).")
        for presets in (self.ppl_presets, self.decode_presets):
            if presets[0] != "none":
                raise ValueError(f"presets must start with 'none' (the baseline): {presets}")
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens must be >= 2 to time decode steps, got "
                             f"{self.new_tokens}.")


FULL = Scale(windows=512, batch=64, stages=4, microbatches=4,
             ppl_presets=("none", "int8", "int4", "2:4", "int8-2:4", "int4-2:4", "int4-75%"),
             decode_presets=("none", "int8", "int4", "int8-2:4", "int4-75%"),
             decode_layers=16, decode_stages=16, batch_decode=16, prompt_len=16, new_tokens=16,
             repeats=3)
QUICK = Scale(windows=32, batch=16, stages=4, microbatches=4,
              ppl_presets=("none", "int8", "int8-2:4"), decode_presets=("none", "int8"),
              decode_layers=4, decode_stages=4, batch_decode=4, prompt_len=8, new_tokens=4,
              repeats=1)


# ---- records ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageBytes:
    """One stage's stored weights on its device (measured from the placed arrays).

    Attributes:
        stage, device: the stage and its device id.
        layers: its layers, e.g. "layers_0-layers_3".
        own_bytes: ``storage.own_bytes(stage)``: its rows of its slots.
        own_placed_bytes: the same rows read from the placed arrays (shard nbytes).
        allocated_bytes: every slot's shard on the device, the padding rows of slots the stage
            does not use included.
        plan_bytes: the plan's ``footprint.weights_bytes`` for the stage.
        by_dtype: own bytes per stored dtype, e.g. (("int8", 1024), ("float16", 64)).
    """

    stage: int
    device: int
    layers: str
    own_bytes: int
    own_placed_bytes: int
    allocated_bytes: int
    plan_bytes: int
    by_dtype: tuple[tuple[str, int], ...]

    @property
    def own_vs_plan(self) -> float:
        """own_placed_bytes / plan_bytes - 1."""
        return self.own_placed_bytes / self.plan_bytes - 1


@dataclasses.dataclass(frozen=True)
class AccuracyResult:
    """One preset on the held-out windows: the pipeline and one device, and its bytes.

    Attributes:
        preset: the compression preset.
        plan: the plan's first summary line.
        window_nats: mean next-byte loss (nats) of each window, through the pipeline.
        single_window_nats: the same on one device with ``sm.export_params()`` loaded.
        stages: stored bytes per stage.
        weight_error: per group of weights ("attention", "MLP", "LM head"), the relative
            error of the weights as the pipeline runs them, ||w_run - w|| / ||w|| (Frobenius,
            over the group's layers).
        build_s: ``layerwise_shard`` (trace, plan, encode, place).
        eval_s: every window through the pipeline (the first call compiles).
    """

    preset: str
    plan: str
    window_nats: tuple[float, ...]
    single_window_nats: tuple[float, ...]
    stages: tuple[StageBytes, ...]
    weight_error: tuple[tuple[str, float], ...]
    build_s: float
    eval_s: float

    @property
    def nats(self) -> float:
        return float(np.mean(self.window_nats))

    @property
    def single_nats(self) -> float:
        return float(np.mean(self.single_window_nats))

    @property
    def agreement(self) -> float:
        """|pipeline - one device| of the mean loss (nats)."""
        return abs(self.nats - self.single_nats)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats)

    @property
    def stored_bytes(self) -> int:
        return sum(s.own_placed_bytes for s in self.stages)

    def degradation(self, base: AccuracyResult) -> tuple[float, float]:
        """(perplexity / base's - 1, its standard error): the paired per-window loss
        differences' mean d gives exp(d) - 1, their standard error se gives exp(d) * se."""
        diff = np.subtract(self.window_nats, base.window_nats)
        d = float(diff.mean())
        se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else 0.0
        return math.expm1(d), math.exp(d) * se


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    """One preset generating N tokens and 1 token, timed interleaved with the others.

    Attributes:
        preset: the compression preset.
        stages, microbatches, batch, new_tokens: S, M, B, N.
        t_new, t_one: call times generating N tokens and 1.
        build_s: both generators (trace, plan, encode, place).
        first_call_s: the N-token generator's first call (compile + one run).
        tokens_match: both calls return ``models.generate``'s tokens of the model holding the
            preset's decoded weights.
        stage_bytes: stored bytes per stage of the decode program.
    """

    preset: str
    stages: int
    microbatches: int
    batch: int
    new_tokens: int
    t_new: _common.Timing
    t_one: _common.Timing
    build_s: float
    first_call_s: float
    tokens_match: bool
    stage_bytes: tuple[StageBytes, ...]

    @property
    def tpot_ms(self) -> float:
        """(t(N) - t(1)) / (N - 1), milliseconds."""
        return 1e3 * (self.t_new.median - self.t_one.median) / (self.new_tokens - 1)

    @property
    def decode_tps(self) -> float:
        return self.batch * 1e3 / self.tpot_ms

    @property
    def e2e_tps(self) -> float:
        return self.batch * self.new_tokens / self.t_new.median


@dataclasses.dataclass(frozen=True)
class ProjectedResult:
    """One preset at the seed dimensions (projected, not measured).

    Attributes:
        preset: the compression preset.
        block_bytes, head_bytes, embed_bytes: stored bytes of one block, of the epilogue
            (final norm + LM head) and of the prologue (embedding), from the plan's numbers.
        plan_stage_ms: the planner's slowest ``est ms`` per microbatch of the 16-stage decode
            plan (it prices the uncompressed program).
        tpot_ms, tps, microbatches, tick_ms: the ring's projected TPOT, tokens/s, best M and
            tick with the stored bytes substituted.
        weights_in_l2: the busiest stage's weights fit the L2 (else they come from HBM).
        block_activation_bytes: the other bytes a block moves per microbatch at that M (the
            KV cache read, the new K/V and the activations: ``cost.decode_block_cost``).
    """

    preset: str
    block_bytes: int
    head_bytes: int
    embed_bytes: int
    plan_stage_ms: float
    tpot_ms: float
    tps: float
    microbatches: int
    tick_ms: float
    weights_in_l2: bool
    block_activation_bytes: int


@dataclasses.dataclass(frozen=True)
class Result:
    """Everything one run measured and projected.

    Attributes:
        scale: the sizes.
        model: the trained model's dimensions in words.
        heldout: where the windows come from, in words.
        accuracy, decode, projected: the records, "none" first.
        decode_config: the decode model's dimensions in words.
        wall_s: the whole run.
    """

    scale: Scale
    model: str
    heldout: str
    accuracy: tuple[AccuracyResult, ...]
    decode: tuple[DecodeResult, ...]
    decode_config: str
    projected: tuple[ProjectedResult, ...]
    wall_s: float


# ---- bytes --------------------------------------------------------------------------------


def stage_bytes(storage, placed: Sequence[jax.Array], plan: lwjax.Plan) -> tuple[StageBytes,
                                                                                   ...]:
    """Per stage: the stored bytes read from the placed slot arrays beside the plan's."""
    index = {slot: n for n, slot in enumerate(storage.slots)}
    out = []
    for s, st in enumerate(plan.stages):
        device = st.devices[0]
        shard = {}
        for n, array in enumerate(placed):
            for sh in array.addressable_shards:
                if sh.device.id == device:
                    shard[n] = sh.data.nbytes
        by_dtype: dict[str, int] = {}
        own = 0
        for key, j, _ in storage.where[s]:
            nbytes = shard[index[key, j]]
            own += nbytes
            by_dtype[key[0]] = by_dtype.get(key[0], 0) + nbytes
        layers = st.layers[0] if len(st.layers) == 1 else f"{st.layers[0]}-{st.layers[-1]}"
        out.append(StageBytes(s, device, layers, storage.own_bytes(s), own,
                              sum(shard.values()), st.footprint.weights_bytes,
                              tuple(sorted(by_dtype.items()))))
    return tuple(out)


# ---- accuracy -----------------------------------------------------------------------------


def window_nats(logits, targets) -> np.ndarray:
    """Mean next-byte cross-entropy (nats) of each row, in float64 on the host."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return (lse - picked).mean(axis=-1)


def heldout_windows(meta: dict, seq_len: int, scale: Scale) -> tuple[list, str]:
    """The evaluation batches (inputs, targets) and where they come from, in words."""
    data = bytelm.corpus(bytelm.CorpusSpec(**meta["corpus"]))
    if data.sha256 != meta["corpus_sha256"]:
        _common.step(f"  WARNING: the corpus differs from the one the model was trained on "
                     f"(SHA-256 {data.sha256[:16]} vs {meta['corpus_sha256'][:16]}): another "
                     "Python version's standard library")
    batches = bytelm.heldout_batches(data.heldout, seq_len, scale.batch,
                                     scale.windows // scale.batch)
    words = (f"{scale.windows} windows of {seq_len} bytes ({scale.windows * seq_len:,} "
             f"predicted bytes) evenly spaced over the {data.heldout.size:,} held-out bytes "
             f"({data.heldout_files} files never trained on) of the model's corpus; "
             f"{data.summary()}")
    return batches, words


WEIGHT_GROUPS = (("attention", "attn/"), ("MLP", "mlp/"), ("LM head", "lm_head"))


def weight_error(original, run) -> tuple[tuple[str, float], ...]:
    """||w_run - w|| / ||w|| per ``WEIGHT_GROUPS`` entry, the weights given as pure dicts."""
    flat = dict(jax.tree_util.tree_flatten_with_path(original)[0])
    ran = dict(jax.tree_util.tree_flatten_with_path(run)[0])
    out = []
    for group, key in WEIGHT_GROUPS:
        diff = norm = 0.0
        for path, w in flat.items():
            if key in "/".join(str(getattr(k, "key", k)) for k in path):
                w = np.asarray(w, np.float64)
                diff += float(np.sum((np.asarray(ran[path], np.float64) - w) ** 2))
                norm += float(np.sum(w ** 2))
        out.append((group, math.sqrt(diff / norm) if norm else 0.0))
    return tuple(out)


def measure_accuracy(model, batches, preset: str, scale: Scale, single) -> AccuracyResult:
    """``preset`` through the pipeline and, with ``sm.export_params()``, on one device."""
    start = time.perf_counter()
    x0 = jnp.asarray(batches[0][0])
    sm = lwjax.layerwise_shard(model, x0, devices=jax.devices()[:scale.stages],
                               compression=preset, cache_bytes=2**30,
                               microbatches=scale.microbatches, objective="bottleneck",
                               allow=())
    build_s = time.perf_counter() - start
    if sm.plan.compression != preset:
        raise RuntimeError(f"asked for {preset}, the plan stores {sm.plan.compression}")
    start = time.perf_counter()
    nats = np.concatenate([window_nats(sm(jnp.asarray(x)), y) for x, y in batches])
    eval_s = time.perf_counter() - start
    params = jax.device_put(sm.export_params(), jax.devices()[0])
    ref = np.concatenate([window_nats(single(params, jnp.asarray(x)), y) for x, y in batches])
    errors = weight_error(nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(params))
    return AccuracyResult(preset, sm.plan.summary().splitlines()[0], tuple(nats.tolist()),
                          tuple(ref.tolist()), stage_bytes(sm.program.storage, sm.params,
                                                           sm.plan), errors, build_s, eval_s)


# ---- decode -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Built:
    preset: str
    g_new: lwjax.Generator
    g_one: lwjax.Generator
    build_s: float
    first_call_s: float = 0.0
    tokens_match: bool = False


def _decoded_tokens(model, prompt, preset: str, n: int) -> np.ndarray:
    """``models.generate``'s tokens for ``model`` holding ``preset``'s decoded weights (the
    codecs are deterministic: ``layerwise_shard`` encodes the same weights the same way)."""
    if preset == "none":
        return np.asarray(models.generate(model, prompt, n))
    sm = lwjax.layerwise_shard(model, prompt, devices=jax.devices()[:1], compression=preset,
                               cache_bytes=2**30, microbatches=1, allow=())
    decoded = nnx.clone(model)
    nnx.update(decoded, jax.device_put(sm.export_params(), jax.devices()[0]))
    return np.asarray(models.generate(decoded, prompt, n))


def measure_decode(scale: Scale, repeats: int | None = None) -> tuple[list[DecodeResult], str]:
    """Every decode preset built at N and 1 tokens, checked, then timed interleaved."""
    cfg = dataclasses.replace(decode.cpu_config("dense", scale.decode_layers),
                              batch_size=scale.batch_decode, seq_len=scale.prompt_len)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(0), (scale.batch_decode, scale.prompt_len), 0,
                                cfg.vocab_size, jnp.int32)
    n, devices = scale.new_tokens, jax.devices()[:scale.decode_stages]
    built = []
    for preset in scale.decode_presets:
        _common.step(f"  decode {preset}: building (N={n} and 1), compiling, checking tokens")
        start = time.perf_counter()
        g = lwjax.layerwise_generate(model, prompt, max_new_tokens=n, devices=devices,
                                     objective="bottleneck", cache_bytes=2**30,
                                     microbatches=scale.decode_stages, compression=preset)
        g1 = lwjax.layerwise_generate(model, prompt, max_new_tokens=1, devices=devices,
                                      plan=g.plan, cache_len=g.cache_len)
        b = _Built(preset, g, g1, time.perf_counter() - start)
        start = time.perf_counter()
        got = np.asarray(jax.block_until_ready(g(prompt)))
        b.first_call_s = time.perf_counter() - start
        want = _decoded_tokens(model, prompt, preset, n)
        b.tokens_match = bool(np.array_equal(got, want)
                              and np.array_equal(np.asarray(g1(prompt)), want[:, :1]))
        if not b.tokens_match:
            _common.step(f"  WARNING decode {preset}: tokens differ from models.generate")
        built.append(b)
    repeats = repeats or scale.repeats
    _common.step(f"  timing {2 * len(built)} calls, {repeats} interleaved rounds")
    fns = {}
    for b in built:
        fns[b.preset, "new"] = lambda g=b.g_new: g(prompt)
        fns[b.preset, "one"] = lambda g=b.g_one: g(prompt)
    t = _common.measure_interleaved(fns, repeats=repeats, retries=1)
    out = [DecodeResult(b.preset, len(b.g_new.plan.stages), b.g_new.plan.microbatches,
                        scale.batch_decode, n, t[b.preset, "new"], t[b.preset, "one"],
                        b.build_s, b.first_call_s, b.tokens_match,
                        stage_bytes(b.g_new.program(scale.prompt_len).storage, b.g_new.params,
                                    b.g_new.plan))
           for b in built]
    words = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
             f"{cfg.head_dim}, MLP {cfg.mlp_hidden_size}, vocab {cfg.vocab_size}, float32, "
             f"random weights; B = {scale.batch_decode} prompts of T = {scale.prompt_len} "
             f"tokens, N = {n} new tokens")
    return out, words


# ---- projected ----------------------------------------------------------------------------


def _scaled(work, ratio: float):
    """An end's work with its weight bytes (read and resident) scaled by ``ratio``."""
    return dataclasses.replace(
        work, cost=dataclasses.replace(work.cost, weight_bytes=work.cost.weight_bytes * ratio),
        resident_bytes=work.resident_bytes * ratio)


def project_ring(cfg, hw: hardware.HardwareSpec, microbatches: int, ratios: dict[str, float]
                 ) -> tuple[float, float, bool]:
    """The cost model's ring decode (one block per stage, tp = 1) with the block's, the head's
    and the embedding's weight bytes scaled by ``ratios`` ("block", "head", "embed": stored /
    uncompressed). Returns (TPOT seconds, tick seconds, the busiest stage's weights fit L2).

    All ratios 1 give ``cost.project_decode`` exactly (checked by the tests). The cost model
    has no compression parameter, so this reaches its decode pass (``cost._pass_times``)
    directly rather than copying it.
    """
    stages = (1,) * cfg.num_layers
    entry = cost.DECODE_SCHEDULES["ring"]
    mb = cfg.batch_size // microbatches
    ends = entry.ends(cfg, hw, num_stages=len(stages), tp=1, microbatch=mb, tokens=1)
    ends = dataclasses.replace(ends, first=tuple(_scaled(w, ratios["embed"]) for w in ends.first),
                               last=tuple(_scaled(w, ratios["head"]) for w in ends.last))
    block = cost.decode_block_cost(cfg, batch_size=mb, cache_len=cfg.seq_len)
    block = dataclasses.replace(block, weight_bytes=block.weight_bytes * ratios["block"])
    step = cost._pass_times(cfg, hw, stages, 1, microbatches, ends, block, 1, hw.l2_bytes)
    period = entry.period_ticks(len(stages), microbatches)
    held = max(block.weight_bytes + sum(w.resident_bytes for w in ends.first),
               block.weight_bytes + sum(w.resident_bytes for w in ends.last))
    return period * step.tick_s + step.outside_s, step.tick_s, held <= hw.l2_bytes


def project(presets: Sequence[str], name: str = PROJECTED_CONFIG,
            hw: hardware.HardwareSpec = PROJECTED_ON) -> list[ProjectedResult]:
    """Each preset's stored bytes from a 16-stage decode plan at ``name``'s dimensions, then
    the ring's TPOT at its best M with those bytes (projected)."""
    cfg = getattr(models.configs, name)()
    abstract = models.abstract(cfg)
    prompt = jax.ShapeDtypeStruct((cfg.batch_size, 16), jnp.int32)
    out, base = [], None
    for preset in presets:
        # the KV cache of cfg.seq_len positions (1.25 GiB per layer at B=128) fits no L2:
        # plan against HBM, weights only, to read the stored bytes per layer
        plan = lwjax.plan(abstract, prompt, num_devices=cfg.num_layers, hardware=hw,
                          compression=preset, mode="decode", cache_len=cfg.seq_len,
                          residency="weights", cache_bytes=hw.hbm_bytes,
                          objective="bottleneck", allow=())
        nums = plan.numbers
        sizes = {"block": nums.footprints[1].weights_bytes,
                 "head": nums.epilogue.weights_bytes, "embed": nums.prologue.weights_bytes}
        base = base or sizes
        ratios = {k: sizes[k] / base[k] for k in sizes}
        best = None
        for m in (d for d in range(1, cfg.batch_size + 1) if cfg.batch_size % d == 0):
            tpot, tick, fits = project_ring(cfg, hw, m, ratios)
            if best is None or tpot < best[0]:
                best = (tpot, tick, fits, m)
        tpot, tick, fits, m = best
        other = cost.decode_block_cost(cfg, batch_size=cfg.batch_size // m,
                                       cache_len=cfg.seq_len).activation_bytes
        out.append(ProjectedResult(preset, sizes["block"], sizes["head"], sizes["embed"],
                                   max(s.est_time_s for s in plan.stages) * 1e3, tpot * 1e3,
                                   cfg.batch_size / tpot, m, tick * 1e3, fits, int(other)))
    return out


# ---- driver -------------------------------------------------------------------------------


def run(scale: Scale, repeats: int | None = None, model_path=MODEL_PATH) -> Result:
    """Measures accuracy and bytes, then decode, then projects the seed configuration."""
    start = time.perf_counter()
    model, cfg, meta = bytelm.load_trained_with_meta(model_path)
    _common.step("reading the held-out text")
    batches, heldout = heldout_windows(meta, cfg.seq_len, scale)
    graphdef, _ = nnx.split(model)
    single = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    accuracy = []
    for preset in scale.ppl_presets:
        _common.step(f"accuracy {preset}: {scale.windows} windows through {scale.stages} "
                     "stages and on one device")
        r = measure_accuracy(model, batches, preset, scale, single)
        _common.step(f"  {r.nats:.5f} nats/byte, one device {r.single_nats:.5f}, "
                     f"{r.stored_bytes:,} bytes stored")
        accuracy.append(r)
    _common.step("decode")
    measured, decode_config = measure_decode(scale, repeats)
    _common.step(f"projecting {PROJECTED_CONFIG} on {PROJECTED_ON.name}")
    projected = project(scale.decode_presets)
    words = (f"dense transformer, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_heads} heads x {cfg.head_dim}, MLP {cfg.mlp_hidden_size}, vocabulary "
             f"{cfg.vocab_size} (bytes), sequence {cfg.seq_len}, float32, trained "
             f"{meta['steps']} steps by experiments/train.py ({model_path.name})")
    return Result(scale, words, heldout, tuple(accuracy), tuple(measured), decode_config,
                  tuple(projected), time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> str:
    import weight_compression_report

    a = _common.parse_measured_args(__doc__, argv, "a few windows and presets, 4 layers "
                                    "decoding", NUM_DEVICES)
    result = run(QUICK if a.quick else FULL, repeats=a.repeats)
    text = weight_compression_report.markdown(result, _common.command_line(SCRIPT, argv),
                                       quick=a.quick)
    print(text)
    if not a.no_write:
        suffix = "-quick" if a.quick else ""  # --quick never overwrites the full results
        path = _common.write_results(f"compression{suffix}.md", text,
                                     _common.output_dir(a.write_results))
        _common.step(f"written {path}")
    return text


if __name__ == "__main__":
    import weight_compression  # the report imports this file by that name: one set of records

    weight_compression.main()
