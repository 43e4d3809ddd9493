"""Pass: the roofline cost model -- per-layer time, link time, pipeline throughput.

A pure module: nothing here touches a device. Times are *projected*, never measured.

What the roofline includes:

- Compute: the FLOPs of matrix multiplications (``dot_general``, convolutions), at the
  device's peak for the compute dtype (``HardwareSpec.peak_flops``).
- Memory: the bytes each matmul reads and writes (operands and result), split into weight
  bytes and activation bytes. Bytes held on chip move at ``l2_bandwidth``, the rest at
  ``hbm_bandwidth``; every byte also passes through L2, so memory time is
  ``max(off_chip / hbm_bandwidth, all_bytes / l2_bandwidth)`` (a two-level roofline).
- Layer time is ``max(compute, memory)``: compute and memory traffic overlap perfectly.
- Links: ``latency + bytes / bandwidth`` per transfer; ring all-reduce for tensor
  parallelism; a GPipe schedule of ``M + S - 1`` ticks, each tick the slowest stage then the
  stage-to-stage transfer (not overlapped, as in lwjax's lowering).

What it leaves out: elementwise ops, norms, softmax, gathers and scatters (assumed fused
into the matmuls around them; jax's ``unfused_flops`` / ``unfused_hbm_bytes`` are kept on
``JaxprCost`` for reference), efficiency below peak (no MFU factor), kernel launch and
dispatch overhead, tile quantisation, cache conflicts and eviction (data that "fits" is
assumed to stay), overlap of communication with compute, and network topology beyond a ring.
The corrections measured on CPU hosts (small-matmul efficiency, a per-tick floor, shared
cores) are in ``cost_calibration.py``; the layout search (``passes/layout.py``) applies them.

The model lives in modules by concern, all re-exported here (import from this one):
``cost_core`` (one layer, links, a GPipe pipeline), ``cost_blocks`` (closed forms for lwjax's
transformer blocks, TP x PP and layer-wise projections), ``cost_decode`` (decode),
``cost_energy`` (projected tokens per joule) and ``cost_calibration``.

Decode: one token per sequence against a KV cache read from HBM, under a
schedule from ``DECODE_SCHEDULES`` -- lwjax's ring (``TPOT = max(M, S)`` ticks, embedding
and LM head on the end stages) or the baseline's GPipe (``M + S - 1`` ticks plus embedding
and head over all devices) -- with the prompt's prefill as one GPipe pass.

FLOPs and bytes of traced functions come from ``passes/roofline.py`` (re-exported here).

Example:
    >>> from lwjax import hardware
    >>> t = layer_time(LayerCost(2e12, 10**9, 10**9), hardware.H100_SXM, weights_on_chip=False)
    >>> t.bound
    'compute'
"""


from __future__ import annotations

from lwjax.passes.cost_blocks import AttentionKernel as AttentionKernel
from lwjax.passes.cost_blocks import BlockFlops as BlockFlops
from lwjax.passes.cost_blocks import _batch_seq as _batch_seq
from lwjax.passes.cost_blocks import _even_stages as _even_stages
from lwjax.passes.cost_blocks import _local_dims as _local_dims
from lwjax.passes.cost_blocks import _project as _project
from lwjax.passes.cost_blocks import block_cost as block_cost
from lwjax.passes.cost_blocks import block_flops as block_flops
from lwjax.passes.cost_blocks import project_layerwise as project_layerwise
from lwjax.passes.cost_blocks import project_pipeline as project_pipeline
from lwjax.passes.cost_blocks import project_tp_pp as project_tp_pp
from lwjax.passes.cost_core import TRAIN_ALLREDUCE_FACTOR as TRAIN_ALLREDUCE_FACTOR
from lwjax.passes.cost_core import TRAIN_TIME_FACTOR as TRAIN_TIME_FACTOR
from lwjax.passes.cost_core import Bound as Bound
from lwjax.passes.cost_core import LayerTime as LayerTime
from lwjax.passes.cost_core import Projection as Projection
from lwjax.passes.cost_core import allreduce_time as allreduce_time
from lwjax.passes.cost_core import bubble_fraction as bubble_fraction
from lwjax.passes.cost_core import layer_time as layer_time
from lwjax.passes.cost_core import pipeline_throughput as pipeline_throughput
from lwjax.passes.cost_core import transfer_time as transfer_time
from lwjax.passes.cost_decode import DECODE_SCHEDULES as DECODE_SCHEDULES
from lwjax.passes.cost_decode import DecodeComparison as DecodeComparison
from lwjax.passes.cost_decode import DecodeProjection as DecodeProjection
from lwjax.passes.cost_decode import DecodeSchedule as DecodeSchedule
from lwjax.passes.cost_decode import DecodeScheduleName as DecodeScheduleName
from lwjax.passes.cost_decode import _ends_on_stages as _ends_on_stages
from lwjax.passes.cost_decode import _ends_outside as _ends_outside
from lwjax.passes.cost_decode import _pass_times as _pass_times
from lwjax.passes.cost_decode import decode_block_cost as decode_block_cost
from lwjax.passes.cost_decode import embedding_cost as embedding_cost
from lwjax.passes.cost_decode import head_cost as head_cost
from lwjax.passes.cost_decode import project_decode as project_decode
from lwjax.passes.cost_decode import project_decode_best as project_decode_best
from lwjax.passes.cost_decode import project_decode_comparison as project_decode_comparison
from lwjax.passes.cost_energy import Energy as Energy
from lwjax.passes.cost_energy import flat_tokens_per_j as flat_tokens_per_j
from lwjax.passes.cost_energy import pipeline_energy as pipeline_energy
from lwjax.passes.roofline import JaxprCost as JaxprCost
from lwjax.passes.roofline import LayerCost as LayerCost
from lwjax.passes.roofline import cost_from_jaxpr as cost_from_jaxpr
from lwjax.passes.roofline import cost_of as cost_of
