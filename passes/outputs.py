"""Where a pipeline's outputs live: spread over the stages, not held whole by every device.

The last stage runs the epilogue (final norm, LM head) once per microbatch, after the ticks.
shard_map's outputs are uniform, so an output only the last stage wrote would still take an
output-sized block on every device. Instead each microbatch's output is cut along one axis
(``OutputSplit``) and spread as it is made: stage S - parts + i keeps piece i, so a device
holds 1/parts of each output and no device holds all of it.

- **Axis**: the one with the most parts, ``parts`` being the largest divisor of its size (per
  microbatch) up to S; the batch on ties. E.g. 4 stages, microbatches of 4 and [.., 16, 256]
  logits: the batch, 4 parts; 16 stages, microbatches of 2: the sequence, 16 parts.
- **Batch order**: cutting the batch of M > 1 microbatches interleaves them (``interleave``
  groups): microbatch k holds rows i*M*q + k*q + j (i < parts, j < q = mb / parts) of the
  call's batch, so stage i's piece of every microbatch lands in one contiguous block of rows.
  ``microbatch_view`` gives the arguments that order. The outputs do not change for a model
  whose rows are independent, as microbatching already assumes (one that mixed rows within a
  microbatch would see other neighbours).
- **Transfer** (``spread``): one ``psum_scatter`` per microbatch of the last stage's output;
  the other stages add zeros (x + 0 is x; a -0.0 comes back +0.0). Each device sends
  (S - 1) / S of the microbatch's output, so over a ring or a switch it takes as long as the
  last stage sending the S - 1 pieces itself (more bytes cross the links in all). That
  alternative, one ``ppermute`` per piece, cost S - 1 rendezvous per microbatch, and XLA:CPU
  kept every piece and its sliced copy live at once: temporaries 1.75-2x the microbatch's
  output against 1.02x here (S = 4, M = 1).
- **Uneven splits**: jax holds an array only in equal parts, so when ``parts`` < S the
  program's result has a zero block for each of the first S - parts stages (the transfer
  pads the microbatch's output with them first); ``assemble`` drops them (a concrete result
  lives on the last ``parts`` stages' devices, no copy; under an outer ``jax.jit`` the slice
  is in that program and XLA gathers it to every device).

What stays: the last stage's output for one microbatch (1/M of the outputs) is a temporary of
the program, so of every device's; with M >= S it is no bigger than a device's share. Cutting
an axis other than the batch adds one copy of it (XLA:CPU's reduce-scatter wants that axis
major).

Example:
    >>> splits, interleave = output_splits(out_avals, num_stages=4, num_microbatches=2)
    >>> splits
    (OutputSplit(axis=0, parts=4, size=8),)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax.passes.storage import AXIS


@dataclasses.dataclass(frozen=True)
class OutputSplit:
    """How one model output is spread over the stages.

    Attributes:
        axis: the output axis it is cut along (0: the batch).
        parts: how many stages hold a piece: the last ``parts`` stages, one each.
        size: that axis's size in the model's output (M microbatches' for the batch).
    """

    axis: int
    parts: int
    size: int

    def spec(self) -> P:
        """The program's out_spec: sharded over "stage" along ``axis``."""
        return P(*([None] * self.axis), AXIS)


def output_splits(out_avals: Sequence, num_stages: int, num_microbatches: int
                  ) -> tuple[tuple[OutputSplit, ...], int]:
    """Per output (avals at the microbatch size) its ``OutputSplit``, and the batch's
    interleave: the parts the batch is cut in (1 when no output is cut along it, or for one
    microbatch, where the order needs no change).

    Example:
        >>> output_splits([jax.ShapeDtypeStruct((4, 16, 256), "float32")], 5, 2)
        ((OutputSplit(axis=0, parts=4, size=8),), 4)
    """
    splits = []
    for a in out_avals:
        parts = [max(p for p in range(1, num_stages + 1) if n % p == 0) for n in a.shape]
        axis = max(range(len(parts)), key=lambda i: (parts[i], -i))
        size = a.shape[axis] * (num_microbatches if axis == 0 else 1)
        splits.append(OutputSplit(axis=axis, parts=parts[axis], size=size))
    # with M > 1 every output leads with the microbatch, so batch splits agree on parts
    batch = {sp.parts for sp in splits if sp.axis == 0 and num_microbatches > 1}
    return tuple(splits), max(batch, default=1)


def batch_view(x, num_microbatches: int, interleave: int):
    """A call's batch-shaped argument [B, ...] as [interleave, M, B / (interleave * M), ...]
    (a reshape); ``microbatch_view`` takes microbatch k from it."""
    return x.reshape(interleave, num_microbatches, x.shape[0] // (interleave * num_microbatches),
                     *x.shape[1:])


def microbatch_view(x, k):
    """Microbatch ``k`` [mb, ...] of a ``batch_view``: rows i*M*q + k*q + j of the batch."""
    return _merge_leading(jax.lax.dynamic_index_in_dim(x, k, 1, keepdims=False))


def held_zeros(aval, sp: OutputSplit, num_microbatches: int, interleave: int):
    """A stage's buffer for its piece of one output (``aval``: per microbatch) over the M
    microbatches, [groups, M, rows / groups, ...] with the split axis cut to a piece: merging
    the two leading axes (``held_result``) gives its rows in the call's batch order. A piece of
    the batch is one group (contiguous rows); a piece along another axis has every row, in
    ``interleave`` groups."""
    piece = list(aval.shape)
    piece[sp.axis] //= sp.parts
    groups = 1 if sp.axis == 0 else interleave
    return jnp.zeros((groups, num_microbatches, piece[0] // groups, *piece[1:]), aval.dtype)


def held_result(held):
    """The buffer as this stage's block of the output: [groups * M * rows, ...]."""
    return _merge_leading(_merge_leading(held))


def spread(out, held, sp: OutputSplit, k, num_stages: int):
    """Inside shard_map: cuts microbatch ``k``'s output (real on the last stage, zeros on the
    others) into pieces along ``sp.axis``; stage S - parts + i writes piece i at microbatch
    ``k`` of its ``held`` buffer, the first S - parts stages zeros.

    Example:
        >>> held = spread(logits, held, OutputSplit(axis=0, parts=4, size=8), k, 4)
    """
    if num_stages > 1:
        pad = [(0, 0)] * out.ndim
        pad[sp.axis] = ((num_stages - sp.parts) * out.shape[sp.axis] // sp.parts, 0)
        summed = jnp.pad(out, pad).astype(jnp.uint8 if out.dtype == bool else out.dtype)
        out = jax.lax.psum_scatter(summed, AXIS, scatter_dimension=sp.axis,
                                   tiled=True).astype(out.dtype)
    groups = held.shape[0]
    piece = out.reshape(groups, 1, out.shape[0] // groups, *out.shape[1:])
    return jax.lax.dynamic_update_slice_in_dim(held, piece, k, axis=1)


def assemble(result, sp: OutputSplit, mesh: Mesh):
    """The model's output from the program's ``result`` for it: as it is when every stage holds
    a piece; else without the zero blocks of the first S - parts stages -- for a concrete array
    one over the last ``parts`` stages' devices, built from the pieces where they lie; under
    an outer ``jax.jit`` a slice in that program.

    Example:
        >>> logits = assemble(program.fn(placed, tokens)[0], program.output_splits[0], mesh)
    """
    num_stages = mesh.shape[AXIS]
    if sp.parts == num_stages:
        return result
    start = (num_stages - sp.parts) * (result.shape[sp.axis] // num_stages)
    if isinstance(result, jax.core.Tracer):
        return jax.lax.slice_in_dim(result, start, result.shape[sp.axis], axis=sp.axis)
    shards = [sh.data for sh in result.addressable_shards
              if (sh.index[sp.axis].start or 0) >= start]
    owners = Mesh(mesh.devices[num_stages - sp.parts:], mesh.axis_names)
    shape = (*result.shape[:sp.axis], sp.size, *result.shape[sp.axis + 1:])
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(owners, sp.spec()),
                                                    shards)


def _merge_leading(x):
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
