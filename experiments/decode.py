"""Decode: TPOT and tokens/s of greedy generation, layer-wise ring vs TP x PP, measured and
projected.

*Measured* on this machine (CPU, 16 simulated devices sharing its cores): a dense and a MoE
transformer (16 layers, 8 heads, 8 experts, float32) generate N new tokens for a batch of B
prompts of length T through

- ``lwjax.layerwise_generate``: the default plan (cache-aware against the host's L2; the
  planner picks S and M) and a sweep over S in {2, 4, 8, 16} stages (one per device,
  ``objective="bottleneck"``, ``cache_bytes=2**30``) with M in {S, 2S} where M divides B;
- ``lwjax.baselines.tp_pp_generate``: TP=8 x PP=2 over M in the divisors of B up to 16, and
  the other layouts of the 16 devices that the model's heads, experts and vocabulary admit
  (TP=4 x PP=4, TP=16 x PP=1, TP=2 x PP=8) at M = 1 (the best M of every TP x PP layout in
  a trial run; more would add compile time, see FULL);
- ``lwjax.baselines.single_device_generate``.

Every generator is built twice, for N tokens and for 1 (the layer-wise one at 1 token runs the
N-token generator's plan), all calls timed interleaved (``_common.measure_interleaved``,
medians). TPOT = (t(N) - t(1)) / (N - 1): the time between two tokens of one sequence, the
prompt's prefill and the first token subtracted; decode tokens/s = B / TPOT; end-to-end
tokens/s = B * N / t(N). Every method's tokens are checked against ``models.generate``.

*Projected* (``lwjax.passes.cost.project_decode_comparison``, H100 SXM5): the seed dimensions,
beside the seed documents' TPOT claims.

This module measures and returns records; ``decode_report.py`` formats them. Run from the
repository root::

    python experiments/decode.py [--quick] [--repeats 3] [--write-results]

It writes ``decode.md`` and ``decode.png`` (``--quick``: ``decode-quick.*``) to
``experiments/out/`` (git-ignored); ``--write-results`` writes ``experiments/results/``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(16)  # before anything touches a device; under pytest conftest did

import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Literal  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import baselines, hardware, models  # noqa: E402
from lwjax.errors import InfeasiblePlanError  # noqa: E402
from lwjax.passes import cost  # noqa: E402

SCRIPT = "experiments/decode.py"
NUM_DEVICES = 16
BASELINE = (8, 2)  # the tracker's TP x PP baseline
GOAL = 1.2  # the tracker: layer-wise decode tokens/s >= 1.2 x TP=8 x PP=2 at equal batch
PROJECTED_ON = hardware.H100_SXM
PROJECTED_CONFIGS = ("seed_dense", "seed_moe", "seed004_dense", "seed004_moe")

Family = Literal["layerwise_default", "layerwise", "tp_pp", "single"]


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one measured run and the configurations it sweeps.

    Attributes:
        num_layers, batch, prompt_len, new_tokens: the model depth, B, T and N.
        repeats: interleaved rounds timed (medians).
        stages: layer-wise stage counts S swept (one stage per device).
        group_multiples: layer-wise M = k * S for k in these (where M divides B).
        layouts: (tp, pp) layouts of the baseline; the first is the tracker's.
        baseline_microbatches: M tried for the first layout (None: divisors of B up to 16).
        other_microbatches: M tried for the other layouts (where M divides B).
        default_plan: also run the planner's default (cache-aware) plan.
    """

    num_layers: int
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    stages: tuple[int, ...]
    group_multiples: tuple[int, ...] = (1, 2)
    layouts: tuple[tuple[int, int], ...] = (BASELINE, (4, 4), (16, 1), (2, 8))
    baseline_microbatches: tuple[int, ...] | None = None
    other_microbatches: tuple[int, ...] = (1,)
    default_plan: bool = True


FULL = Scale(num_layers=16, batch=16, prompt_len=16, new_tokens=16, repeats=3,
             stages=(2, 4, 8, 16))
QUICK = Scale(num_layers=16, batch=16, prompt_len=8, new_tokens=4, repeats=2, stages=(4, 16),
              group_multiples=(1,), layouts=(BASELINE, (16, 1)), baseline_microbatches=(1, 2))


def cpu_config(kind: str, num_layers: int = 16):
    """The tiny configs at ``num_layers`` layers, 8 heads x 8 (tp=8 divides them), 8 experts
    (MoE), float32."""
    base = models.configs.tiny_moe() if kind == "moe" else models.configs.tiny_dense()
    changes = dict(num_layers=num_layers, num_heads=8, head_dim=8, dtype=jnp.dtype(jnp.float32))
    if kind == "moe":
        changes["num_experts"] = 8
    return dataclasses.replace(base, **changes)


# ---- records ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One deployment generating N tokens and 1 token, timed interleaved with the others.

    Attributes:
        family: which deployment ("layerwise_default": the planner's default plan).
        label: e.g. "layer-wise S=4, M=8".
        stages: pipeline stages S (pp for TP x PP, 1 for one device).
        tp: devices per stage.
        microbatches: M.
        devices: devices the program runs on.
        period_ticks: pipeline ticks between two tokens of one sequence (ring: max(M, S);
            GPipe: M + pp - 1; one device: 1).
        decode_ticks: ticks of the N-token call's decode phase (the N-token program's decode
            ticks minus the 1-token program's).
        batch, new_tokens: B and N.
        t_new, t_one: call times generating N tokens and 1 token.
        build_s: constructing both generators (trace, plan, place weights and caches).
        first_call_s: the N-token generator's first call (compile + one run).
        compile_s: the N-token program's compile time as lwjax measured it (layer-wise only).
        tokens_match: both calls returned ``models.generate``'s tokens.
        plan: the layer-wise plan and schedule (layer-wise only).
        note: how the 1-token generator differs from the N-token one beyond N, if it does.
    """

    family: Family
    label: str
    stages: int
    tp: int
    microbatches: int
    devices: int
    period_ticks: int
    decode_ticks: int
    batch: int
    new_tokens: int
    t_new: _common.Timing
    t_one: _common.Timing
    build_s: float
    first_call_s: float
    compile_s: float | None
    tokens_match: bool
    plan: str | None = None
    note: str | None = None

    @property
    def decode_s(self) -> float:
        """Median time of the N - 1 decode steps: t(N) - t(1)."""
        return self.t_new.median - self.t_one.median

    @property
    def tpot_ms(self) -> float:
        """Milliseconds between two tokens of one sequence: (t(N) - t(1)) / (N - 1)."""
        return 1e3 * self.decode_s / (self.new_tokens - 1)

    @property
    def decode_tps(self) -> float:
        """Decode tokens/s over the batch: B / TPOT."""
        return self.batch * 1e3 / self.tpot_ms

    @property
    def e2e_tps(self) -> float:
        """End-to-end tokens/s, prefill included: B * N / t(N)."""
        return self.batch * self.new_tokens / self.t_new.median

    @property
    def tick_ms(self) -> float:
        """Milliseconds per decode tick: (t(N) - t(1)) / decode ticks."""
        return 1e3 * self.decode_s / self.decode_ticks


@dataclasses.dataclass(frozen=True)
class ModelResult:
    """One model's measured decode: every deployment, in one interleaved run.

    Attributes:
        kind: "dense" or "moe".
        config: the model's dimensions in words.
        batch, prompt_len, new_tokens, repeats: B, T, N and the interleaved rounds.
        methods: the deployments timed.
        skipped: layouts not run, each with its reason.
        measure_s: wall time of this model's measurement (build, compile, check, time).
    """

    kind: str
    config: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    methods: tuple[MethodResult, ...]
    skipped: tuple[str, ...]
    measure_s: float

    def family(self, family: Family) -> list[MethodResult]:
        return [m for m in self.methods if m.family == family]

    def best(self, family: Family, layout: tuple[int, int] | None = None) -> MethodResult | None:
        """The highest decode tokens/s of ``family`` (and TP x PP ``layout``) among methods
        whose tokens matched the reference; None when there is none."""
        ok = [m for m in self.family(family) if m.tokens_match
              and (layout is None or (m.tp, m.stages) == layout)]
        return max(ok, key=lambda m: m.decode_tps, default=None)


@dataclasses.dataclass(frozen=True)
class ProjectedResult:
    """``cost.project_decode_comparison`` for one seed configuration (projected, not measured)."""

    config: str
    kind: str
    batch: int
    seq_len: int
    hbm_bytes: int
    layerwise: cost.DecodeComparison
    tp_pp: cost.DecodeComparison


# ---- measured -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Built:
    """A deployment built at N and at 1 token, before timing."""

    family: Family
    label: str
    stages: int
    tp: int
    microbatches: int
    devices: int
    period_ticks: int
    decode_ticks: int
    call_new: Callable[[], jax.Array]
    call_one: Callable[[], jax.Array]
    build_s: float
    first_call_s: float = 0.0
    compile_s: float | None = None
    tokens_match: bool = False
    plan: str | None = None
    generator: lwjax.Generator | None = None  # layer-wise: compile_seconds after a call
    note: str | None = None


def _layerwise(family: Family, label: str, model, prompt, n: int, **kwargs) -> _Built:
    start = time.perf_counter()
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=n, **kwargs)
    # The 1-token generator: the same arguments and M, a cache of T + 1 positions as the
    # baselines' 1-token generators hold; where that plans other stages (less KV cache per
    # stage), the N-token plan itself with its cache length.
    g1 = lwjax.layerwise_generate(model, prompt, max_new_tokens=1,
                                  **{**kwargs, "microbatches": g.plan.microbatches})
    note = None
    if _ranges(g1.plan) != _ranges(g.plan):
        note = (f"at 1 token the same arguments plan {len(g1.plan.stages)} stages, not "
                f"{len(g.plan.stages)}: t(1) runs the N-token plan with its cache of "
                f"{g.cache_len} positions")
        g1 = lwjax.layerwise_generate(model, prompt, max_new_tokens=1,
                                      devices=kwargs.get("devices"), plan=g.plan,
                                      cache_len=g.cache_len)
    build_s = time.perf_counter() - start
    s, m = len(g.plan.stages), g.plan.microbatches
    t = prompt.shape[1]
    ticks = g.program(t).ticks[1] - g1.program(t).ticks[1]
    return _Built(family, label.format(s=s, m=m), s, 1, m, s, max(m, s), ticks,
                  lambda: g(prompt), lambda: g1(prompt), build_s,
                  plan=f"{g.plan.summary()}\n{g.schedule()}", generator=g, note=note)


def _ranges(plan) -> tuple:
    return tuple((s.layer_range, s.devices) for s in plan.stages)


def _tp_pp(model, prompt, n: int, tp: int, pp: int, m: int) -> _Built:
    start = time.perf_counter()
    devices = jax.devices()[:tp * pp]
    b = baselines.tp_pp_generate(model, prompt, max_new_tokens=n, devices=devices, tp=tp,
                                 pp=pp, microbatches=m)
    b1 = baselines.tp_pp_generate(model, prompt, max_new_tokens=1, devices=devices, tp=tp,
                                  pp=pp, microbatches=m)
    return _Built("tp_pp", f"TP={tp} x PP={pp}, M={m}", pp, tp, m, tp * pp, m + pp - 1,
                  (n - 1) * (m + pp - 1), lambda: b(prompt), lambda: b1(prompt),
                  time.perf_counter() - start)


def _single(model, prompt, n: int) -> _Built:
    start = time.perf_counter()
    s = baselines.single_device_generate(model, prompt, max_new_tokens=n)
    s1 = baselines.single_device_generate(model, prompt, max_new_tokens=1)
    return _Built("single", "single device", 1, 1, 1, 1, 1, n - 1, lambda: s(prompt),
                  lambda: s1(prompt), time.perf_counter() - start)


def layout_skip_reason(cfg, tp: int, pp: int) -> str | None:
    """Why ``tp_pp_generate`` cannot run TP=tp x PP=pp on ``cfg``; None when it can."""
    why = [f"{tp} does not divide the {cfg.num_heads} heads" if cfg.num_heads % tp else "",
           f"{tp} does not divide the vocabulary {cfg.vocab_size}" if cfg.vocab_size % tp else "",
           f"{pp} does not divide the {cfg.num_layers} layers" if cfg.num_layers % pp else ""]
    if cfg.is_moe and cfg.num_experts % tp:
        why.append(f"{tp} does not divide the {cfg.num_experts} experts")
    why = [w for w in why if w]
    return "; ".join(why) if why else None


def _deployments(cfg, model, prompt, scale: Scale) -> tuple[list[_Built], list[str]]:
    """Every deployment of the sweep, built (weights placed), nothing compiled."""
    n, b = scale.new_tokens, scale.batch
    built, skipped = [], []
    if scale.default_plan:
        _common.step("  layer-wise, default plan (cache-aware against the host L2)")
        try:
            built.append(_layerwise("layerwise_default", "layer-wise default plan (S={s}, M={m})",
                                    model, prompt, n))
        except InfeasiblePlanError as e:
            skipped.append(f"layer-wise default plan: {_common.explain_infeasible(e)}")
    for s in scale.stages:
        for m in sorted({k * s for k in scale.group_multiples if b % (k * s) == 0}):
            _common.step(f"  layer-wise S={s}, M={m}")
            built.append(_layerwise("layerwise", "layer-wise S={s}, M={m}", model, prompt, n,
                                    devices=jax.devices()[:s], objective="bottleneck",
                                    cache_bytes=2**30, microbatches=m))
        if not any(b % (k * s) == 0 for k in scale.group_multiples):
            skipped.append(f"layer-wise S={s}: no M in "
                           f"{[k * s for k in scale.group_multiples]} divides B={b}")
    for i, (tp, pp) in enumerate(scale.layouts):
        why = layout_skip_reason(cfg, tp, pp)
        if why is None and tp * pp > len(jax.devices()):
            why = f"needs {tp * pp} devices"
        if why:
            skipped.append(f"TP={tp} x PP={pp}: {why}")
            continue
        if i == 0:
            counts = scale.baseline_microbatches or tuple(d for d in range(1, 17) if b % d == 0)
        else:
            counts = scale.other_microbatches
        for m in counts:
            if b % m:
                continue
            _common.step(f"  TP={tp} x PP={pp}, M={m}")
            built.append(_tp_pp(model, prompt, n, tp, pp, m))
    _common.step("  single device")
    built.append(_single(model, prompt, n))
    return built, skipped


def measure_model(kind: str, scale: Scale, repeats: int | None = None) -> ModelResult:
    """Builds every deployment of ``scale`` for ``kind`` ("dense" / "moe"), compiles each and
    checks its tokens against ``models.generate`` (first calls), then times all calls
    interleaved: ``repeats`` rounds after one warm-up round."""
    start = time.perf_counter()
    cfg = dataclasses.replace(cpu_config(kind, scale.num_layers), batch_size=scale.batch,
                              seq_len=scale.prompt_len)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(0), (scale.batch, scale.prompt_len), 0,
                                cfg.vocab_size, jnp.int32)
    n = scale.new_tokens
    if n < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decode steps, got {n}.")
    _common.step(f"{kind}: reference tokens (models.generate), building the deployments")
    want = np.asarray(models.generate(model, prompt, n))
    built, skipped = _deployments(cfg, model, prompt, scale)
    _common.step(f"{kind}: compiling {2 * len(built)} programs, checking tokens")
    for d in built:
        t0 = time.perf_counter()
        got = np.asarray(jax.block_until_ready(d.call_new()))
        d.first_call_s = time.perf_counter() - t0
        one = np.asarray(d.call_one())
        d.tokens_match = bool(np.array_equal(got, want) and np.array_equal(one, want[:, :1]))
        if d.generator is not None:
            d.compile_s = d.generator.compile_seconds.get(scale.prompt_len)
        if not d.tokens_match:
            _common.step(f"  WARNING {d.label}: tokens differ from models.generate")
    repeats = repeats or scale.repeats
    _common.step(f"{kind}: timing {2 * len(built)} calls, {repeats} interleaved rounds")
    fns = {}
    for i, d in enumerate(built):
        fns[(i, "new")], fns[(i, "one")] = d.call_new, d.call_one
    timings = _common.measure_interleaved(fns, repeats=repeats, retries=1)
    methods = tuple(
        MethodResult(d.family, d.label, d.stages, d.tp, d.microbatches, d.devices,
                     d.period_ticks, d.decode_ticks, scale.batch, n, timings[(i, "new")],
                     timings[(i, "one")], d.build_s, d.first_call_s, d.compile_s,
                     d.tokens_match, d.plan, d.note)
        for i, d in enumerate(built))
    experts = f", {cfg.num_experts} experts top-{cfg.experts_per_token}" if cfg.is_moe else ""
    config = (f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads x "
              f"{cfg.head_dim}, MLP {cfg.mlp_hidden_size}{experts}, vocab {cfg.vocab_size}, "
              f"float32")
    return ModelResult(kind, config, scale.batch, scale.prompt_len, n, repeats, methods,
                       tuple(skipped), time.perf_counter() - start)


# ---- projected ------------------------------------------------------------------------------


def project(names: Sequence[str] = PROJECTED_CONFIGS,
            hw: hardware.HardwareSpec = PROJECTED_ON) -> list[ProjectedResult]:
    """Layer-wise ring (16 stages) vs TP=8 x PP=2 GPipe, each at its best M (projected)."""
    out = []
    for name in names:
        cfg = getattr(models.configs, name)()
        lw, base = cost.project_decode_comparison(cfg, hw)
        out.append(ProjectedResult(name, "moe" if cfg.is_moe else "dense", cfg.batch_size,
                                   cfg.seq_len, hw.hbm_bytes, lw, base))
    return out


# ---- the seed documents' claims (quoted beside lwjax's figures, never used as results) -------


@dataclasses.dataclass(frozen=True)
class Claim:
    """A decode figure one of the seed documents states."""

    kind: str
    method: Literal["tp_pp", "layerwise"]
    tps: float
    tpot_ms: float
    source: str


CLAIMS = (
    Claim("dense", "tp_pp", 12_800, 0.078, "004 (also 000, 001)"),
    Claim("dense", "layerwise", 15_360, 0.065, "004 (also 000, 001)"),
    Claim("moe", "tp_pp", 10_200, 0.098, "004"),
    Claim("moe", "layerwise", 13_400, 0.075, "004"),
)
CLAIMED_TPOT_CHANGE = {"dense": -0.17, "moe": -0.23}  # seed 004's text (000: 17% +- 0.3%)
SEED_002 = ("seed 002 (2-layer dense, m x n = 16 head/dimension split, not layer-wise): "
            "TPOT 0.35 ms (TP=8 x PP=2) vs 0.22 ms, defined as 'synchronization and "
            "communication overhead time per token'")


# ---- driver ---------------------------------------------------------------------------------


def run(scale: Scale, kinds: Sequence[str] = ("dense", "moe"),
        repeats: int | None = None) -> tuple[list[ModelResult], list[ProjectedResult]]:
    """Measures every kind at ``scale`` and projects the seed configurations."""
    measured = []
    for kind in kinds:
        r = measure_model(kind, scale, repeats)
        measured.append(r)
        base, lw = r.best("tp_pp", BASELINE), r.best("layerwise")
        if base and lw:
            _common.step(f"{kind}: best layer-wise {lw.label} {lw.decode_tps:,.0f} tokens/s, "
                         f"best TP=8 x PP=2 {base.label} {base.decode_tps:,.0f} tokens/s")
    return measured, project()


def main(argv: Sequence[str] | None = None) -> str:
    import decode_report

    a = _common.parse_measured_args(__doc__, argv, "small sizes, a reduced sweep", NUM_DEVICES)
    scale = QUICK if a.quick else FULL
    measured, projected = run(scale, repeats=a.repeats)
    text = decode_report.markdown(measured, projected, _common.command_line(SCRIPT, argv),
                                  quick=a.quick)
    print(text)
    if not a.no_write:
        out = _common.output_dir(a.write_results)
        suffix = "-quick" if a.quick else ""  # --quick never overwrites the full results
        path = _common.write_results(f"decode{suffix}.md", text, out)
        png = decode_report.figure(measured, projected, out / f"decode{suffix}.png")
        _common.step(f"written {path} and {png}")
    return text


if __name__ == "__main__":
    import decode  # the report imports this file as "decode": one module, one set of records

    decode.main()
