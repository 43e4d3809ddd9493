"""Compression policies: how many bytes a weight occupies once stored compressed.

A policy is a frozen dataclass; presets are looked up by name. Storage rules (exact bytes):

- ``weight_bits=8``: one byte per kept value plus per-output-channel scales (``scale_bytes``
  each, FP16 by default). Output channels are every dimension of the weight that its
  ``dot_general`` does not contract (batch dimensions such as stacked experts included), read
  from the traced program, so q [D, N, H] has N*H scales and experts [E, D, F] have E*F.
- ``weight_bits=4``: half a byte per kept value, plus the same scales.
- ``sparsity="2:4"`` on weights whose path matches ``sparse_params``: half the values kept,
  plus 2 bits of index per kept value (NVIDIA's 2:4 metadata: 4 bits per group of 4) =
  ``n / 8`` bytes for n dense elements.
- ``sparsity="1:4"`` (75% sparsity): a quarter of the values kept, 2 bits of index each =
  ``n / 16`` bytes.
- Weights not consumed by a matmul (norm scales, an embedding table read by a gather) stay in
  their stored dtype: quantising them saves little and is not what the seed documents do.
- ``activation_checkpointing``: recomputation trades activations saved *for the backward
  pass*. Inference (prefill, decode) keeps no such activations -- liveness already frees each
  value at its last use -- so the flag changes no inference footprint; the report says so.

Example:
    >>> get("int8-2:4").weight_bits, get("int8-2:4").sparsity
    (8, '2:4')
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

from lwjax.errors import ConfigError, UnknownPresetError

Sparsity = Literal["2:4", "1:4"]
_KEPT = {"2:4": (1, 2), "1:4": (1, 4)}  # kept fraction as (numerator, denominator)


@dataclasses.dataclass(frozen=True)
class Compression:
    """How weights are stored.

    Attributes:
        name: label shown in reports.
        weight_bits: 8 or 4 for integer quantisation of matmul weights; None keeps the dtype.
        sparsity: structured sparsity on the weights matching ``sparse_params``.
        sparse_params: regular expression on parameter paths selecting sparse weights (by
            default MLP / expert weights, not an MoE router).
        scale_bytes: bytes per quantisation scale (per output channel).
        activation_checkpointing: remat; affects training footprints only (see module doc).
    """

    name: str = "none"
    weight_bits: Literal[8, 4] | None = None
    sparsity: Sparsity | None = None
    sparse_params: str = r"^(?!.*router)(?=.*(mlp|ffn|feed_?forward|expert|fc\d|c_fc|c_proj|wi|wo))"
    scale_bytes: int = 2
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.weight_bits not in (None, 8, 4):
            raise ConfigError(f"Compression.weight_bits must be None, 8 or 4, got "
                              f"{self.weight_bits!r}.")
        if self.sparsity not in (None, "2:4", "1:4"):
            raise ConfigError(f"Compression.sparsity must be None, '2:4' or '1:4', got "
                              f"{self.sparsity!r}.")
        if self.scale_bytes < 1:
            raise ConfigError(f"Compression.scale_bytes must be >= 1, got {self.scale_bytes}.")
        try:
            re.compile(self.sparse_params)
        except re.error as e:
            raise ConfigError(f"Compression.sparse_params is not a regular expression: {e}") from e

    def weight_bytes(self, path: str, num_elements: int, itemsize: int,
                     num_scales: int | None) -> int:
        """Stored bytes of one weight leaf.

        Args:
            path: parameter path (selects sparse weights).
            num_elements: dense element count.
            itemsize: stored bytes per element before compression.
            num_scales: output channels if a matmul consumes the weight, else None
                (such weights are kept as stored).

        Example:
            >>> get("int8").weight_bytes("mlp/up", 64 * 128, 2, num_scales=128)
            8448
        """
        if num_scales is None or (self.weight_bits is None and self.sparsity is None):
            return num_elements * itemsize
        kept, metadata = num_elements, 0
        if self.sparsity is not None and re.search(self.sparse_params, path):
            num, den = _KEPT[self.sparsity]
            kept = math.ceil(num_elements * num / den)
            metadata = math.ceil(kept * 2 / 8)  # 2 index bits per kept value
        if self.weight_bits is None:
            values = kept * itemsize
            scales = 0
        else:
            values = math.ceil(kept * self.weight_bits / 8)
            scales = num_scales * self.scale_bytes
        return values + metadata + scales


PRESETS: dict[str, Compression] = {
    c.name: c
    for c in (
        Compression("none"),
        Compression("int8", weight_bits=8),
        Compression("int8-2:4", weight_bits=8, sparsity="2:4"),
        Compression("int4", weight_bits=4),
        Compression("int4-2:4", weight_bits=4, sparsity="2:4"),
        Compression("int4-75%", weight_bits=4, sparsity="1:4"),
        Compression("2:4", sparsity="2:4"),
    )
}


def get(policy: str | Compression | None) -> Compression:
    """A policy from None, a preset name or a Compression.

    Example:
        >>> get(None).name
        'none'
    """
    if policy is None:
        return PRESETS["none"]
    if isinstance(policy, Compression):
        return policy
    if isinstance(policy, str) and policy in PRESETS:
        return PRESETS[policy]
    raise UnknownPresetError(
        f"Unknown compression {policy!r}; use None, an lwjax.Compression, or one of "
        f"{', '.join(PRESETS)}."
    )


ESCALATION: tuple[str, ...] = ("none", "int8", "int8-2:4", "int4-2:4", "int4-75%")
"""Compression presets in order of increasing aggressiveness (the planner's escalation)."""
