"""The byte-level language model of ``experiments/train.py``: its corpus and its checkpoint.

This module touches no device when imported (``train.py`` sets the simulated device count;
a script that loads the trained model sets its own), so other experiments can import it:

- ``corpus(spec)``: the Python standard library's own ``.py`` files as bytes (vocabulary 256),
  split into train and held-out by file. The file list is deterministic: every ``.py`` under
  ``sysconfig.get_paths()["stdlib"]``, sorted, without installed packages (``site-packages``,
  ``dist-packages``) and test suites (a ``test`` / ``tests`` / ``idle_test`` folder), then
  ordered by the SHA-256 of each relative path so that the byte budget samples the whole
  library rather than its first letters; each file contributes its first
  ``max_file_bytes``, files are taken until ``budget_bytes``, and every ``heldout_every``-th
  file goes to held-out. The corpus therefore depends on the Python version (its SHA-256
  is recorded with the results).
- ``windows(stream, starts, seq_len)``: (inputs, targets) rows for next-byte prediction.
- ``heldout_batches``: the fixed held-out evaluation set.
- ``save_trained`` / ``load_trained``: one msgpack file (``flax.serialization``) holding the
  config, the weights (``nnx.State`` as a pure dict) and the corpus spec and results.

Example:
    >>> model, cfg, meta = load_trained_with_meta("experiments/results/train_model.msgpack")
    >>> data = corpus(CorpusSpec(**meta["corpus"]))
    >>> x, y = heldout_batches(data.heldout, cfg.seq_len, batch=16, num_batches=8)[0]
    >>> loss = mean_loss(model, x, y)         # nats per byte
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig
from typing import Any

import numpy as np

VOCAB_SIZE = 256
FORMAT = "lwjax-bytelm-v1"
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Which bytes of the standard library form the corpus (the defaults in one place).

    Attributes:
        budget_bytes: bytes taken in all (train + held-out).
        max_file_bytes: at most this many bytes from the start of each file.
        heldout_every: file k (in hash order) is held out when k % heldout_every ==
            heldout_every - 1.
    """

    budget_bytes: int = 3 * 2**20
    max_file_bytes: int = 64 * 2**10
    heldout_every: int = 10

    def __post_init__(self) -> None:
        for name in ("budget_bytes", "max_file_bytes", "heldout_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"CorpusSpec.{name} must be >= 1, got {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and held-out byte streams (uint8; files joined end to end).

    Attributes:
        train, heldout: the streams.
        train_files, heldout_files: how many files each holds.
        stdlib: the folder read.
        sha256: digest of the train stream, then the held-out stream.
    """

    train: np.ndarray
    heldout: np.ndarray
    train_files: int
    heldout_files: int
    stdlib: str
    sha256: str

    def summary(self) -> str:
        return (f"{self.train.size:,} train bytes ({self.train_files} files), "
                f"{self.heldout.size:,} held-out bytes ({self.heldout_files} files) from the "
                f"Python standard library at {self.stdlib}; SHA-256 {self.sha256[:16]}")


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's ``.py`` files in corpus order (see the module docstring)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    key = lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest()  # noqa: E731
    return sorted(files, key=key)


def corpus(spec: CorpusSpec = CorpusSpec(), root: pathlib.Path | None = None) -> Corpus:
    """Reads the corpus ``spec`` describes.

    Example:
        >>> c = corpus(CorpusSpec(budget_bytes=2**16))
        >>> c.train.dtype, c.train.size + c.heldout.size
        (dtype('uint8'), 65536)
    """
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    taken = 0
    for k, path in enumerate(stdlib_files(root)):
        if taken >= spec.budget_bytes:
            break
        data = path.read_bytes()[: min(spec.max_file_bytes, spec.budget_bytes - taken)]
        parts[k % spec.heldout_every == spec.heldout_every - 1].append(data)
        taken += len(data)
    if not parts[True] or taken < spec.budget_bytes:
        raise ValueError(f"the standard library at {root} holds {taken:,} bytes of .py files "
                         f"(after the skips), less than the budget {spec.budget_bytes:,} or "
                         "too few files to hold any out; lower CorpusSpec.budget_bytes.")
    train, heldout = (np.frombuffer(b"".join(parts[h]), np.uint8) for h in (False, True))
    digest = hashlib.sha256(train.tobytes() + heldout.tobytes()).hexdigest()
    return Corpus(train, heldout, len(parts[False]), len(parts[True]), str(root), digest)


def windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Rows ``stream[s : s + seq_len]`` and the next bytes ``stream[s + 1 : s + seq_len + 1]``,
    int32 [len(starts), seq_len] each."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    rows = stream[idx].astype(np.int32)
    return rows[:, :-1], rows[:, 1:]


def train_batches(stream: np.ndarray, seq_len: int, batch: int, seed: int):
    """Endless (inputs, targets) batches of random windows of the train stream."""
    rng = np.random.default_rng(seed)
    while True:
        yield windows(stream, rng.integers(0, stream.size - seq_len - 1, batch), seq_len)


def heldout_batches(stream: np.ndarray, seq_len: int, batch: int,
                    num_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``num_batches`` batches of windows evenly spaced over the held-out stream (fixed)."""
    count = batch * num_batches
    starts = np.linspace(0, stream.size - seq_len - 1, count).astype(np.int64)
    x, y = windows(stream, starts, seq_len)
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch])
            for i in range(num_batches)]


def mean_loss(model, x, y) -> float:
    """Mean next-byte cross-entropy (nats) of ``model`` on one batch, on one device."""
    import optax

    logits = model(x)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


# ---- checkpoint ------------------------------------------------------------------------------


def _config_dict(cfg) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["dtype"] = np.dtype(cfg.dtype).name
    return out


def save_trained(path: pathlib.Path, model, cfg, meta: dict[str, Any]) -> pathlib.Path:
    """Writes the model's weights, its config and ``meta`` (msgpack-serializable: the corpus
    spec, steps, losses) to ``path``.

    Example:
        >>> save_trained(pathlib.Path("out/m.msgpack"), model, cfg, {"steps": 300})
    """
    from flax import nnx, serialization

    payload = {"format": FORMAT, "config": _config_dict(cfg), "meta": meta,
               "state": nnx.state(model).to_pure_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.msgpack_serialize(_numpy(payload)))
    return path


def _numpy(tree):
    import jax

    return jax.tree.map(lambda a: np.asarray(a) if hasattr(a, "shape") else a, tree)


def load_trained_with_meta(path) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, cfg, meta)`` from a file ``save_trained`` wrote (see ``load_trained``)."""
    import jax.numpy as jnp
    from flax import nnx, serialization

    from lwjax import models

    payload = serialization.msgpack_restore(pathlib.Path(path).read_bytes())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint (format "
                         f"{payload.get('format')!r}); write it with experiments/train.py.")
    fields = dict(payload["config"])
    fields["dtype"] = jnp.dtype(fields["dtype"])
    cfg = models.configs.DenseConfig(**fields)
    model = models.build(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, _int_keys(payload["state"]))
    nnx.update(model, state)
    return model, cfg, payload["meta"]


def _int_keys(tree):
    """msgpack keeps dict keys as written; ``nnx.List`` indices were ints."""
    if not isinstance(tree, dict):
        return tree
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
            for k, v in tree.items()}


def load_trained(path) -> tuple[Any, Any]:
    """The model ``experiments/train.py`` trained, and its ``DenseConfig``.

    The weights are the ones trained through the layer-wise pipeline (exported with
    ``TrainStep.export_params``); ``load_trained_with_meta`` also returns the corpus spec
    and the training record, to rebuild the held-out set.

    Example:
        >>> model, cfg = load_trained("experiments/results/train_model.msgpack")
        >>> model(jnp.zeros((1, cfg.seq_len), jnp.int32)).shape
        (1, 128, 256)
    """
    model, cfg, _ = load_trained_with_meta(path)
    return model, cfg
