"""Measured tuning (lwjax/tune.py): layerwise_shard(..., tune=k) builds the layout search's k best
layouts of distinct (S, tp, M), times them and keeps the fastest, which equals the model; a
layout the lowering refuses (SplitError) is skipped for the next one, with or without tune."""

from __future__ import annotations

import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lwjax
from lwjax import _api, models, tune
from lwjax.errors import ConfigError, SplitError
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


def _label(p):
    return f"{len(p.stages)} x tp {p.tp}, M={p.microbatches}"


@pytest.fixture
def ranked(monkeypatch):
    """Records the plans the layout search hands to layerwise_shard."""
    found = []
    real = strategies.search_plans
    monkeypatch.setattr(_api, "search_plans",
                        lambda g, t, top=1: found.append(real(g, t, top)) or found[-1])
    return found


def test_tune_measures_the_ranking_and_keeps_a_candidate(tiny, ranked):
    """The plans are the ranking, best first: the first is what lwjax.plan gives, the others
    have other (S, tp, M), each projected no faster than the one before and saying its rank;
    the kept one was measured (or named as refused) and runs the model's answers."""
    model, tokens = tiny
    sm = lwjax.layerwise_shard(model, tokens, cache_bytes=400_000, tune=3)
    plans = ranked[-1]
    first = lwjax.plan(model, tokens, devices=jax.devices(), cache_bytes=400_000,
                       allow=("split", "microbatch"))
    assert len(plans) >= 3 and _shape(plans[0]) == _shape(first)
    assert [s.layer_range for s in plans[0].stages] == [s.layer_range for s in first.stages]
    assert len({_shape(p) for p in plans}) == len(plans)
    winner = float(re.search(r"wins at ([\d.]+) ms", " ".join(plans[0].notes)).group(1))
    projected = [winner]
    for rank, p in enumerate(plans[1:], 2):
        note = next(n for n in p.notes if n.startswith(f"layout search: candidate {rank} "))
        projected.append(float(re.search(r"at ([\d.]+) ms projected", note).group(1)))
    assert projected == sorted(projected)
    # each plan carries its projected step: the figure the notes quote, to the printed digit
    assert [f"{p.layout_step_s * 1e3:.3f}" for p in plans] == [f"{x:.3f}" for x in projected]
    note = next(n for n in sm.plan.notes if n.startswith("tuned:"))
    named = [p for p in plans if f". {_label(p)}" in note]
    assert len(named) >= 3 and named == plans[:len(named)]  # the best ones, in order
    assert note.count(" ms") == 3 and "kept candidate" in note  # three that lower, measured
    assert _shape(sm.plan) in {_shape(p) for p in named}
    # the same measurements as data: rank, layout and median of each, the kept one marked
    assert [(m.rank, (m.num_stages, m.tp, m.microbatches)) for m in sm.tuning] == [
        (plans.index(p) + 1, _shape(p)) for p in named]
    assert [f"{m.median_s * 1e3:.1f} ms" for m in sm.tuning] == re.findall(r"[\d.]+ ms", note)
    assert [m.projected_s for m in sm.tuning] == [
        plans[m.rank - 1].layout_step_s for m in sm.tuning]
    kept = [m for m in sm.tuning if m.kept]
    assert len(kept) == 1 and (kept[0].num_stages, kept[0].tp, kept[0].microbatches) == _shape(
        sm.plan)
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
    assert tune.check_tune(np.int64(2)) == 2


def test_abstract_arguments_are_timed_on_zeros():
    args, kwargs = tune.concrete((jax.ShapeDtypeStruct((2, 3), jnp.int32),),
                                 {"mask": jax.ShapeDtypeStruct((3,), jnp.bool_), "k": 1})
    assert args[0].shape == (2, 3) and args[0].dtype == jnp.int32 and not args[0].any()
    assert kwargs["mask"].dtype == jnp.bool_ and kwargs["k"] == 1


def _refusing(monkeypatch, refuse: int):
    """lower() raising SplitError for its first ``refuse`` calls."""
    real, calls = _api.lower, []

    def lower(*a, **kw):
        calls.append(kw.get("tp"))
        if len(calls) <= refuse:
            raise SplitError(f"Stage 0 split over tp=2 would hang (call {len(calls)}). Change: x.")
        return real(*a, **kw)

    monkeypatch.setattr(_api, "lower", lower)
    return calls


def test_a_first_choice_the_lowering_refuses_falls_back_to_the_next(tiny, ranked,
                                                                     monkeypatch):
    """A split the lowering refuses (SplitError: XLA would run a collective inside a stage's
    branch) does not end the call: the ranking's next layout runs, the notes say what was
    refused. With tune= the refused candidate is named and skipped; when every layout is
    refused, the first error is raised, naming the others."""
    model, tokens = tiny
    calls = _refusing(monkeypatch, 1)
    sm = lwjax.layerwise_shard(model, tokens, cache_bytes=400_000)
    plans = ranked[-1]
    assert _shape(sm.plan) == _shape(plans[1]) and len(calls) == 2
    note = next(n for n in sm.plan.notes if n.startswith("refused by the lowering"))
    assert f"1. {_label(plans[0])} (SplitError: Stage 0 split over tp=2 would hang" in note
    assert "running candidate 2" in note
    np.testing.assert_allclose(sm(tokens), model(tokens), atol=ATOL, rtol=RTOL)
    calls.clear()
    tuned = lwjax.layerwise_shard(model, tokens, cache_bytes=400_000, tune=2)
    note = next(n for n in tuned.plan.notes if n.startswith("tuned:"))
    assert f"1. {_label(plans[0])} (SplitError" in note and note.count(" ms") == 2
    # candidate 1 refused, then built until two lower
    assert len(calls) == 3 and "kept candidate" in note


def test_every_layout_refused_raises_the_first_error_naming_the_rest(tiny, ranked,
                                                                     monkeypatch):
    model, tokens = tiny
    _refusing(monkeypatch, 100)
    with pytest.raises(SplitError, match=r"\(call 1\).*The next 3 layouts of the layout "
                                         r"search were refused too: 2\. "):
        lwjax.layerwise_shard(model, tokens, cache_bytes=400_000)
    assert len(ranked[-1]) == tune.FALLBACK


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, tokens, mask):
        x = nn.Embed(32, 16)(tokens) * mask[..., None]
        for i in range(4):
            x = x + nn.Dense(16, name=f"layers_{i}")(x)
        return x


def test_a_linen_model_is_tuned_on_its_call_arguments():
    """A linen model takes its variables first; tuning calls the ShardedModel without them."""
    model = _Linen()
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(4, 4) % 32
    mask = jnp.ones((4, 4))
    variables = model.init(jax.random.key(0), tokens, mask)
    sm = lwjax.layerwise_shard(model, variables, tokens, mask, devices=jax.devices()[:4],
                               cache_bytes=8_000, tune=2)
    assert any(n.startswith(("tuned:", "tune=2: one layout")) for n in sm.plan.notes)
    np.testing.assert_allclose(sm(tokens, mask), model.apply(variables, tokens, mask),
                               atol=ATOL, rtol=RTOL)
