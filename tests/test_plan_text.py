"""What a plan says and reads: Plan.from_json on text that is not a plan, the stage table's
layer names, the step objective's note, and the CLI's messages in flags.

Oracles: hand-built per-layer numbers (costs and bytes chosen so the projected steps are
worked out by hand), and messages compared word for word where they are the point.
"""

from __future__ import annotations

import json

import pytest

from lwjax import cli
from lwjax.errors import PlanFormatError
from lwjax.passes.footprint import Footprint
from lwjax.passes.planner import plan_from_numbers
from lwjax.plan import LayerNumbers, Plan, layer_span

EMPTY = Footprint(weights_bytes=0, activation_bytes=0, buffer_bytes=0)


def _numbers(names, costs_s) -> LayerNumbers:
    layer = Footprint(weights_bytes=100, activation_bytes=10, buffer_bytes=0)
    return LayerNumbers(names=tuple(names), footprints=(layer,) * len(names), prologue=EMPTY,
                        epilogue=EMPTY, costs_s=tuple(costs_s))


def _plan(names=("layers_0", "layers_1", "layers_2", "layers_3"), costs_s=None, *,
          microbatches=1, concurrency=None, objective="bottleneck", devices=4) -> Plan:
    return plan_from_numbers(
        _numbers(names, costs_s or [1.0] * len(names)), capacity_bytes=10_000,
        device_ids=range(devices), hardware="test", compression="none",
        microbatches=microbatches, microbatch_size=1, mode="prefill", objective=objective,
        concurrency=concurrency)


# ---- Plan.from_json -------------------------------------------------------------------------

TAIL = ("The text must be a plan as Plan.to_json() writes it: correct {}, or write the plan "
        "again with plan.to_json().")


def _error(text) -> str:
    with pytest.raises(PlanFormatError) as e:
        Plan.from_json(text)
    assert str(e.value).startswith("Plan.from_json: ")
    return str(e.value)


def _edited(plan: Plan, edit) -> str:
    data = json.loads(plan.to_json())
    edit(data)
    return json.dumps(data)


def test_from_json_round_trips_and_reads_plans_without_later_fields():
    p = _plan()
    assert Plan.from_json(p.to_json()) == p
    older = _edited(p, lambda d: [d.pop("method"), d["numbers"].pop("epilogue_s")])
    assert Plan.from_json(older) == p  # fields with defaults may be absent


def test_from_json_not_json_or_not_text():
    assert _error("not json").startswith(
        "Plan.from_json: the text is not JSON (Expecting value at line 1 column 1; it starts "
        "'not json'). Pass the string Plan.to_json() returned; to load a file, read it first")
    with pytest.raises(PlanFormatError, match="got a dict. To load a file"):
        Plan.from_json({})


def test_from_json_names_missing_fields():
    assert _error("{}").startswith(
        "Plan.from_json: the plan lacks the Plan fields stages, capacity_bytes, hardware, "
        "compression, microbatches, microbatch_size, mode, residency, attention, strategy, "
        "notes, numbers, device_pool. " + TAIL.format("it"))
    text = _edited(_plan(), lambda d: d["numbers"]["footprints"][2].pop("weights_bytes"))
    assert _error(text) == ("Plan.from_json: numbers.footprints[2] lacks the Footprint field "
                            "weights_bytes. " + TAIL.format("numbers.footprints[2]"))


@pytest.mark.parametrize(("edit", "says"), [
    (lambda d: d.update(microbatches="4"), 'microbatches is "4" (a string); expected an integer'),
    (lambda d: d.update(microbatches=True), "microbatches is true (a boolean); expected an "
                                            "integer"),
    (lambda d: d.update(residency="some"), "residency is \"some\" (a string); expected one of "
                                           "'all', 'weights'"),
    (lambda d: d["stages"][1].update(est_time_s=None), "stages[1].est_time_s is null (null); "
                                                       "expected a finite number"),
    (lambda d: d["stages"][0].update(layer_range=[0]), "stages[0].layer_range has 1 entries; "
                                                       "expected 2"),
    (lambda d: d.update(notes="none"), 'notes is "none" (a string); expected a list'),
    (lambda d: d.update(numbers=[]), "numbers is [] (a list); expected an object with the "
                                     "fields of LayerNumbers"),
    (lambda d: d.update(microbatchs=4), "the plan has the unknown field 'microbatchs' (Plan has "
                                        "stages, capacity_bytes,"),
])
def test_from_json_names_mistyped_fields(edit, says):
    assert says in _error(_edited(_plan(), edit))


@pytest.mark.parametrize(("edit", "says"), [
    (lambda d: d["stages"][1].update(layer_range=[2, 3]),
     "stages[1].layer_range is [2, 3]; expected [1, b] with 1 < b <= 4"),
    (lambda d: d["stages"][1].update(layers=["layers_2"]),
     "stages[1].layers is ['layers_2']; numbers.names[1:2] is ['layers_1']"),
    (lambda d: d["stages"][3].update(devices=[7]),
     "stages[3].devices is [7]; expected tp=1 ids from device_pool [0, 1, 2, 3]"),
    (lambda d: d["numbers"]["costs_s"].pop(), "numbers.costs_s has 3 entries but numbers.names "
                                              "has 4"),
    (lambda d: d["numbers"].update(cached=[[]]), "numbers.cached has 1 entries; expected 6 "
                                                 "(the prologue, 4 layers, the epilogue) or none"),
    (lambda d: d["stages"].pop(), "stages ends at layer 3; numbers.names has 4 layers"),
    (lambda d: d.update(microbatches=0), "microbatches is 0; expected a positive integer"),
    (lambda d: d.update(tp=-1), "tp is -1; expected a positive integer"),
    (lambda d: d.update(mode="junk"), "mode is \"junk\" (a string); expected one of 'prefill'"),
])
def test_from_json_checks_stages_against_the_numbers(edit, says):
    assert says in _error(_edited(_plan(), edit))


# ---- the stage table ------------------------------------------------------------------------

@pytest.mark.parametrize(("layers", "cell"), [
    (["MyGPT/block_0", "MyGPT/block_3", "MyGPT/block_5"], "MyGPT/block_0..block_5"),
    (["FlaxGPT2LMHeadModule/transformer/h/3", "FlaxGPT2LMHeadModule/transformer/h/5"],
     "FlaxGPT2LMHeadModule/transformer/h/3..5"),
    (["model/layers/0", "model/layers/1"], "model/layers/0..1"),
    (["layers_0", "layers_15"], "layers_0..layers_15"),
    (["enc/h/1", "dec/h/0"], "enc/h/1..dec/h/0"),
    (["model/layers/9"], "model/layers/9"),
])
def test_layer_span_keeps_whole_names(layers, cell):
    assert layer_span(layers) == cell


def test_summary_shows_long_layer_names_whole_and_aligned():
    names = [f"FlaxGPT2LMHeadModule/transformer/h/{i}" for i in range(6)]
    p = _plan(names, devices=3)
    lines = p.summary().splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("stage"))
    rows = lines[header + 1:header + 1 + len(p.stages)]
    assert [r.split()[1] for r in rows] == [
        "FlaxGPT2LMHeadModule/transformer/h/0..1", "FlaxGPT2LMHeadModule/transformer/h/2..3",
        "FlaxGPT2LMHeadModule/transformer/h/4..5"]
    column = lines[header].index("devices")
    assert all(r[column - 1] == " " and r[column] != " " for r in rows)  # devices line up
    assert lines[0].startswith("Plan: 3 stages on 3 of 3 devices (test)")
    assert _plan(devices=1).summary().startswith("Plan: 1 stage on 1 of 1 devices")


def test_model_report_shows_long_segment_names_whole_and_aligned():
    from lwjax.report import LayerReport, ModelReport

    def row(name, kind="layer"):
        return LayerReport(name=name, kind=kind, footprint=EMPTY, signature="s", num_params=0)

    names = [f"FlaxGPT2LMHeadModule/transformer/h/{i}" for i in range(2)]
    report = ModelReport(layers=tuple(map(row, names)), prologue=row("prologue", "prologue"),
                         epilogue=row("epilogue", "epilogue"), mode="prefill",
                         microbatch_size=1, compression="none", attention="as_traced")
    lines = report.summary(capacity_bytes=2**20).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("segment"))
    rows = lines[header + 1:header + 5]
    assert [r.split()[0] for r in rows] == ["prologue", *names, "epilogue"]
    column = lines[header].index("weights") + len("weights")  # right-aligned numbers
    assert all(r[column - 4:column] == "0.00" for r in rows)


# ---- the step objective's note --------------------------------------------------------------

def test_step_note_on_a_tie_says_equal_and_why_fewer_stages():
    # 4 equal 1 s layers on cores they share: every stage count costs M x all layers = 16 s
    p = _plan(microbatches=4, concurrency=2, objective="step")
    assert len(p.stages) == 1
    assert p.notes == (
        "1 stage instead of 4: the projected GPipe step is the same (16000.000 ms for both; the "
        "stages share one host's cores, so every stage count does the same work, M x all "
        "stages' time); ties go to fewer stages",)


def test_step_note_when_shorter_gives_the_difference():
    # costs [3, 1, 1, 3] s, M = 1: the least bottleneck (3 s) takes 3 stages [3 | 1 1 | 3],
    # 3 ticks x 3 s = 9 s; one stage is 1 tick x 8 s (two stages, 2 x 4 s, tie with it)
    p = _plan(costs_s=[3.0, 1.0, 1.0, 3.0], microbatches=1, objective="step")
    assert [s.layer_range for s in p.stages] == [(0, 4)]
    assert p.notes == ("1 stage instead of 3: the projected GPipe step is 11.1% shorter "
                       "(8000.000 vs 9000.000 ms)",)


def test_close_step_times_get_enough_digits_to_differ():
    from lwjax.passes.planner import _fewer_stages_note

    note = _fewer_stages_note(3, 16, 0.0008821, 0.0008824, None)
    assert note == ("3 stages instead of 16: the projected GPipe step is 0.034% shorter "
                    "(0.8821 vs 0.8824 ms)")


# ---- the CLI speaks in flags ----------------------------------------------------------------

PYTHON_WORDS = ("lwjax.", "None", "allow=", "cache_bytes", "microbatches=", "residency='",
                "num_devices", "compression=")


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["--compression", "int3"], 2, "--compression int3: unknown preset; use one of none, int8,"),
    (["--model", "gpt-5"], 2, "--model gpt-5: unknown preset; known: seed-dense,"),
    (["--hardware", "tpu9"], 2, "--hardware tpu9: unknown preset; known: h100,"),
    (["--allow", "split,prune"], 2, "--allow split,prune: unknown strategy 'prune'; give some "
                                    "of split, compress, microbatch, comma-separated"),
    (["--allow", "split,split"], 2, "--allow split,split: 'split' listed twice"),
    (["--microbatches", "3"], 2, "--microbatches 3: tiny-dense's batch of 4 sequences does not "
                                 "divide into 3 microbatches; use one of 1, 2, 4."),
    (["--microbatches", "0"], 2, "--microbatches must be at least 1, got 0."),
    (["--hardware", "cpu", "--persisting"], 2, "--persisting: host CPU has no persisting-L2 "
                                               "limit; give the capacity with --cache-mib"),
    (["--cache-mib", "0.03", "--allow", ""], 1, "Shrink the microbatch (a larger "
                                                "--microbatches), raise --cache-mib, or plan "
                                                "with --residency weights"),
    (["--cache-mib", "0.2", "--allow", ""], 1, "compress its weights, shrink the microbatch (a "
                                               "larger --microbatches), or plan with "
                                               "--residency weights."),
    (["--devices", "2", "--cache-mib", "0.2", "--allow", "split"], 1,
     "(not allowed here: add compress to --allow). Not allowed by --allow: compress, "
     "microbatch."),
    (["--devices", "2", "--cache-mib", "0.05"], 1, "at least 4 devices (1 stage x tp=4,"),
])
def test_cli_errors_speak_in_flags(capsys, argv, code, says):
    base = ["plan", "--model", "tiny-dense", "--devices", "4"]
    assert cli.main(base + argv) == code
    err = capsys.readouterr().err
    assert says in err
    assert not [w for w in PYTHON_WORDS if w in err], err


def test_a_tied_embedding_counts_in_both_outside_segments():
    """The plan's outside share counts weight bytes per segment, as the stages hold them; the
    analysis counts every parameter once. With the embedding tied to the head the first
    exceeds the second by the table's bytes, and the summary says so."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    import lwjax
    from lwjax import models

    cfg = dataclasses.replace(models.configs.tiny_dense(), tie_embeddings=True)
    model = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, cfg.seq_len), jnp.int32)
    plan = lwjax.plan(model, tokens, num_devices=2, cache_bytes=2**30, objective="bottleneck")
    table = cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.dtype).itemsize
    n = plan.numbers
    layers = sum(f.weights_bytes for f in n.footprints)
    outside = n.prologue.weights_bytes + n.epilogue.weights_bytes
    assert outside >= 2 * table  # the table in the prologue and again in the epilogue
    analyzed = lwjax.analyze(model, tokens).outside_weights_share
    assert analyzed == pytest.approx((outside - table) / (outside - table + layers), rel=1e-6)
    assert plan.outside_weights_share == pytest.approx(outside / (outside + layers))
    assert "a weight read in several segments (a tied embedding) counts in each" in \
        plan.summary()
