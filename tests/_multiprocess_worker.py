"""One process of a multi-process test (``tests/test_multiprocess.py``), started by

    python -m lwjax.launch -n 2 --cpu-devices 8 -- \
        python tests/_multiprocess_worker.py CASE OUT WEIGHTS [WEIGHTS4]

Cases (WEIGHTS: a 16-layer model and tokens, WEIGHTS4: a 4-layer one, from ``save_model``):

- ``forward``: layerwise_shard of the 16-layer model, one stage per device over both
  processes' 16 devices; then, with the 4-layer model on 4 stages, devices 6, 7 (process 0)
  and 2048, 2049 (process 1): ``value_and_grad``, then train_step and
  ``export_params(state)``.
- ``train16``: train_step of the 16-layer model on the 16 stages.
- ``generate``: layerwise_generate of the 16-layer model.
- ``peer``: the 4-stage pipeline of the 4-layer model (WEIGHTS), called until a peer is
  killed; ``fail``: the same, but process 1 raises once it has run; ``fail_late``: process 0
  finishes, process 1 raises a second later; ``fail0``: process 0 raises once it has run.
- ``baselines``: ``lwjax.baselines.tp_pp`` (tp=4, pp=4 over both processes' devices) of the
  4-layer model (WEIGHTS): forward and ``value_and_grad``; ``tp_pp_generate`` likewise.
- ``disagree``: process 1 asks for other microbatches (layerwise_shard, then
  layerwise_generate), then another schedule (train_step): each call must raise ConfigError
  on both processes; it writes the messages to ``OUT/disagree_<process id>.json``.

Each process writes what it saw to ``OUT/<case>_<process id>.npz`` / ``.json``; ``peer`` and
``fail`` write ``OUT/ready_<process id>`` (its pid) once the pipeline has run.
"""

import dataclasses
import json
import os
import pathlib
import sys
import time

from lwjax import distributed

RUN = distributed.initialize()  # first: before anything touches JAX

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import lwjax  # noqa: E402
from lwjax import models  # noqa: E402
from lwjax.errors import ConfigError  # noqa: E402
from lwjax.models import configs  # noqa: E402

SHARD = {"cache_bytes": 2**30, "microbatches": 8, "objective": "bottleneck"}
TRAIN_STEPS = 3
PEER_SECONDS = 120  # a survivor still running after this fails the test instead of hanging


def config(num_layers: int = 16):
    return dataclasses.replace(configs.tiny_dense(), num_layers=num_layers)


def save_model(path: pathlib.Path, model, tokens) -> None:
    """Writes the model's weights and the tokens, so that the processes need not build the
    model again (seconds per process on a loaded CI machine)."""
    leaves = jax.tree.leaves(nnx.state(model))
    np.savez(path, tokens=tokens, layers=len(model.layers),
             **{f"w{i}": np.asarray(x) for i, x in enumerate(leaves)})


def load_model(path: pathlib.Path):
    """``save_model``'s model (on an abstract shell: nothing is drawn) and tokens."""
    data = np.load(path)
    graphdef, state = nnx.split(models.abstract(config(int(data["layers"]))))
    leaves, treedef = jax.tree.flatten(state)
    state = jax.tree.unflatten(treedef, [data[f"w{i}"] for i in range(len(leaves))])
    return nnx.merge(graphdef, state), data["tokens"]


def across_processes():
    """Devices 6, 7 (process 0) and 2048, 2049 (process 1): 4 stages over both processes."""
    return jax.devices()[6:10]


def loss_fn(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def train_losses(sm, tokens) -> list[float]:
    return train(sm, tokens)[0]


def train(sm, tokens) -> tuple[list[float], list[np.ndarray]]:
    """TRAIN_STEPS adamw steps: the losses, and the trained weights (``export_params``'s
    leaves as numpy)."""
    step = sm.train_step(loss_fn, optax.adamw(1e-3))
    state = step.init()
    losses = []
    for _ in range(TRAIN_STEPS):
        state, loss = step(state, tokens, tokens)
        losses.append(float(distributed.gather(loss)))
    return losses, numpy_leaves(step.export_params(state))


def numpy_leaves(tree) -> list[np.ndarray]:
    """A tree's leaves as numpy: each must be whole on this process."""
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def gradients(sm, tokens) -> tuple[float, list[np.ndarray]]:
    loss, grads = sm.value_and_grad(loss_fn)(tokens, tokens)
    return float(distributed.gather(loss)), numpy_leaves(grads)


def forward(out: pathlib.Path, me: int, weights: pathlib.Path, weights4: pathlib.Path) -> None:
    model, tokens = load_model(weights)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices(), **SHARD)
    logits = sm(tokens)
    local = sorted(int(sh.device.id) for sh in logits.addressable_shards)
    whole = distributed.gather(logits)
    model4, tokens4 = load_model(weights4)
    sm4 = lwjax.layerwise_shard(model4, tokens4, devices=across_processes(), **SHARD)
    loss, grads = gradients(sm4, tokens4)
    losses, trained = train(sm4, tokens4)
    np.savez(out / f"forward_{me}.npz", logits=whole, losses=np.array(losses), loss=loss,
             **{f"grad{i}": x for i, x in enumerate(grads)},
             **{f"trained{i}": x for i, x in enumerate(trained)})
    (out / f"forward_{me}.json").write_text(json.dumps({
        "stages": [list(s.devices) for s in sm.plan.stages],
        "train_stages": [list(s.devices) for s in sm4.plan.stages],
        "local_devices": sorted(int(d.id) for d in jax.local_devices()),
        "output_devices": local,
        "process_count": jax.process_count(),
    }))


def train16(out: pathlib.Path, me: int, weights: pathlib.Path) -> None:
    model, tokens = load_model(weights)
    sm = lwjax.layerwise_shard(model, tokens, devices=jax.devices(), **SHARD)
    np.savez(out / f"train16_{me}.npz", losses=np.array(train_losses(sm, tokens)))


def generate(out: pathlib.Path, me: int, weights: pathlib.Path) -> None:
    model, tokens = load_model(weights)
    prompt = tokens[:, :8]
    g = lwjax.layerwise_generate(model, prompt, max_new_tokens=4, devices=jax.devices(),
                                 microbatches=16, cache_bytes=2**30, objective="bottleneck")
    new = distributed.gather(g(prompt))
    np.savez(out / f"generate_{me}.npz", new_tokens=new)
    (out / f"generate_{me}.json").write_text(json.dumps(
        {"stages": [list(s.devices) for s in g.plan.stages]}))


def peer(out: pathlib.Path, me: int, weights: pathlib.Path, case: str) -> None:
    model, tokens = load_model(weights)
    sm = lwjax.layerwise_shard(model, tokens, devices=across_processes(), **SHARD)
    sm(tokens).block_until_ready()
    (out / f"ready_{me}").write_text(str(os.getpid()))
    if case == "fail_late" and me == 0:
        return  # done: waits at exit for process 1, which then fails
    if case in ("fail", "fail_late") and me == 1:
        time.sleep(1.0 if case == "fail_late" else 0.0)
        raise ValueError("process 1 fails on purpose")
    if case == "fail0" and me == 0:
        raise ValueError("process 0 fails on purpose")
    end = time.monotonic() + PEER_SECONDS
    while time.monotonic() < end:
        sm(tokens).block_until_ready()
    sys.exit(3)


BASELINE = {"tp": 4, "pp": 4, "microbatches": 4}


def run_baselines(model, tokens, devices) -> dict[str, np.ndarray]:
    """tp_pp's logits and gradients, tp_pp_generate's tokens, gathered (the test runs this in
    one process too)."""
    from lwjax import baselines
    from lwjax.baselines_generate import tp_pp_generate

    b = baselines.tp_pp(model, tokens, devices=devices, **BASELINE)
    loss, grads = b.value_and_grad(loss_fn)(tokens, tokens)
    g = tp_pp_generate(model, tokens[:, :8], max_new_tokens=3, devices=devices, **BASELINE)
    return {"logits": distributed.gather(b(tokens)), "loss": distributed.gather(loss),
            "new_tokens": distributed.gather(g(tokens[:, :8])),
            **{f"grad{i}": x for i, x in enumerate(jax.tree.leaves(distributed.gather(grads)))}}


def baselines_case(out: pathlib.Path, me: int, weights: pathlib.Path) -> None:
    model, tokens = load_model(weights)
    np.savez(out / f"baselines_{me}.npz", **run_baselines(model, tokens, jax.devices()))


def disagree(out: pathlib.Path, me: int, weights: pathlib.Path) -> None:
    """Process 1 asks for another plan, then for another training schedule: both processes
    must refuse each before anything runs (ConfigError, not a hang)."""
    model, tokens = load_model(weights)
    calls = {
        "layerwise_shard": lambda: lwjax.layerwise_shard(
            model, tokens, devices=across_processes(),
            **{**SHARD, "microbatches": 8 if me == 0 else 4}),
        "layerwise_generate": lambda: lwjax.layerwise_generate(
            model, tokens[:, :8], max_new_tokens=2, devices=across_processes(),
            microbatches=4 if me == 0 else 2, cache_bytes=2**30, objective="bottleneck"),
        "train_step": lambda: lwjax.layerwise_shard(
            model, tokens, devices=across_processes(), **SHARD).train_step(
            loss_fn, optax.adamw(1e-3), schedule="gpipe" if me == 0 else "1f1b")(
            None, tokens, tokens),
    }
    errors = {}
    for name, call in calls.items():
        try:
            call()
        except ConfigError as e:
            errors[name] = str(e)
    (out / f"disagree_{me}.json").write_text(json.dumps(errors))


def main() -> None:
    case, out, *weights = sys.argv[1:]
    if RUN is None or jax.process_count() != 2:
        sys.exit("run under `python -m lwjax.launch -n 2 --cpu-devices 8 -- ...`")
    me = jax.process_index()
    paths = [pathlib.Path(w) for w in weights]
    if case in ("peer", "fail", "fail_late", "fail0"):
        peer(pathlib.Path(out), me, *paths, case)
    else:
        {"forward": forward, "train16": train16, "generate": generate,
         "disagree": disagree, "baselines": baselines_case}[case](
            pathlib.Path(out), me, *paths)


if __name__ == "__main__":
    main()
