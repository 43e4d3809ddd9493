"""Multi-process runs on one machine: 2 processes x 8 simulated CPU devices, gloo collectives,
started with ``python -m lwjax.launch`` (``tests/_multiprocess_worker.py`` is each process).

Everything multi-process runs in subprocesses with timeouts, in a session of its own that
the test kills whole when the time is up: a hang fails the test, it never hangs CI.

Oracles: the 2-process pipeline against the same pipeline in this (single, 16-device)
process -- the same stages, so the same per-device programs: outputs and training losses
agree bit for bit -- and against the model itself (1e-5, as tests/test_lower.py). A killed
peer: the survivor names it in a PeerLostError and exits with status 75 within
``Timeouts.bound_seconds`` of the kill.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import _multiprocess_worker as worker
import jax
import numpy as np
import pytest

import lwjax
from lwjax import cli, distributed, launch
from lwjax.errors import ConfigError

WORKER = pathlib.Path(__file__).with_name("_multiprocess_worker.py")
HEARTBEAT = 2.0  # seconds; the runs that lose a peer use a short heartbeat (a small bound)
# the runs that lose none: the default heartbeat, so that a process starved of CPU on a
# loaded machine is not taken for lost
STEADY = distributed.Timeouts().heartbeat_seconds
# kill -> survivor gone: the documented bound, plus 1 s for the process to end and the
# launcher to see it
BOUND = distributed.Timeouts(heartbeat_seconds=HEARTBEAT).bound_seconds + 1.0
RUN_SECONDS = 300  # a whole 2-process run, however loaded the machine
ATOL = RTOL = 1e-5
ENV = {k: v for k, v in os.environ.items() if not k.startswith("LWJAX_")}


def _start(case: str, out: pathlib.Path, *extra: str,
           heartbeat: float = HEARTBEAT) -> subprocess.Popen:
    command = [sys.executable, "-m", "lwjax.launch", "-n", "2", "--cpu-devices", "8",
               "--heartbeat", str(heartbeat), "--timeout", str(RUN_SECONDS - 30), "--",
               sys.executable, str(WORKER), case, str(out), *extra]
    return subprocess.Popen(command, env={**ENV, "JAX_PLATFORMS": "cpu"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(case: str, out: pathlib.Path, *extra: str) -> tuple[int, str]:
    """A run that loses no peer, to its end: (the launcher's status, the output)."""
    return _finish(_start(case, out, *extra, heartbeat=STEADY), RUN_SECONDS)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s:\n{_tail(output)}")
    return proc.returncode, output


def _tail(output: str, lines: int = 60) -> str:
    kept = [line for line in output.splitlines() if not line.startswith("[Gloo]")]
    return "\n".join(kept[-lines:])


def _wait_for(paths: list[pathlib.Path], proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.monotonic() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"the processes did not get ready:\n{_tail(output)}")
        time.sleep(0.1)


# ---- 2 processes x 8 devices: forward and training ------------------------------------------

def _model(num_layers: int):
    from flax import nnx

    from lwjax import models

    cfg = worker.config(num_layers)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (16, cfg.seq_len), 0,
                                           cfg.vocab_size))
    return model, tokens


@pytest.fixture(scope="module")
def model_and_tokens():
    return _model(16)


@pytest.fixture(scope="module")
def model4_and_tokens():
    return _model(4)


@pytest.fixture(scope="module")
def weights(model_and_tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model16.npz"
    worker.save_model(path, *model_and_tokens)
    return path


@pytest.fixture(scope="module")
def weights4(model4_and_tokens, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "model4.npz"
    worker.save_model(path, *model4_and_tokens)
    return path


@pytest.fixture(scope="module")
def forward_run(weights, weights4, tmp_path_factory):
    out = tmp_path_factory.mktemp("forward")
    code, output = _run("forward", out, str(weights), str(weights4))
    assert code == 0, _tail(output)
    return [(json.loads((out / f"forward_{p}.json").read_text()),
             np.load(out / f"forward_{p}.npz")) for p in (0, 1)]


def _single_process(model, tokens, devices):
    """The same pipeline in this process (the same stages on as many devices of its own)."""
    return lwjax.layerwise_shard(model, tokens, devices=devices, **worker.SHARD)


def test_forward_over_two_processes_equals_one(forward_run, model_and_tokens):
    model, tokens = model_and_tokens
    sm = _single_process(model, tokens, jax.devices()[:16])
    (info0, res0), (info1, res1) = forward_run
    assert info0["process_count"] == info1["process_count"] == 2
    # 16 stages, one per device, over both processes' devices
    assert info0["stages"] == info1["stages"]
    stage_devices = [d for s in info0["stages"] for d in s]
    assert sorted(stage_devices) == sorted(info0["local_devices"] + info1["local_devices"])
    assert not set(info0["local_devices"]) & set(info1["local_devices"])
    assert [s.layer_range for s in sm.plan.stages] == [(i, i + 1) for i in range(16)]
    # outputs: each process holds the pieces on its own devices; gather gives the whole
    for info in (info0, info1):
        assert info["output_devices"] == info["local_devices"]
    np.testing.assert_array_equal(res0["logits"], res1["logits"])
    np.testing.assert_array_equal(res0["logits"], np.asarray(sm(tokens)))
    np.testing.assert_allclose(res0["logits"], model(tokens), atol=ATOL, rtol=RTOL)


def _saved(result, name: str) -> list[np.ndarray]:
    return [result[f"{name}{i}"] for i in range(len([k for k in result if
                                                     k.startswith(name)]))]


def test_train_step_over_two_processes_equals_one(forward_run, model4_and_tokens):
    """4 stages: devices 6, 7 of process 0 and 2048, 2049 of process 1. The losses, and the
    trained weights that ``export_params(state)`` gives every process whole, equal one
    process's bit for bit."""
    model, tokens = model4_and_tokens
    (info0, res0), (_, res1) = forward_run
    assert info0["train_stages"] == [[6], [7], [2048], [2049]]
    losses, trained = worker.train(_single_process(model, tokens, jax.devices()[6:10]),
                                   tokens)
    np.testing.assert_array_equal(res0["losses"], res1["losses"])
    np.testing.assert_array_equal(res0["losses"], losses)
    assert losses[-1] < losses[0]
    assert len(trained) == len(_saved(res0, "trained")) == len(_saved(res1, "trained"))
    for want, got0, got1 in zip(trained, _saved(res0, "trained"), _saved(res1, "trained"),
                                strict=True):
        np.testing.assert_array_equal(got0, want)
        np.testing.assert_array_equal(got1, want)


def test_gradients_over_two_processes_equal_one(forward_run, model4_and_tokens):
    """``value_and_grad`` on stages of both processes: every process gets the whole gradient
    tree, equal to one process's bit for bit, and to ``jax.grad`` of the model (the oracle,
    1e-5). (``export_params``: test_train_step_over_two_processes_equals_one.)"""
    from flax import nnx

    model, tokens = model4_and_tokens
    (_, res0), (_, res1) = forward_run
    loss, grads = worker.gradients(_single_process(model, tokens, jax.devices()[6:10]), tokens)
    assert float(res0["loss"]) == float(res1["loss"]) == loss
    assert len(_saved(res0, "grad")) == len(_saved(res1, "grad")) == len(grads) > 0
    for want, got0, got1 in zip(grads, _saved(res0, "grad"), _saved(res1, "grad"), strict=True):
        np.testing.assert_array_equal(got0, want)
        np.testing.assert_array_equal(got1, want)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def model_loss(p):
        return worker.loss_fn(nnx.merge(graphdef, p, rest)(tokens), tokens)

    want_loss, want_grads = jax.jit(jax.value_and_grad(model_loss))(params)
    np.testing.assert_allclose(loss, float(want_loss), atol=ATOL, rtol=RTOL)
    for got, want in zip(grads, jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_train_step_on_sixteen_stages_over_two_processes(weights, model_and_tokens, tmp_path):
    model, tokens = model_and_tokens
    code, output = _run("train16", tmp_path, str(weights))
    assert code == 0, _tail(output)
    losses = worker.train_losses(_single_process(model, tokens, jax.devices()[:16]), tokens)
    for p in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"train16_{p}.npz")["losses"], losses)


@pytest.mark.slow
def test_generate_over_two_processes_equals_one(weights, model_and_tokens, tmp_path):
    from lwjax import models

    model, tokens = model_and_tokens
    code, output = _run("generate", tmp_path, str(weights))
    assert code == 0, _tail(output)
    want = np.asarray(models.generate(model, tokens[:, :8], 4))
    for p in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"generate_{p}.npz")["new_tokens"],
                                      want)


@pytest.mark.slow
def test_baselines_over_two_processes_equal_one(weights4, model4_and_tokens, tmp_path):
    """lwjax.baselines.tp_pp (forward, value_and_grad) and tp_pp_generate with tp=4, pp=4
    over both processes' 16 devices: gathered, equal to the same baselines in one process
    (1e-5: gloo's all-reduces over "tp" sum in another order than one process's, so not bit
    for bit; generation: the same tokens) and to the model."""
    from lwjax import models

    model, tokens = model4_and_tokens
    code, output = _run("baselines", tmp_path, str(weights4))
    assert code == 0, _tail(output)
    want = worker.run_baselines(model, tokens, jax.devices()[:16])
    for p in (0, 1):
        got = np.load(tmp_path / f"baselines_{p}.npz")
        assert sorted(got) == sorted(want)
        np.testing.assert_array_equal(got["new_tokens"], want["new_tokens"])
        for k, w in want.items():
            np.testing.assert_allclose(got[k], w, atol=ATOL, rtol=RTOL, err_msg=k)
    np.testing.assert_allclose(want["logits"], model(tokens), atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(want["new_tokens"],
                                  np.asarray(models.generate(model, tokens[:, :8], 3)))


@pytest.mark.slow
def test_processes_that_plan_differently_refuse_to_run(weights4, tmp_path):
    """Process 1 asks for another plan (layerwise_shard, layerwise_generate) or another
    schedule (train_step): each call raises ConfigError on both processes, naming process 1
    and both plans, before anything runs; the run then ends normally (no hang)."""
    code, output = _run("disagree", tmp_path, str(weights4))
    assert code == 0, _tail(output)
    what = {"layerwise_shard": "plan", "layerwise_generate": "generation plan",
            "train_step": "training program"}
    for p in (0, 1):
        errors = json.loads((tmp_path / f"disagree_{p}.json").read_text())
        assert sorted(errors) == sorted(what), errors
        for call, name in what.items():
            assert errors[call].startswith(
                f"processes [1] computed a different {name} from process 0's"), errors[call]
    assert '"schedule": "1f1b"' in errors["train_step"], errors["train_step"]


# ---- a lost peer is an error within the bound, not a hang -----------------------------------

def test_killed_peer_is_named_within_the_bound(weights4, tmp_path):
    proc = _start("peer", tmp_path, str(weights4))
    ready = [tmp_path / f"ready_{p}" for p in (0, 1)]
    _wait_for(ready, proc, RUN_SECONDS)
    os.kill(int(ready[1].read_text()), signal.SIGKILL)
    killed = time.monotonic()
    code, output = _finish(proc, RUN_SECONDS)
    elapsed = time.monotonic() - killed
    assert code == 128 + signal.SIGKILL, _tail(output)  # the first to fail: process 1
    assert "lwjax.errors.PeerLostError: process 0 lost a peer: process 1 of 2" in output, \
        _tail(output)
    assert "no heartbeat for" in output
    assert "process 0 exited with status 75 (it lost a peer)" in output, _tail(output)
    assert elapsed < BOUND, f"the survivor took {elapsed:.1f} s (bound {BOUND:g} s)"


@pytest.mark.slow
def test_failed_peer_is_named_with_its_error(weights4, tmp_path):
    start = time.monotonic()
    code, output = _finish(_start("fail", tmp_path, str(weights4)), RUN_SECONDS)
    assert code == 1, _tail(output)
    assert "process 1 of 2" in output and \
        "failed: ValueError: process 1 fails on purpose" in output, _tail(output)
    assert "process 0 exited with status 75" in output
    assert time.monotonic() - start < RUN_SECONDS


@pytest.mark.slow
def test_peer_failing_after_this_process_finished_is_named_at_exit(weights4, tmp_path):
    """Process 0 is done and waits at exit; process 1 fails: process 0 names it and exits
    with status 75 at once, not when JAX's exit barrier gives up."""
    start = time.monotonic()
    code, output = _finish(_start("fail_late", tmp_path, str(weights4)), RUN_SECONDS)
    assert code == 1, _tail(output)
    assert "process 1 of 2" in output and \
        "failed: ValueError: process 1 fails on purpose" in output, _tail(output)
    assert "process 0 exited with status 75" in output and "SIGABRT" not in output
    assert time.monotonic() - start < RUN_SECONDS


@pytest.mark.slow
def test_failing_coordinator_is_named_by_the_others(weights4, tmp_path):
    """Process 0 (which hosts JAX's coordination service) raises: it publishes its error and
    waits until process 1 has named it (PeerLostError, status 75) before it exits, so JAX's
    abort of the still-connected never comes. The launcher returns process 0's status."""
    start = time.monotonic()
    code, output = _finish(_start("fail0", tmp_path, str(weights4)), RUN_SECONDS)
    assert code == 1, _tail(output)
    assert "lwjax.errors.PeerLostError: process 1 lost a peer: process 0 of 2, the " \
        "coordinator" in output and "failed: ValueError: process 0 fails on purpose" in output, \
        _tail(output)
    assert "process 1 exited with status 75" in output and "process 0 exited with status 1" \
        in output and "SIGABRT" not in output, _tail(output)
    assert time.monotonic() - start < RUN_SECONDS


@pytest.mark.slow
def test_killed_coordinator_stops_the_others_within_the_bound(weights4, tmp_path):
    """Process 0 killed: the coordination service dies with it, and JAX's client in process 1
    aborts it at once (its own message, then SIGABRT: jax 0.10.2 offers no hook that could
    word it -- a ``missed_heartbeat_callback`` crashes with std::bad_cast before it is
    called). No hang: it ends within the bound, non-zero, and the launcher says why."""
    proc = _start("peer", tmp_path, str(weights4))
    ready = [tmp_path / f"ready_{p}" for p in (0, 1)]
    _wait_for(ready, proc, RUN_SECONDS)
    os.kill(int(ready[0].read_text()), signal.SIGKILL)
    killed = time.monotonic()
    code, output = _finish(proc, RUN_SECONDS)
    elapsed = time.monotonic() - killed
    assert code == 128 + signal.SIGKILL, _tail(output)
    assert "process 0 was killed by SIGKILL" in output, _tail(output)
    assert "process 1 was killed by SIGABRT" in output, _tail(output)
    assert "Terminating process because the JAX distributed service detected fatal errors" \
        in output, _tail(output)
    assert "JAX aborts every other process at once when process 0, which hosts its " \
        "coordination service, is lost" in output, _tail(output)
    assert elapsed < BOUND, f"the survivor took {elapsed:.1f} s (bound {BOUND:g} s)"


# ---- the launcher and initialize, without JAX in the children --------------------------------

def _child(code: str) -> list[str]:
    return ["--", sys.executable, "-c", code]


def test_launch_starts_processes_with_the_run_in_their_environment(tmp_path):
    keys = ("LWJAX_COORDINATOR", "LWJAX_NUM_PROCESSES", "LWJAX_CPU_DEVICES",
            "LWJAX_HEARTBEAT_SECONDS")
    code = (f"import os, pathlib; e = os.environ; pathlib.Path(r'{tmp_path}', "
            f"e['LWJAX_PROCESS_ID']).write_text(' '.join(e[k] for k in {keys!r}))")
    assert launch.main(["-n", "3", "--cpu-devices", "4", "--heartbeat", "2.5", *_child(code)]) \
        == 0
    seen = [(tmp_path / str(p)).read_text().split() for p in range(3)]
    assert {s[0] for s in seen} == {seen[0][0]} and seen[0][0].startswith("127.0.0.1:")
    assert all(s[1:] == ["3", "4", "2.5"] for s in seen)


def test_launch_stops_the_rest_after_a_failure(capfd):
    code = "import os, sys, time; i = int(os.environ['LWJAX_PROCESS_ID']); " \
           "sys.exit(5) if i == 1 else time.sleep(60)"
    start = time.monotonic()
    assert launch.main(["-n", "2", "--grace", "0.5", *_child(code)]) == 5
    assert time.monotonic() - start < 15
    err = capfd.readouterr().err
    assert "process 1 exited with status 5" in err and "process 0 was killed by SIGTERM" in err


def test_launch_timeout_and_bad_arguments(capfd):
    assert launch.main(["-n", "1", "--timeout", "0.5", *_child("import time; time.sleep(60)")]) \
        == launch.EXIT_TIMEOUT
    assert "--timeout 0.5 s passed" in capfd.readouterr().err
    assert launch.main(["-n", "2"]) == 2
    assert launch.main(["-n", "0", *_child("pass")]) == 2
    assert launch.main(["-n", "1", "--heartbeat", "0", *_child("pass")]) == 2
    assert cli.main(["launch", "-n", "1", *_child("pass")]) == 0


def test_initialize_outside_a_run_changes_nothing(monkeypatch):
    for k in list(os.environ):
        if k.startswith("LWJAX_"):
            monkeypatch.delenv(k)
    assert distributed.initialize() is None
    assert distributed.lost_processes() == ()
    distributed.check()
    distributed.agree("anything", "plan")
    with distributed.peer_guard():
        pass
    x = jax.numpy.arange(4)
    np.testing.assert_array_equal(distributed.gather({"x": x})["x"], np.arange(4))


@pytest.mark.parametrize(("env", "match"), [
    ({"LWJAX_PROCESS_ID": "0"}, "coordinator, num_processes not given"),
    ({"LWJAX_COORDINATOR": "h:1", "LWJAX_NUM_PROCESSES": "two", "LWJAX_PROCESS_ID": "0"},
     r"\$LWJAX_NUM_PROCESSES='two' is not an integer"),
    ({"LWJAX_COORDINATOR": "h:1", "LWJAX_NUM_PROCESSES": "2", "LWJAX_PROCESS_ID": "2"},
     "ids of a run are 0 .. num_processes - 1"),
    ({"LWJAX_COORDINATOR": "h:1", "LWJAX_NUM_PROCESSES": "2", "LWJAX_PROCESS_ID": "1",
      "LWJAX_HEARTBEAT_SECONDS": "0"}, "heartbeat_seconds must be a positive number"),
])
def test_initialize_rejects_a_run_described_badly(monkeypatch, env, match):
    for k in list(os.environ):
        if k.startswith("LWJAX_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        distributed.initialize()


@pytest.mark.slow
def test_multiprocess_experiment_runs_under_the_launcher():
    script = pathlib.Path(__file__).parents[1] / "experiments" / "multiprocess.py"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lwjax.launch", "-n", "2", "--cpu-devices", "8", "--timeout",
         str(RUN_SECONDS - 30), "--", sys.executable, str(script), "--layers", "4",
         "--repeats", "1", "--train-steps", "2"],
        env={**ENV, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    code, output = _finish(proc, RUN_SECONDS)
    assert code == 0, _tail(output)
    assert "measured: 2 process(es), 4 stages over 16 devices" in output, _tail(output)
    diff = float(output.split("max |diff| ")[1].split()[0])
    assert diff < ATOL
    # 4 stages on devices 0-3: process 1 holds none of them, and gather still reaches it
    assert "process 1: holds the output pieces on devices []" in output
