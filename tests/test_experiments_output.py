"""Experiments write to the git-ignored experiments/out/ unless --write-results asks for the
committed copies in experiments/results/: running the README's main job leaves the checkout
as it was."""

import pathlib
import re
import subprocess

import pytest
from _experiments import EXPERIMENTS, load_experiment

# copies under names of their own (output_<name>), loaded afresh on each call
common = load_experiment("_common", module_name="output__common")


def test_default_output_is_git_ignored_and_results_are_not():
    out, results = common.output_dir(False), common.output_dir(True)
    assert results == EXPERIMENTS / "results" and out == EXPERIMENTS / "out"
    root = EXPERIMENTS.parent

    def ignored(path: pathlib.Path) -> bool:
        rel = path.relative_to(root) / "x.md"
        return subprocess.run(["git", "check-ignore", "-q", str(rel)], cwd=root).returncode == 0

    assert ignored(out)
    assert not ignored(results)


def test_no_script_writes_the_committed_results_by_itself():
    # Only _common names experiments/results/; every script picks its folder with
    # output_dir(--write-results), so nothing writes there unless asked.
    for script in sorted(EXPERIMENTS.glob("*.py")):
        if script.name == "_common.py":
            continue
        text = script.read_text()
        code = re.sub(r'"""(.*?)"""', "", text, flags=re.S)  # docstrings may name the folder
        assert not re.search(r"\bRESULTS\b", code) and '"results"' not in code, script.name
        if re.search(r"write_results\(|write_text\(|savefig\(|\.figure\(", code):
            assert "output_dir(" in code and "--write-results" in text, script.name


@pytest.mark.parametrize("argv, folder", [([], "out"), (["--write-results"], "results")])
def test_memory_breakdown_writes_where_the_flag_says(tmp_path, monkeypatch, argv, folder):
    memory = load_experiment("memory_breakdown", module_name="output_memory_breakdown")
    common_there = memory._common  # the _common instance the script imported
    monkeypatch.setattr(common_there, "OUT", tmp_path / "out")
    monkeypatch.setattr(common_there, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(memory, "report_markdown", lambda: "# tables\n")
    memory.main(argv)
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.md")] == \
        [f"{folder}/memory_breakdown.md"]
    memory.main([*argv, "--no-write"])  # prints only
    assert len(list(tmp_path.rglob("*.md"))) == 1
