"""Exceptions raised by lwjax.

Every message names the culprit (layer, parameter path, device, argument) and the numbers,
and says what to change. User input is never checked with ``assert``.
"""

from __future__ import annotations


class LwjaxError(Exception):
    """Base class of every error lwjax raises on purpose."""


class ConfigError(LwjaxError, ValueError):
    """A configuration value is invalid (also a ``ValueError``)."""


class UnsupportedOnBackendError(ConfigError):
    """The model uses an operation the target backend cannot run (e.g. the float16 dot
    algorithm of ``jax.nn.dot_product_attention`` on CPU); raised before anything compiles."""


class InputError(LwjaxError, ValueError):
    """Call arguments differ from what the model or plan was built for (shape, dtype, batch)."""


class DeviceError(LwjaxError, ValueError):
    """The device list is empty, has duplicates, or is too short for the plan."""


class CapacityError(LwjaxError, ValueError):
    """A cache capacity is not a positive number of bytes."""


class PlanFormatError(LwjaxError, ValueError):
    """Text given to ``Plan.from_json`` is not JSON, or not a plan as ``Plan.to_json`` writes
    it (a field missing, unknown, of the wrong type, or inconsistent with another)."""


class LayerSegmentationError(LwjaxError):
    """No layers, or ambiguous layer boundaries, were found in the traced model."""


class TraceError(LwjaxError):
    """The model could not be traced with the given arguments."""


class InfeasiblePlanError(LwjaxError):
    """No partition of the layers satisfies the capacity and device constraints.

    The planner sets the figures it knows as attributes, so a caller can act on them without
    parsing the message; the rest stay None.
    """

    layer_index: int | None = None
    layer_name: str | None = None
    layer_bytes: int | None = None
    capacity: int | None = None
    max_stages: int | None = None
    min_stages: int | None = None
    min_capacity: int | None = None
    min_devices: int | None = None
    min_compression: str | None = None
    reserve_bytes: int | None = None


class SplitError(LwjaxError):
    """A stage split over tp devices would hang: XLA placed a collective inside the stage's
    branch that devices of other stages must join (``passes/collectives.py``). Raised by the
    lowering, from the compiled program, before anything runs.

    Attributes:
        stage: index of the offending stage (None when the compiled program does not say).
        layers: its segments' names.
        tp: devices per stage.
        collective: the HLO opcode ("collective-permute", ...).
    """

    stage: int | None = None
    layers: tuple[str, ...] = ()
    tp: int | None = None
    collective: str | None = None


class UnknownPresetError(LwjaxError, KeyError):
    """A preset name (hardware, compression, model) is not known."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written.
        return str(self.args[0]) if self.args else ""


class CacheLayoutError(LwjaxError):
    """A KV-cache leaf cannot stay on one stage: a stage reads it but its update needs values
    that only another stage has (generation keeps every cache leaf where it is used)."""


class LossError(LwjaxError, ValueError):
    """A training loss function the pipeline cannot use: it does not return a float scalar,
    or it fails on the model's outputs and the targets."""


class OptimizerError(LwjaxError, ValueError):
    """An optax optimizer whose state cannot be kept per stage: its update of one weight
    depends on how the weights are grouped into arrays (per-array statistics, factored
    moments, masks over the model's tree), so it cannot run on each stage's weight slots."""


class CompressionError(LwjaxError, ValueError):
    """A compression the model's weights cannot take (e.g. 2:4 sparsity over a dimension
    that groups of 4 do not divide), or a compressed deployment that cannot run as asked."""


class PeerLostError(LwjaxError):
    """Another process of a multi-process run stopped: it died, stopped answering heartbeats
    (``lwjax.distributed``), or failed with an error of its own. The pipeline cannot go on
    without its stages' devices; the run has to be restarted (or replanned without them).

    Attributes:
        processes: the lost process indices.
        reasons: per lost process, what was seen ("no heartbeat for 3.1 s", "failed:
            ValueError: ...", "the coordination service does not answer").
    """

    processes: tuple[int, ...] = ()
    reasons: tuple[str, ...] = ()
