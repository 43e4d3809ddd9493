"""experiments/train_bench.py: the memory comparison and the projections run and say what
they claim; the whole quick run (every method timed) is slow."""

import subprocess
import sys

import pytest
from _experiments import EXPERIMENTS, load_experiment

train_bench = load_experiment("train_bench")


def test_1f1b_stash_is_s_over_m_of_gpipes_and_temp_bytes_follow():
    gpipe, one = train_bench.measure_memory(train_bench.QUICK)
    assert (gpipe.schedule, one.schedule) == ("gpipe", "1f1b")
    assert gpipe.stash_slots == gpipe.microbatches
    assert one.stash_slots <= one.stages
    # XLA's temporary bytes drop by at least the stash bytes 1F1B saves
    assert gpipe.temp_bytes - one.temp_bytes >= gpipe.stash_bytes - one.stash_bytes > 0


def test_projected_rows_compare_against_tp8_pp2_gpipe():
    rows = train_bench.projected_rows()
    assert len(rows) == 12
    base = [r for r in rows if r[1].startswith("TP=8 x PP=2, GPipe")]
    assert [r[4] for r in base] == ["1.00x", "1.00x"]


@pytest.mark.slow
def test_quick_run_from_the_command_line(tmp_path):
    script = EXPERIMENTS / "train_bench.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--no-write"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vs best TP=8 x PP=2" in out.stdout and "1F1B's stash is 0.50 of GPipe's" in out.stdout
