"""experiments/memory_breakdown.py: the claims table against hand arithmetic."""

import pytest
from _experiments import load_experiment

mb = load_experiment("memory_breakdown")
B, T, D, F = 128, 10_000, 4096, 16_384  # seed 000's batch and the seed_dense dimensions
FP16 = 2


@pytest.fixture(scope="module")
def rows():
    return {(r.seed, r.item): r for r in mb.claim_rows("seed_dense")}


def test_activation_claim_disagrees_and_lwjax_counts_the_layer_input(rows):
    row = rows["000", "activations"]
    assert row.claim_value == "98.3"
    assert row.verdict == "DISAGREES"
    assert row.computed_bytes == B * T * D * FP16  # the [B, T, D] FP16 hidden states
    assert mb.layer_input("seed_dense", B) == ((B, T, D), "float16", B * T * D * FP16)


def test_qkv_weight_claim_agrees(rows):
    row = rows["000", "attention QKV weights"]
    assert row.claim_value == "100.7"
    assert row.computed_bytes == D * 3 * D * FP16 == 100_663_296
    assert row.verdict == "AGREES"


def test_further_optimisation_claim_disagrees(rows):
    row = rows["000", "further optimisation"]
    assert row.claim_value == "49.5"
    assert row.verdict == "DISAGREES"
    assert row.computed_bytes > 49.5e6
    # Even the most aggressive preset's weights alone exceed the claim.
    tiny = mb.analysis("seed_dense", 1, "int4-75%").layers[0].footprint
    assert tiny.weights_bytes > 49.5e6


def test_per_weight_bytes_sum_to_the_report():
    for policy in mb.COMPRESSIONS:
        per_weight = mb.layer_weight_bytes("seed_dense", policy)
        report = mb.analysis("seed_dense", 16, policy)
        assert sum(per_weight.values()) == report.layers[0].footprint.weights_bytes


def test_tolerance_reads_the_claims_precision():
    def row(value, computed, unit="MB"):
        return mb.ClaimRow("000", "x", "x", value, unit, computed, "", "", "")

    assert row("0.016", 2 * 4096 * FP16).agrees  # 0.0164 MB written to three decimals
    assert not row("0.016", 17_000).agrees
    assert row("537", 536_887_296).agrees  # within 1%
    assert not row("98.3", B * T * D * FP16).agrees


def test_tables_render(rows):
    table = mb.claims_table(list(rows.values()))
    assert table.count("\n") == len(rows) + 1
    assert "**DISAGREES**" in table and "**AGREES**" in table
    labels = [label for label, _ in mb.segment_rows(mb.analysis("seed_dense", 16))]
    assert labels[0] == "prologue" and labels[-1] == "epilogue"
    assert labels[1].startswith("layers_0 .. ")
