"""The README's usage example runs as written (on the 16 simulated devices of conftest), says
what its plan is, and the fresh-clone section stays two commands."""

import pathlib
import re

import numpy as np

import lwjax

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()


def test_readme_usage_example_runs(tmp_path, monkeypatch):
    usage = README.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    # conftest already set 16 devices before any device was touched; the example's own
    # jax.config line is for a fresh interpreter and must not fail here either.
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "plan.png").stat().st_size > 0
    assert namespace["sm"].plan.stages

    # what the text after the example says about step 2 on a CPU host
    sm, model, tokens = namespace["sm"], namespace["model"], namespace["tokens"]
    assert len(sm.plan.stages) == 1
    assert any(n.startswith("layout search") and "1 x tp 1, M=4" in n for n in sm.plan.notes)
    step2 = dict(devices=namespace["jax"].devices(), microbatches=4, allow=("split", "microbatch"))
    bottleneck = lwjax.plan(model, tokens, cache_bytes=2**20, objective="bottleneck", **step2)
    assert len(bottleneck.stages) == 4
    assert len(lwjax.plan(model, tokens, cache_bytes=2**19, **step2).stages) == 2


def test_readme_own_model_example_runs():
    """The second Usage block (a transformers model, layers=, plan=) runs after the first's
    imports."""
    usage = README.split("## Usage", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", usage, re.S)
    assert len(blocks) == 6
    namespace: dict = {}
    exec(compile("import jax, jax.numpy as jnp, numpy as np, lwjax\n" + blocks[1],
                 "README.md", "exec"), namespace)
    assert len(namespace["gpt"].plan.stages) == 4
    assert [r.name.rsplit("/", 1)[-1] for r in namespace["report"].layers] == ["0", "1", "2", "3"]
    assert 1 not in {d for s in namespace["again"].plan.stages for d in s.devices}


def test_fresh_clone_section_is_two_commands():
    section = README.split("## Two commands for a fresh clone", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and
                not line.lstrip().startswith("#")]
    assert commands == ["pip install -e . && python experiments/demo.py",
                        "pip install -e '.[test]' && python -m pytest -q"]
    assert "experiments/out/ (git-ignored)" in block


def test_readme_generation_example_runs():
    """The third Usage block (layerwise_generate, mixed lengths, the baseline) runs."""
    usage = README.split("## Usage", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", usage, re.S)[2]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    g = namespace["g"]
    assert len(g.plan.stages) == 4 and g.plan.mode == "decode"
    assert namespace["short"].shape == (8, 16)


def test_readme_training_example_runs():
    """The fourth Usage block (value_and_grad, train_step, export_params) runs after the
    third's imports, and its gradients are the model's."""
    usage = README.split("## Usage", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", usage, re.S)[3]
    namespace: dict = {}
    exec(compile("import jax, jax.numpy as jnp, numpy as np, lwjax\nfrom flax import nnx\n"
                 "from lwjax import models\n" + block, "README.md", "exec"), namespace)
    assert len(namespace["sm"].plan.stages) == 4
    assert float(namespace["loss"]) < float(namespace["loss0"])   # three adamw steps later


def test_readme_compression_example_runs():
    """The fifth Usage block (compressed forward, recompress, compressed generation) runs."""
    usage = README.split("## Usage", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", usage, re.S)[4]
    namespace: dict = {}
    exec(compile("import dataclasses, jax, jax.numpy as jnp, numpy as np, lwjax\n"
                 "from flax import nnx\nfrom lwjax import models\n" + block, "README.md",
                 "exec"), namespace)
    small, smaller = namespace["small"], namespace["smaller"]
    assert small.plan.compression == "int8-2:4" and len(small.plan.stages) == 4
    assert smaller.recompressed.bytes_after[3] < smaller.recompressed.bytes_before[3]
    assert namespace["g"].plan.compression == "int8"


def test_readme_failover_example_runs():
    """The sixth Usage block (replan after a loss, a hot spare, a generator) runs."""
    usage = README.split("## Usage", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", usage, re.S)[5]
    namespace: dict = {}
    exec(compile("import jax, jax.numpy as jnp, numpy as np, lwjax\n"
                 "from flax import nnx\nfrom lwjax import models\n" + block, "README.md",
                 "exec"), namespace)
    after, switched = namespace["after"], namespace["switched"]
    assert 2 not in {d for st in after.plan.stages for d in st.devices}
    assert after.failover.bytes_arrived == after.failover.bytes_needed > 0
    assert switched.failover.kind == "switch" and switched.failover.compile_s == 0
    np.testing.assert_allclose(switched(namespace["tokens"]),
                               namespace["model"](namespace["tokens"]), atol=1e-4)
    assert 3 not in {d for st in namespace["g2"].plan.stages for d in st.devices}
