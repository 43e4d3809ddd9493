"""The README's main job: the seed configurations, their parameter counts and per-layer bytes.

Everything here is computed from the abstract models (``models.abstract``): no weights are
allocated. Run: ``python experiments/demo.py``.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lwjax import models
from lwjax.models import configs

MIB = 2**20


def _param_bytes(module) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def seed_table() -> str:
    rows = ["| config | layers | params | dtype | weights / layer (MiB) | all weights (GiB) |",
            "|---|---:|---:|---|---:|---:|"]
    for name in ("seed-dense", "seed-moe", "seed004-dense", "seed004-moe", "seed002-dense"):
        cfg = configs.by_name(name)
        model = models.abstract(cfg)
        total = _param_bytes(model)
        per_layer = _param_bytes(model.layers[0])
        rows.append(f"| {name} | {cfg.num_layers} | {cfg.param_count():,} | {cfg.dtype.name} | "
                    f"{per_layer / MIB:,.1f} | {total / 2**30:,.2f} |")
    return "\n".join(rows)


def main() -> None:
    print("Seed configurations (computed from abstract models, no weights allocated):\n")
    print(seed_table())


if __name__ == "__main__":
    main()
