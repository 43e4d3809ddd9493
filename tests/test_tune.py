"""Measured tuning (lwjax/tune.py): layerwise_shard(..., tune=k) builds the layout search's k best
layouts of distinct (S, tp, M), times them and keeps the fastest, which equals the model."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lwjax
from lwjax import models, tune
from lwjax.errors import ConfigError
from lwjax.passes import strategies

ATOL = RTOL = 1e-5
CFG = models.configs.tiny_dense()


@pytest.fixture(scope="module")
def tiny():
    model = models.build(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (8, CFG.seq_len), 0, CFG.vocab_size,
                                jnp.int32)
    return model, tokens


def _shape(p):
    return len(p.stages), p.tp, p.microbatches


def test_search_plans_are_the_ranking_best_first(tiny, monkeypatch):
    """The first plan is what lwjax.plan gives; the others have other (S, tp, M), each
    projected no faster than the one before, and say their rank."""
    model, tokens = tiny
    found = []
    real = strategies.search_plans
    monkeypatch.setattr(lwjax._api, "search_plans",
                        lambda g, t, top=1: found.append(real(g, t, top)) or found[-1])
    sm = lwjax.layerwise_shard(model, tokens, cache_bytes=400_000, tune=3)
    plans = found[-1]
    first = lwjax.plan(model, tokens, devices=jax.devices(), cache_bytes=400_000,
                       allow=("split", "microbatch"))
    assert len(plans) == 3 and _shape(plans[0]) == _shape(first)
    assert [s.layer_range for s in plans[0].stages] == [s.layer_range for s in first.stages]
    assert len({_shape(p) for p in plans}) == 3
    for rank, p in enumerate(plans[1:], 2):
        assert any(n.startswith(f"layout search: candidate {rank} of the ranking") for n in p.notes)
    # the kept one is a candidate, measured, and runs the model's answers
    assert _shape(sm.plan) in {_shape(p) for p in plans}
    note = next(n for n in sm.plan.notes if n.startswith("tuned:"))
    # every candidate is measured or named as refused (a split XLA would make hang)
    assert all(f"{i}. {_shape(p)[0]} x tp {_shape(p)[1]}, M={_shape(p)[2]}" in note
               for i, p in enumerate(plans, 1))
    assert note.count(" ms") + note.count("refused by the lowering") == 3
    assert "kept candidate" in note
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)


def test_fastest_keeps_the_shortest_median():
    delays = {"a": 0.03, "b": 0.0, "c": 0.015}
    best, medians = tune.fastest(list(delays), lambda k: time.sleep(delays[k]), rounds=3)
    assert best == "b"
    assert medians[0] >= 0.03 and medians[1] < 0.015
    # within the margin of the first (the search's choice), the first stays
    close = {"a": 0.030, "b": 0.0295}
    assert tune.fastest(list(close), lambda k: time.sleep(close[k]), margin=0.2)[0] == "a"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_tune_must_be_a_count(tiny, bad):
    model, tokens = tiny
    with pytest.raises(ConfigError, match="tune="):
        lwjax.layerwise_shard(model, tokens, tune=bad)


def test_abstract_arguments_are_timed_on_zeros():
    args, kwargs = tune.concrete((jax.ShapeDtypeStruct((2, 3), jnp.int32),),
                                 {"mask": jax.ShapeDtypeStruct((3,), jnp.bool_), "k": 1})
    assert args[0].shape == (2, 3) and args[0].dtype == jnp.int32 and not args[0].any()
    assert kwargs["mask"].dtype == jnp.bool_ and kwargs["k"] == 1


def test_a_first_choice_the_lowering_refuses_falls_back_to_the_next(tiny, monkeypatch):
    """A split the lowering refuses (SplitError: XLA would run a collective inside a stage's
    branch) does not end the call: the next layout of the ranking runs, and the notes say
    what was refused. With tune= the refused candidate is named and skipped."""
    from lwjax import _api
    from lwjax.errors import SplitError

    model, tokens = tiny
    real, calls = _api.lower, []

    def refuse_first(*a, **kw):
        calls.append(kw.get("tp"))
        if len(calls) == 1:
            raise SplitError("Stage 0 split over tp=2 would hang. Change: another tp.")
        return real(*a, **kw)

    monkeypatch.setattr(_api, "lower", refuse_first)
    sm = lwjax.layerwise_shard(model, tokens, cache_bytes=400_000)
    note = next(n for n in sm.plan.notes if n.startswith("refused by the lowering"))
    assert "1. " in note and "SplitError: Stage 0 split over tp=2 would hang" in note
    assert "running candidate 2" in note and len(calls) == 2
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)
    calls.clear()
    tuned = lwjax.layerwise_shard(model, tokens, cache_bytes=400_000, tune=2)
    note = next(n for n in tuned.plan.notes if n.startswith("tuned:"))
    assert "refused by the lowering: SplitError" in note and "kept candidate 2" in note
