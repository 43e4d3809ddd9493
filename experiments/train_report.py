"""The report of ``experiments/train.py``: its record as Markdown tables and a loss figure.

Nothing here measures: every figure comes from a ``train.TrainResult``.

Example:
    >>> text = markdown(result, "python experiments/train.py")
    >>> figure(result, pathlib.Path("experiments/out/train.png"))
"""

from __future__ import annotations

import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common  # noqa: E402
import train  # noqa: E402


def bits_per_byte(nats: float) -> float:
    """A byte-level model's loss in bits per byte (its vocabulary is the 256 bytes)."""
    return nats / math.log(2)


def config_line(r: train.TrainResult) -> str:
    s = r.scale
    return (f"dense transformer, {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads} "
            f"heads x {s.head_dim}, MLP {s.mlp_hidden_size}, vocabulary 256 (bytes), sequence "
            f"{s.seq_len}, float32; {r.num_params:,} parameters")


def optimizer_line(s: train.Scale) -> str:
    return (f"optax.adamw (weight decay 0.01) after clip_by_global_norm(1.0); learning rate "
            f"{s.learning_rate:g}, cosine decay to {s.learning_rate / 10:g} at step {s.steps}")


def run_table(r: train.TrainResult, command: str) -> str:
    import jax

    s = r.scale
    rows = [
        ("machine", _common.machine_line()),
        ("JAX", jax.__version__),
        ("command", f"`{command}`"),
        ("model", config_line(r)),
        ("corpus", r.corpus),
        ("optimizer", optimizer_line(s)),
        ("steps", f"{s.steps}, {s.batch} x {s.seq_len} = {r.tokens_per_step:,} tokens each "
                  f"({s.steps * r.tokens_per_step:,} tokens in all)"),
        ("held-out set", f"{s.eval_batches} batches x {s.batch} windows evenly spaced over the "
                         f"held-out files = {r.heldout_tokens:,} tokens, every "
                         f"{s.eval_every} steps"),
        ("pipeline", f"{r.pipeline.label}; stages: {', '.join(r.plan)}"),
        ("wall time", f"{r.wall_s:,.0f} s for corpus, builds and both runs"),
    ]
    return _common.markdown_table(("", ""), rows)


def results_table(r: train.TrainResult) -> str:
    rows = []
    for c in (r.pipeline, r.single):
        t = c.timing
        rows.append((
            c.label,
            f"{c.final_train():.4f}",
            f"{c.heldout_loss[-1]:.4f}",
            f"{bits_per_byte(c.heldout_loss[-1]):.3f}",
            _common.tps(c.tokens_per_s(r.tokens_per_step)),
            f"{t.ms()}",
            f"{c.compile_s:.1f}",
        ))
    return _common.markdown_table(
        ("method", "train loss (mean of last 10 steps)", "held-out loss", "held-out bits/byte",
         "tokens/s (median step)", "step ms, median (min-max)", "compile s"), rows,
        "lrrrrrr")


def agreement_table(r: train.TrainResult) -> str:
    rows = [
        (f"train loss, each of the {r.scale.steps} steps' batch", f"{r.max_train_diff:.2e}",
         f"{train.AGREE_NATS:g}"),
        (f"held-out loss, each of the {len(r.pipeline.eval_steps)} evaluations",
         f"{r.max_heldout_diff:.2e}", f"{train.AGREE_NATS:g}"),
        (f"weights after the last step (largest weight {r.max_weight:.3g})",
         f"{r.max_weight_diff:.2e}", "--"),
    ]
    return _common.markdown_table(("pipeline vs one device", "max abs difference",
                                   "tolerance (nats)"), rows, "lrr")


def heldout_table(r: train.TrainResult) -> str:
    rows = [(k, f"{a:.4f}", f"{b:.4f}", f"{bits_per_byte(a):.3f}", f"{abs(a - b):.1e}")
            for k, a, b in zip(r.pipeline.eval_steps, r.pipeline.heldout_loss,
                               r.single.heldout_loss, strict=True)]
    return _common.markdown_table(("step", "pipeline", "one device", "pipeline bits/byte",
                                   "abs difference"), rows, "rrrrr")


def summary_lines(r: train.TrainResult) -> list[str]:
    verdict = "agree" if r.agree else "DO NOT agree"
    p = r.pipeline
    return [
        f"- The two curves {verdict} to float32 noise: the largest train-loss difference over "
        f"{r.scale.steps} steps is {r.max_train_diff:.1e} nats, the largest held-out "
        f"difference {r.max_heldout_diff:.1e} nats (tolerance {train.AGREE_NATS:g}); the "
        f"weights differ by at most {r.max_weight_diff:.1e} after the last step. Measured: "
        "both methods start from the same weights (same seed) and see the same batches; "
        "the differences are float32 rounding of different programs, grown by the steps.",
        f"- Trained through the pipeline, the model reaches a held-out loss of "
        f"{p.heldout_loss[-1]:.3f} nats = {bits_per_byte(p.heldout_loss[-1]):.2f} bits per "
        f"byte (from {p.heldout_loss[0]:.3f} = {bits_per_byte(p.heldout_loss[0]):.2f} at "
        "initialisation; a uniform guess is 8 bits per byte).",
        f"- Tokens/s: the pipeline {p.tokens_per_s(r.tokens_per_step):,.0f}, one device "
        f"{r.single.tokens_per_s(r.tokens_per_step):,.0f}: **{r.speed_ratio:.2f}x** (medians "
        "of per-step times, the two methods alternating step by step; the simulated devices "
        "share this machine's cores, so this is no prediction for separate accelerators).",
    ]


def markdown(r: train.TrainResult, command: str) -> str:
    """The whole results file."""
    return "\n".join([
        _common.header("Training through the layer-wise pipeline", train.SCRIPT, command),
        *summary_lines(r),
        "",
        "## Run",
        "",
        run_table(r, command),
        "",
        f"## Results: {_common.cpu_label()}",
        "",
        results_table(r),
        "",
        "## Agreement",
        "",
        agreement_table(r),
        "",
        "## Held-out loss (nats per byte)",
        "",
        heldout_table(r),
        "",
        "The trained weights (the pipeline's, exported with `TrainStep.export_params`) are "
        "saved with `flax.serialization` as `train_model*.msgpack`; load them with "
        "`experiments/bytelm.py`'s `load_trained(path) -> (model, cfg)`.",
        "",
    ])


def figure(r: train.TrainResult, path: pathlib.Path) -> pathlib.Path:
    """Train and held-out loss of both methods (left) and their differences (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.8))
    steps = np.arange(1, r.scale.steps + 1)
    ax.plot(steps, r.single.train_loss, lw=2.5, alpha=0.5, label=f"train: {r.single.label}")
    ax.plot(steps, r.pipeline.train_loss, lw=1, ls="--", label="train: layer-wise pipeline")
    ax.plot(r.single.eval_steps, r.single.heldout_loss, "o", ms=8, alpha=0.5,
            label="held-out: one device")
    ax.plot(r.pipeline.eval_steps, r.pipeline.heldout_loss, "x", ms=7, color="black",
            label="held-out: layer-wise pipeline")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_ylim(0, max(r.single.train_loss[0], r.single.heldout_loss[0]) * 1.05)
    ax.set_title("Loss", fontsize=10)
    ax.legend(fontsize=8)
    train_diff = np.abs(np.subtract(r.pipeline.train_loss, r.single.train_loss))
    heldout_diff = np.abs(np.subtract(r.pipeline.heldout_loss, r.single.heldout_loss))
    floor = 1e-9  # log scale: an exact match is drawn at the floor
    dx.semilogy(steps, np.maximum(train_diff, floor), lw=1, label="train loss")
    dx.semilogy(r.pipeline.eval_steps, np.maximum(heldout_diff, floor), "o",
                label="held-out loss")
    dx.axhline(floor, color="gray", lw=0.5, label="equal (drawn at 1e-9)")
    dx.axhline(train.AGREE_NATS, color="red", ls=":", label=f"tolerance {train.AGREE_NATS:g}")
    dx.set_xlabel("step")
    dx.set_ylabel("|pipeline - one device| (nats)")
    dx.set_title("Difference between the curves", fontsize=10)
    dx.legend(fontsize=8)
    fig.suptitle(f"{config_line(r)}\n{r.scale.steps} steps x {r.tokens_per_step:,} tokens; "
                 f"{_common.cpu_label()}", fontsize=9)
    fig.tight_layout()
    return _common.save_figure(fig, path)
