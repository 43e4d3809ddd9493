"""Train: a byte-level decoder LM trained through the layer-wise pipeline and on one device.

*Measured* on this machine (CPU, 8 simulated devices sharing its cores): lwjax's dense
transformer (float32, vocabulary 256) learns next-byte prediction on the Python standard
library's own source (``bytelm.corpus``: a fixed byte budget of ``.py`` files, every 10th
file held out) with ``optax.adamw`` (cosine learning rate, global-norm clipping),
twice in the same run, from the same initial weights on the same batches:

- ``lwjax.layerwise_shard(...).train_step(loss_fn, optimizer, schedule="1f1b")``: one stage
  per layer on ``stages`` devices, M microbatches (gradient accumulation over the batch);
  the plan uses H100 costs and ``objective="bottleneck"`` so that it is one layer per device
  on every machine (the host CPU's measured speeds would make it vary between runs);
- a plain ``nnx.Optimizer`` step under ``nnx.jit`` on one device.

Each step runs both methods one after the other (alternating which goes first), so both see
the same machine load; tokens/s is the batch's tokens over the median step time (the first
two steps, which compile, left out). Held-out loss: every ``eval_every`` steps, on a fixed
set of windows of the held-out files, each method's current weights evaluated by the same
jitted single-device forward (the pipeline's exported with ``TrainStep.export_params``).
The curves must agree to float32 noise: the report states the largest differences measured.

The pipeline-trained weights are saved with ``flax.serialization`` (``bytelm.save_trained``);
``bytelm.load_trained(path) -> (model, cfg)`` loads them for later experiments.

This module measures and returns records; ``train_report.py`` formats them. Run from the
repository root::

    python experiments/train.py [--quick | --long] [--steps N] [--write-results]

It writes ``train.md``, ``train.png`` and ``train_model.msgpack`` (``--quick``:
``train-quick.*``; ``--long``: ``train-long.*``) to ``experiments/out/`` (git-ignored);
``--write-results`` writes ``experiments/results/`` (the weights only when under 10 MB).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402

_common.use_cpu_devices(8)  # before anything touches a device; under pytest conftest did

import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Literal  # noqa: E402

import bytelm  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models  # noqa: E402

SCRIPT = "experiments/train.py"
MAX_COMMITTED_BYTES = 10 * 2**20  # weights larger than this stay in experiments/out/
# The curves agree when no train or held-out loss differs by more than this (nats): float32
# rounding differs between the pipeline's per-stage programs and the one-device program, and
# adam turns a gradient's rounding into a weight change of up to lr; over hundreds of steps
# such differences grow but stay orders of magnitude below the loss's own step-to-step noise.
AGREE_NATS = 1e-3


@dataclasses.dataclass(frozen=True)
class Scale:
    """The model, the batches and the run's length.

    Attributes:
        num_layers, hidden_size, num_heads, head_dim, mlp_hidden_size, seq_len: the model
            (dense, float32, vocabulary 256).
        batch: sequences per step (tokens per step: batch * seq_len).
        microbatches: M of the pipeline.
        stages: pipeline stages, one device each (must divide num_layers evenly: one plan).
        steps: optimizer steps.
        eval_every: held-out loss every this many steps (and after the last).
        eval_batches: held-out batches of ``batch`` windows each.
        learning_rate: the first step's learning rate; cosine decay to a tenth of it at
            the last step.
        schedule: the pipeline's training schedule.
        corpus: which bytes are read.
    """

    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    head_dim: int = 32
    mlp_hidden_size: int = 512
    seq_len: int = 128
    batch: int = 16
    microbatches: int = 4
    stages: int = 4
    steps: int = 300
    eval_every: int = 50
    eval_batches: int = 8
    learning_rate: float = 3e-3
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    corpus: bytelm.CorpusSpec = bytelm.CorpusSpec()

    def __post_init__(self) -> None:
        if self.batch % self.microbatches:
            raise ValueError(f"batch {self.batch} must divide into {self.microbatches} "
                             "microbatches.")
        if self.steps < 3:
            raise ValueError(f"steps must be >= 3 (two compile, one is timed), got {self.steps}.")

    def config(self) -> models.configs.DenseConfig:
        return models.configs.DenseConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
            head_dim=self.head_dim, mlp_hidden_size=self.mlp_hidden_size,
            vocab_size=bytelm.VOCAB_SIZE, batch_size=self.batch, seq_len=self.seq_len,
            dtype=jnp.dtype(jnp.float32))


DEFAULT = Scale()
QUICK = Scale(num_layers=2, hidden_size=64, num_heads=4, head_dim=16, mlp_hidden_size=256,
              seq_len=64, batch=8, microbatches=2, stages=2, steps=20, eval_every=10,
              eval_batches=2, corpus=bytelm.CorpusSpec(budget_bytes=2**19))
LONG = dataclasses.replace(DEFAULT, steps=2000, eval_every=100)


# ---- records ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Curve:
    """One method's training run.

    Attributes:
        method: "pipeline" or "single".
        label: how the report names it.
        train_loss: the loss of every step's batch, before its update (nats per byte).
        eval_steps: the steps after which the held-out loss was measured (0: initial weights).
        heldout_loss: the held-out loss at those steps.
        step_s: wall seconds of every step (the first two compile).
        setup_s: seconds to build the method (the pipeline: trace, plan, lower).
    """

    method: Literal["pipeline", "single"]
    label: str
    train_loss: tuple[float, ...]
    eval_steps: tuple[int, ...]
    heldout_loss: tuple[float, ...]
    step_s: tuple[float, ...]
    setup_s: float

    @property
    def timing(self) -> _common.Timing:
        """The steps after the two that compile."""
        return _common.Timing(self.step_s[2:])

    @property
    def compile_s(self) -> float:
        """The first two steps' seconds beyond two timed steps: compilation (and warm-up)."""
        return sum(self.step_s[:2]) - 2 * self.timing.median

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step / self.timing.median

    def final_train(self, last: int = 10) -> float:
        """Mean train loss of the last ``last`` steps (one batch's loss is noisy)."""
        return float(np.mean(self.train_loss[-last:]))


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """Both runs, how far apart they are, and where the trained weights went.

    Attributes:
        scale: what was run.
        num_params: trainable parameters.
        corpus: ``bytelm.Corpus.summary()``.
        corpus_sha256: digest of the corpus bytes.
        plan: each stage's layers, e.g. ("layers 0-0", ...).
        pipeline, single: the two runs.
        max_train_diff: max over steps of |train loss pipeline - single| (nats).
        max_heldout_diff: max over evaluations of |held-out loss difference| (nats).
        max_weight_diff: max |w_pipeline - w_single| over all weights after the last step.
        max_weight: max |w_single| (the scale of the weights).
        heldout_tokens: tokens per held-out evaluation.
        wall_s: seconds of the whole measurement (corpus, builds, both runs).
    """

    scale: Scale
    num_params: int
    corpus: str
    corpus_sha256: str
    plan: tuple[str, ...]
    pipeline: Curve
    single: Curve
    max_train_diff: float
    max_heldout_diff: float
    max_weight_diff: float
    max_weight: float
    heldout_tokens: int
    wall_s: float

    @property
    def tokens_per_step(self) -> int:
        return self.scale.batch * self.scale.seq_len

    @property
    def agree(self) -> bool:
        return max(self.max_train_diff, self.max_heldout_diff) <= AGREE_NATS

    @property
    def speed_ratio(self) -> float:
        """Pipeline tokens/s over single-device tokens/s."""
        return self.single.timing.median / self.pipeline.timing.median


# ---- training -----------------------------------------------------------------------------------


def loss_fn(logits_BTV, targets_BT):
    """Mean next-byte cross-entropy of one microbatch (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def optimizer(scale: Scale) -> optax.GradientTransformation:
    """adamw with a cosine learning rate, after global-norm clipping (both treat
    weights elementwise, so the pipeline runs them on its stage slots unchanged)."""
    # No warm-up: lwjax's check_optimizer (JAX 0.10.2) compares two updates' resulting
    # weights relative to the update's size, so the float32 rounding of w + u (1 ulp of w)
    # makes it refuse first updates below ~1e-3 of the weights (adamw(1e-4), or a warm-up
    # from 0) as "not elementwise".
    lr = optax.cosine_decay_schedule(scale.learning_rate, scale.steps, alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))


@nnx.jit
def _eval_loss(model, x, y):
    return loss_fn(model(x), y)


def heldout_loss(model, batches) -> float:
    """Mean loss over the held-out batches (all the same size), on one device."""
    return float(np.mean([float(_eval_loss(model, x, y)) for x, y in batches]))


def build_pipeline(scale: Scale, seed: int, tokens):
    """``(ShardedModel, TrainStep, TrainState, seconds)``: the model at seed ``seed`` (the
    one-device model's initial weights), one layer per stage, traced on ``tokens``."""
    start = time.perf_counter()
    model = models.build(scale.config(), rngs=nnx.Rngs(seed))
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices()[:scale.stages],
                               microbatches=scale.microbatches, cache_bytes=2**30,
                               objective="bottleneck", hardware="h100", allow=())
    if len(sm.plan.stages) != scale.stages:
        raise RuntimeError(f"the plan has {len(sm.plan.stages)} stages, the scale asks for "
                           f"{scale.stages}: {sm.plan.summary()}")
    step = sm.train_step(loss_fn, optimizer(scale), schedule=scale.schedule)
    state = step.init()
    return sm, step, state, time.perf_counter() - start


def train(scale: Scale, seed: int = 0) -> tuple[TrainResult, nnx.Module]:
    """Trains the model both ways; returns the record and the pipeline-trained model."""
    start = time.perf_counter()
    cfg = scale.config()
    data = bytelm.corpus(scale.corpus)
    _common.step(f"corpus: {data.summary()}")
    heldout = [(jnp.asarray(x), jnp.asarray(y)) for x, y in bytelm.heldout_batches(
        data.heldout, cfg.seq_len, scale.batch, scale.eval_batches)]
    batches = bytelm.train_batches(data.train, cfg.seq_len, scale.batch, seed=seed + 1)

    x0, _ = next(bytelm.train_batches(data.train, cfg.seq_len, scale.batch, seed=seed + 1))
    sm, pipe_step, state, pipe_setup = build_pipeline(scale, seed, jnp.asarray(x0))
    t = time.perf_counter()
    single_model = models.build(cfg, rngs=nnx.Rngs(seed))
    opt = nnx.Optimizer(single_model, optimizer(scale), wrt=nnx.Param)

    @nnx.jit
    def single_step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
        opt.update(model, grads)
        return loss

    single_setup = time.perf_counter() - t
    exported = models.build(cfg, rngs=nnx.Rngs(seed))  # the pipeline's weights, for eval
    num_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
        nnx.state(single_model, nnx.Param)))
    _common.step(f"model: {num_params:,} parameters; pipeline plan "
                 f"{[s.layer_range for s in sm.plan.stages]}, M = {sm.plan.microbatches}, "
                 f"{scale.schedule}")

    losses = {"pipeline": [], "single": []}
    times = {"pipeline": [], "single": []}
    evals: dict[str, list[float]] = {"pipeline": [], "single": []}
    eval_steps: list[int] = []

    def evaluate(k: int) -> None:
        if k:  # at step 0 ``exported`` holds the initial weights (same seed)
            nnx.update(exported, pipe_step.export_params(state))
        eval_steps.append(k)
        evals["pipeline"].append(heldout_loss(exported, heldout))
        evals["single"].append(heldout_loss(single_model, heldout))
        _common.step(f"step {k:5d}: held-out loss pipeline {evals['pipeline'][-1]:.4f}, "
                     f"single {evals['single'][-1]:.4f}")

    evaluate(0)
    for k in range(scale.steps):
        x, y = (jnp.asarray(a) for a in next(batches))

        for name in ("pipeline", "single") if k % 2 == 0 else ("single", "pipeline"):
            begin = time.perf_counter()
            if name == "pipeline":
                state, loss = pipe_step(state, x, y)
            else:
                loss = single_step(single_model, opt, x, y)
            losses[name].append(float(loss))  # float() waits for the step
            times[name].append(time.perf_counter() - begin)
        if (k + 1) % scale.eval_every == 0 or k + 1 == scale.steps:
            evaluate(k + 1)
        elif k < 3 or (k + 1) % 10 == 0:
            _common.step(f"step {k + 1:5d}: train loss pipeline {losses['pipeline'][-1]:.4f}, "
                         f"single {losses['single'][-1]:.4f}; {times['pipeline'][-1]:.2f} s / "
                         f"{times['single'][-1]:.2f} s")

    nnx.update(exported, pipe_step.export_params(state))
    got = jax.tree.leaves(nnx.state(exported, nnx.Param))
    want = jax.tree.leaves(nnx.state(single_model, nnx.Param))
    weight_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                      for a, b in zip(got, want, strict=True))
    max_weight = max(float(np.max(np.abs(np.asarray(b)))) for b in want)

    def curve(name, label, setup):
        return Curve(name, label, tuple(losses[name]), tuple(eval_steps), tuple(evals[name]),
                     tuple(times[name]), setup)

    pipe_label = (f"layer-wise pipeline ({scale.stages} stages x 1 device, M = "
                  f"{sm.plan.microbatches}, {scale.schedule})")
    result = TrainResult(
        scale=scale, num_params=num_params, corpus=data.summary(), corpus_sha256=data.sha256,
        plan=tuple(f"layers {s.layer_range[0]}-{s.layer_range[1] - 1}" for s in sm.plan.stages),
        pipeline=curve("pipeline", pipe_label, pipe_setup),
        single=curve("single", "one device (nnx.Optimizer, nnx.jit)", single_setup),
        max_train_diff=float(np.max(np.abs(np.subtract(losses["pipeline"], losses["single"])))),
        max_heldout_diff=float(np.max(np.abs(np.subtract(evals["pipeline"], evals["single"])))),
        max_weight_diff=weight_diff, max_weight=max_weight,
        heldout_tokens=scale.eval_batches * scale.batch * scale.seq_len,
        wall_s=time.perf_counter() - start)
    return result, exported


def checkpoint_meta(result: TrainResult) -> dict:
    """What ``bytelm.save_trained`` stores beside the weights: the corpus spec (to rebuild
    the held-out set) and the run's figures."""
    s = result.scale
    return {"corpus": dataclasses.asdict(s.corpus), "corpus_sha256": result.corpus_sha256,
            "trained_with": result.pipeline.label, "steps": s.steps, "batch": s.batch,
            "seq_len": s.seq_len, "eval_batches": s.eval_batches,
            "final_train_loss": result.pipeline.final_train(),
            "final_heldout_loss": result.pipeline.heldout_loss[-1],
            "jax": jax.__version__}


# ---- driver -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"a 2-layer model, {QUICK.steps} steps (tests)")
    size.add_argument("--long", action="store_true", help=f"{LONG.steps} steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides)")
    ap.add_argument("--schedule", choices=("gpipe", "1f1b"), default=None)
    ap.add_argument("--out-dir", type=pathlib.Path, default=None,
                    help="write here instead of experiments/out/ (tests)")
    _common.add_output_flags(ap)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    import train_report

    a = parse_args(argv)
    scale, suffix = (QUICK, "-quick") if a.quick else (LONG, "-long") if a.long else (DEFAULT, "")
    if a.steps is not None:
        scale = dataclasses.replace(scale, steps=a.steps)
        suffix = suffix or ("" if a.steps == DEFAULT.steps else f"-{a.steps}")
    if a.schedule is not None:
        scale = dataclasses.replace(scale, schedule=a.schedule)
    _common.step(f"machine: {_common.machine_line()}")
    result, model = train(scale)
    text = train_report.markdown(result, _common.command_line(SCRIPT, argv))
    print(text)
    if not a.no_write:
        out = a.out_dir or _common.output_dir(a.write_results)
        path = _common.write_results(f"train{suffix}.md", text, out)
        png = train_report.figure(result, out / f"train{suffix}.png")
        weights = bytelm.save_trained(out / f"train_model{suffix}.msgpack", model,
                                      scale.config(), checkpoint_meta(result))
        if a.write_results and weights.stat().st_size >= MAX_COMMITTED_BYTES:
            _common.OUT.mkdir(parents=True, exist_ok=True)  # too large to commit
            weights = weights.rename(_common.OUT / weights.name)
        _common.step(f"written {path}, {png} and {weights} ({weights.stat().st_size:,} bytes)")
    _common.step(f"done; {result.wall_s:.0f} s measuring; curves agree: {result.agree}")
    return text


if __name__ == "__main__":
    import train  # the report imports this file as "train": one module, one set of records

    train.main()
