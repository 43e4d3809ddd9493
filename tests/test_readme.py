"""The README's usage example runs as written (on the 16 simulated devices of conftest)."""

import pathlib
import re


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    usage = readme.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    # conftest already set 16 devices before any device was touched; the example's own
    # jax.config line is for a fresh interpreter and must not fail here either.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "plan.png").stat().st_size > 0
    assert namespace["sm"].plan.stages
