"""ModelReport: what ``lwjax.analyze`` returns -- per-layer footprints, printable and JSON-able."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from lwjax.passes.footprint import Footprint

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One segment's footprint.

    Attributes:
        name: 'prologue', a layer name ('layers_3', 'h_0'), or 'epilogue'.
        kind: 'prologue', 'layer' or 'epilogue'.
        footprint: its Footprint.
        signature: structural signature (equal for identical layers).
        num_params: parameter leaves it reads.
    """

    name: str
    kind: Literal["prologue", "layer", "epilogue"]
    footprint: Footprint
    signature: str
    num_params: int


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """Per-layer footprints of a traced model.

    Attributes:
        layers: the layers, in order.
        prologue: embedding and anything before the first layer.
        epilogue: final norm, head and anything after the last layer.
        mode: 'prefill' or 'decode'.
        microbatch_size: batch the footprints are for.
        compression: the policy's name.
        attention: 'as_traced' or 'fused' (the assumption used for attention scores).
        cache_len: KV-cache positions (decode).
        layers_found: how the layers were found (the layer family, or the layers= override).
        outside_weights_share: share of the parameter bytes no layer reads (prologue and
            epilogue only): what a plan cannot spread over stages.
        shared_weights_share: share of the parameter bytes the layers read from outside
            their own scopes (a block or table every layer reuses): in no layer's share of
            ``layers_found`` and not outside either; every stage holds them.
    """

    layers: tuple[LayerReport, ...]
    prologue: LayerReport
    epilogue: LayerReport
    mode: str
    microbatch_size: int
    compression: str
    attention: str
    cache_len: int | None = None
    layers_found: str = ""
    outside_weights_share: float = 0.0
    shared_weights_share: float = 0.0

    @property
    def backend(self) -> str:
        """The backend whose bytes the footprints count ("gpu" or "cpu")."""
        return self.prologue.footprint.backend

    def summary(self, capacity_bytes: int | None = None) -> str:
        """A table of weights / activations / buffers / KV / total (MiB) per segment, with the
        fill % of ``capacity_bytes`` if given.

        Example:
            >>> print(report.summary(capacity_bytes=50 * 2**20))
        """
        rows = (self.prologue, *self.layers, self.epilogue)
        width = max(18, 2 + max(len(r.name) for r in rows))  # whole names, never cut
        head = (f"{'segment':<{width}}{'weights':>12}{'activations':>14}{'buffers':>11}{'kv':>11}"
                f"{'total MiB':>12}")
        if capacity_bytes:
            head += f"{'fill %':>10}"
        lines = [
            f"mode={self.mode} microbatch={self.microbatch_size} compression={self.compression} "
            f"attention={self.attention} backend={self.backend}"
            + (f" cache_len={self.cache_len}" if self.cache_len else ""),
            f"layers: {self.layers_found}; {100 * self.outside_weights_share:.1f}% of the "
            "weights are outside the layers (prologue, epilogue)"
            + (f"; {100 * self.shared_weights_share:.1f}% sit outside the layers' scopes but "
               "every layer that reads them holds them (shared weights)"
               if self.shared_weights_share >= 0.0005 else ""),
            head,
        ]
        for r in rows:
            f = r.footprint
            line = (f"{r.name:<{width}}{f.weights_bytes / MIB:>12.2f}"
                    f"{f.activation_bytes / MIB:>14.2f}{f.buffer_bytes / MIB:>11.2f}"
                    f"{f.kv_cache_bytes / MIB:>11.2f}{f.total_bytes / MIB:>12.2f}")
            if capacity_bytes:
                line += f"{100 * f.total_bytes / capacity_bytes:>10.1f}"
            lines.append(line)
        unknown = sorted({p for r in rows for p in r.footprint.unknown_primitives})
        if unknown:
            lines.append("charged by the default buffer rule (no rule registered): "
                         + ", ".join(unknown))
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON (bytes, names, settings)."""

        def row(r: LayerReport) -> dict:
            return {"name": r.name, "kind": r.kind, "signature": r.signature,
                    "num_params": r.num_params, **r.footprint.to_dict()}

        return json.dumps({
            "mode": self.mode, "microbatch_size": self.microbatch_size,
            "compression": self.compression, "attention": self.attention,
            "backend": self.backend, "cache_len": self.cache_len, "layers_found": self.layers_found,
            "outside_weights_share": self.outside_weights_share,
            "shared_weights_share": self.shared_weights_share,
            "prologue": row(self.prologue),
            "layers": [row(r) for r in self.layers], "epilogue": row(self.epilogue),
        }, indent=1)
