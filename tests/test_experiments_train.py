"""experiments/train.py --quick in a subprocess (its own 8 simulated devices): the outputs
exist, the pipeline's loss curves equal one device's within train.AGREE_NATS, and the saved
weights load back (bytelm.load_trained) with the held-out loss the run recorded."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _experiments import EXPERIMENTS, load_experiment

TIMEOUT_S = 300  # the run takes ~25 s on the 2-core machine; more when the cores are shared


bytelm = load_experiment("bytelm")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    proc = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "train.py"), "--quick", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _diff(text: str, row: str) -> float:
    match = re.search(rf"^\| {row}[^|]*\| ([0-9.e+-]+) \|", text, re.MULTILINE)
    assert match, row
    return float(match.group(1))


def test_quick_run_writes_outputs_and_the_curves_agree(quick_run):
    out, stdout = quick_run
    text = (out / "train-quick.md").read_text()
    assert text in stdout
    assert (out / "train-quick.png").read_bytes()[:4] == b"\x89PNG"
    assert "The two curves agree to float32 noise" in text
    assert _diff(text, "train loss, each of the 20 steps") <= 1e-3
    assert _diff(text, "held-out loss, each of the 3 evaluations") <= 1e-3
    assert f"JAX {jax.__version__}" in text
    for needle in ("tokens/s (median step)", "held-out bits/byte", "2 stages x 1 device"):
        assert needle in text


def test_saved_weights_load_back_with_the_recorded_heldout_loss(quick_run):
    out, _ = quick_run
    model, cfg, meta = bytelm.load_trained_with_meta(out / "train_model-quick.msgpack")
    assert (cfg.num_layers, cfg.vocab_size, cfg.dtype) == (2, 256, jnp.float32)
    data = bytelm.corpus(bytelm.CorpusSpec(**meta["corpus"]))
    assert data.sha256 == meta["corpus_sha256"]
    batches = bytelm.heldout_batches(data.heldout, cfg.seq_len, meta["batch"],
                                     meta["eval_batches"])
    loss = np.mean([bytelm.mean_loss(model, x, y) for x, y in batches])
    np.testing.assert_allclose(loss, meta["final_heldout_loss"], rtol=1e-5)
    again, _ = bytelm.load_trained(out / "train_model-quick.msgpack")
    x = batches[0][0]
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(again(x)))


def test_corpus_is_deterministic_and_split_by_file():
    spec = bytelm.CorpusSpec(budget_bytes=2**16, max_file_bytes=2**12, heldout_every=4)
    a, b = bytelm.corpus(spec), bytelm.corpus(spec)
    assert a.sha256 == b.sha256 and a.train.size + a.heldout.size == 2**16
    assert a.train_files // 3 - 1 <= a.heldout_files <= a.train_files // 3 + 1
    root = pathlib.Path(bytelm.sysconfig.get_paths()["stdlib"])
    folders = {p for f in bytelm.stdlib_files(root) for p in f.relative_to(root).parts[:-1]}
    assert "asyncio" in folders and not folders & {"site-packages", "test", "tests"}
    x, y = bytelm.windows(a.train, np.array([0, 5]), 8)
    assert x.shape == y.shape == (2, 8) and (x[:, 1:] == y[:, :-1]).all()
