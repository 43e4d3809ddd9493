"""The variants of ``baselines.tp_pp``: one table of TP x PP programs, each a full forward.

Every variant runs the same Megatron TP over "tp" and GPipe PP over "pp" on the same
``Mesh(devices.reshape(pp, tp), ("pp", "tp"))``, with the embedding and LM head in the
automatically partitioned part of the jitted program (``baselines`` module docstring). They
differ in how a competent JAX user might write the pipeline:

- ``pipeline``: ``"shard_map"`` -- ``jax.shard_map`` manual over "pp" only, GSPMD
  partitions the model's own ``Block`` over "tp" from the weights' shardings (MaxText's
  way); ``"explicit"`` -- ``shard_map`` manual over both axes, the block written against
  local shards with an explicit ``lax.psum`` over "tp" after each row-parallel matmul
  (Megatron's way); ``"gspmd"`` -- no ``shard_map``: the stages are a vmapped axis of a
  [pp, ...] state sharded over "pp", shifted one stage per tick by ``jnp.roll`` (the GSPMD
  paper's pipelining), everything partitioned by GSPMD.
- ``stage``: ``"scan"`` -- a stage's layers stacked [L/pp, ...] and run by ``lax.scan``;
  ``"unrolled"`` -- one array per layer slot, the stage a Python loop (static slices).
- ``skip_bubble``: in the GPipe fill/drain ticks a stage has no microbatch; skip its compute
  with ``lax.cond`` on whether the tick is valid for the stage (a stage's tp peers share
  the predicate, so the collectives inside stay matched). Not possible under ``"gspmd"``:
  ``vmap`` turns ``cond`` into ``select``.
- ``experts`` (MoE): ``"expert_parallel"`` -- whole experts per tp device; ``"split"`` --
  every expert's F split over "tp" like the dense MLP.

Example:
    >>> from lwjax import baselines_tp_pp
    >>> sorted(baselines_tp_pp.VARIANTS)[:3]
    ['explicit', 'explicit_scan', 'explicit_split']
    >>> baselines_tp_pp.VARIANTS["shard_map"].skip_bubble
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax.errors import ConfigError
from lwjax.models import moe
from lwjax.models.configs import DenseConfig, MoEConfig

PP = "pp"
TP = "tp"

# Megatron layout of one block's parameters on "tp", by parameter path in the Block's state.
ATTENTION_SPECS = {
    "attn_norm/scale": P(),
    "attn/q": P(None, TP, None),  # [D, N, H]: column-parallel over heads
    "attn/k": P(None, TP, None),
    "attn/v": P(None, TP, None),
    "attn/out": P(TP, None, None),  # [N, H, D]: row-parallel over heads
    "mlp_norm/scale": P(),
}
DENSE_MLP_SPECS = {
    "mlp/gate": P(None, TP),  # [D, F]: column-parallel
    "mlp/up": P(None, TP),
    "mlp/down": P(TP, None),  # [F, D]: row-parallel
}
EXPERT_PARALLEL_SPECS = {
    "mlp/router": P(),  # [D, E]: every device routes every token
    "mlp/gate": P(TP, None, None),  # [E, D, F]: whole experts per device
    "mlp/up": P(TP, None, None),
    "mlp/down": P(TP, None, None),  # [E, F, D]
}
SPLIT_EXPERT_SPECS = {
    "mlp/router": P(),
    "mlp/gate": P(None, None, TP),  # [E, D, F]: every expert column-parallel over F
    "mlp/up": P(None, None, TP),
    "mlp/down": P(None, TP, None),  # [E, F, D]: row-parallel over F
}
EXPERT_SPECS = {"expert_parallel": EXPERT_PARALLEL_SPECS, "split": SPLIT_EXPERT_SPECS}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to write the TP x PP program (module docstring)."""

    name: str
    pipeline: Literal["shard_map", "explicit", "gspmd"]
    stage: Literal["unrolled", "scan"]
    skip_bubble: bool
    experts: Literal["expert_parallel", "split"] = "expert_parallel"
    moe_only: bool = False

    def __post_init__(self):
        if self.skip_bubble and self.pipeline == "gspmd":
            raise ConfigError(f"Variant {self.name}: gspmd vmaps the stages; it cannot skip.")

    def block_specs(self, cfg: DenseConfig) -> dict[str, P]:
        """Parameter path -> its "tp" spec in one block."""
        mlp = EXPERT_SPECS[self.experts] if isinstance(cfg, MoEConfig) else DENSE_MLP_SPECS
        return ATTENTION_SPECS | mlp

    def split_sizes(self, cfg: DenseConfig) -> dict[str, int]:
        """Model sizes this variant splits over "tp" (each must be divisible by tp)."""
        sizes = {"num_heads": cfg.num_heads, "vocab_size": cfg.vocab_size}
        if isinstance(cfg, MoEConfig) and self.experts == "expert_parallel":
            sizes["num_experts"] = cfg.num_experts
        else:
            sizes["mlp_hidden_size"] = cfg.mlp_hidden_size
        return sizes

    def describe(self) -> str:
        skip = "skips" if self.skip_bubble else "computes in"
        return (f"variant {self.name!r}: pipeline {self.pipeline}, stage {self.stage}, {skip} "
                f"the fill/drain ticks, MoE experts {self.experts}")


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("scan", "shard_map", "scan", skip_bubble=False),  # lwjax <= #15's baseline
    Variant("scan_skip", "shard_map", "scan", skip_bubble=True),
    Variant("unrolled", "shard_map", "unrolled", skip_bubble=False),
    Variant("shard_map", "shard_map", "unrolled", skip_bubble=True),
    Variant("shard_map_split", "shard_map", "unrolled", True, "split", moe_only=True),
    Variant("explicit", "explicit", "unrolled", skip_bubble=True),
    Variant("explicit_scan", "explicit", "scan", skip_bubble=True),
    Variant("explicit_split", "explicit", "unrolled", True, "split", moe_only=True),
    Variant("gspmd", "gspmd", "unrolled", skip_bubble=False),
)}
# The fastest per model, measured by experiments/throughput.py (see baselines.tp_pp).
DEFAULT = {"dense": "explicit_scan", "moe": "explicit_scan"}


def variant_for(cfg: DenseConfig, name: str | None) -> Variant:
    """The named variant (None: the model's default), checked against the model.

    Example:
        >>> variant_for(models.configs.tiny_moe(), "gspmd").pipeline
        'gspmd'
    """
    kind = "moe" if isinstance(cfg, MoEConfig) else "dense"
    name = DEFAULT[kind] if name is None else name
    if name not in VARIANTS:
        raise ConfigError(f"tp_pp has no variant {name!r}; choose one of "
                          f"{', '.join(VARIANTS)} (None: {DEFAULT[kind]!r} for {kind} models).")
    v = VARIANTS[name]
    if v.moe_only and kind == "dense":
        raise ConfigError(f"tp_pp variant {name!r} splits MoE experts; this model is dense. "
                          f"Use {name.removesuffix('_split')!r}.")
    return v


def variants_for(cfg: DenseConfig) -> list[str]:
    """Names of the variants that apply to ``cfg`` (every variant for MoE)."""
    return [n for n, v in VARIANTS.items() if not v.moe_only or isinstance(cfg, MoEConfig)]


# ---- the forward ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """What a pipeline builder needs: the model's pieces and the deployment's sizes."""

    cfg: DenseConfig
    mesh: Mesh
    block_graphdef: nnx.GraphDef
    norm_graphdef: nnx.GraphDef
    variant: Variant
    num_microbatches: int
    head_batch_axis: str | None
    specs: Any  # PartitionSpec tree of params["blocks"] (the layout _place_blocks makes)


def forward(p: Program, *, with_aux: bool = False, remat: bool = False) -> Callable:
    """``forward(params, tokens_BT)``: embedding, the variant's pipeline, final norm, head.

    Returns logits [B, T, V]; with ``with_aux``, ``(logits, aux_B)`` scaled as the MoE model
    scales it. ``remat`` checkpoints each tick's stage (for training).
    """
    cfg, mesh, m = p.cfg, p.mesh, p.num_microbatches
    pipeline = PIPELINES[p.variant.pipeline](p, with_aux, remat)

    def run(params, tokens_BT):
        b, t, d = *tokens_BT.shape, cfg.hidden_size
        x_BTD = jnp.take(params["embed"], tokens_BT, axis=0)
        # [M, B/M, T, D], replicated: stage 0 reads microbatch i at tick i.
        x_MBTD = lax.with_sharding_constraint(x_BTD.reshape(m, b // m, t, d),
                                              NamedSharding(mesh, P()))
        y_MBTD, aux_MB = pipeline(params["blocks"], x_MBTD)  # the last stage's outputs
        y_BTD = lax.with_sharding_constraint(y_MBTD.reshape(b, t, d),
                                             NamedSharding(mesh, P(p.head_batch_axis)))
        y_BTD = nnx.merge(p.norm_graphdef, params["final_norm"])(y_BTD)
        w_DV = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
        if not with_aux:
            return y_BTD @ w_DV
        return y_BTD @ w_DV, aux_MB.reshape(b) * (cfg.aux_loss_weight / cfg.num_layers)

    return run


def _stage_fn(p: Program, block: Callable, with_aux: bool, remat: bool) -> Callable:
    """``run_stage(stage_blocks, (x_BTD, aux_B))``: the stage's layers, stacked (scan) or
    a sequence of per-layer states (unrolled)."""

    def layer(carry, block_state):
        x_BTD, aux_B = carry
        positions_T = jnp.arange(x_BTD.shape[1])
        x_BTD, lb_B = block(block_state, x_BTD, positions_T)
        return (x_BTD, aux_B + lb_B if with_aux else None), None

    def run_stage(stage_blocks, carry):
        if p.variant.stage == "scan":
            return lax.scan(layer, carry, stage_blocks)[0]
        for block_state in stage_blocks:
            carry = layer(carry, block_state)[0]
        return carry

    # The backward keeps each tick's stage input and recomputes the rest.
    return jax.checkpoint(run_stage, prevent_cse=False) if remat else run_stage


def _model_block(p: Program) -> Callable:
    """The model's own Block (GSPMD partitions it over "tp")."""

    def block(state, x_BTD, positions_T):
        x_BTD, _, stats = nnx.merge(p.block_graphdef, state)(x_BTD, positions_T, None, None)
        return x_BTD, None if stats is None else stats.load_balancing_B

    return block


def _local_block(p: Program) -> Callable:
    """The Block written against one tp device's shards, with explicit psums over "tp"."""
    cfg = p.cfg

    def block(state, x_BTD, positions_T):
        blk = nnx.merge(p.block_graphdef, state)
        a_BTD, _ = blk.attn(blk.attn_norm(x_BTD), positions_T)  # local heads: a partial sum
        x_BTD = x_BTD + lax.psum(a_BTD, TP)
        h_BTD = blk.mlp_norm(x_BTD)
        if not isinstance(cfg, MoEConfig):
            return x_BTD + lax.psum(blk.mlp(h_BTD), TP), None
        m_BTD, lb_B = _local_moe(cfg, blk.mlp, h_BTD, p.variant.experts)
        return x_BTD + lax.psum(m_BTD, TP), lb_B

    return block


def _local_moe(cfg: MoEConfig, mlp: moe.MoEMLP, x_BTD: jax.Array, experts: str):
    """One tp device's partial sum of the model's MoE MLP (``models.moe``, same routing).

    Every device routes every token (the router is replicated); expert-parallel runs its own
    experts' slots, split runs every slot on its slice of F. Either way the scatter-add of its
    outputs is a partial sum that one psum completes.
    """
    b, t, d = x_BTD.shape
    logits_BTE = x_BTD @ mlp.router[...]
    r = moe.route(logits_BTE, cfg.experts_per_token, cfg.capacity(t))
    token_BEC, weight_BEC = r.token_BEC, r.weight_BEC
    if experts == "expert_parallel":
        local = mlp.gate.shape[0]
        first = lax.axis_index(TP) * local
        token_BEC = lax.dynamic_slice_in_dim(token_BEC, first, local, axis=1)
        weight_BEC = lax.dynamic_slice_in_dim(weight_BEC, first, local, axis=1)
    x_pad = jnp.concatenate([x_BTD, jnp.zeros((b, 1, d), x_BTD.dtype)], axis=1)
    xe_BECD = jnp.take_along_axis(x_pad[:, None], token_BEC[..., None], axis=2)
    h = jax.nn.silu(jnp.einsum("becd,edf->becf", xe_BECD, mlp.gate[...])) * jnp.einsum(
        "becd,edf->becf", xe_BECD, mlp.up[...])
    ye_BECD = jnp.einsum("becf,efd->becd", h, mlp.down[...])
    ye_BECD = ye_BECD * weight_BEC[..., None].astype(ye_BECD.dtype)
    rows = jnp.arange(b)[:, None]
    y_pad = jnp.zeros((b, t + 1, d), ye_BECD.dtype).at[rows, token_BEC.reshape(b, -1)].add(
        ye_BECD.reshape(b, -1, d))
    return y_pad[:, :t], moe.sequence_balancing_loss(logits_BTE, r.expert_BTK)


def _gpipe_ticks(p: Program, run_stage: Callable, with_aux: bool) -> Callable:
    """The per-stage GPipe program (fill, steady state, drain) inside a shard_map over "pp".

    Each device gets its stage's blocks (leading [1]) and all microbatches x [M, B/M, T, D];
    it returns ``(y [M, B/M, T, D], aux [M, B/M] or None)``, meaningful on the last stage.
    """
    last = p.mesh.shape[PP] - 1
    to_next_stage = [(s, s + 1) for s in range(last)]
    m, skip = p.num_microbatches, p.variant.skip_bubble

    def pipeline(blocks, x_MBTD):
        stage_blocks = jax.tree.map(lambda a: a[0], blocks)  # drop the [1] stage axis
        stage = lax.axis_index(PP)
        zero_aux = jnp.zeros((x_MBTD.shape[1],), jnp.float32) if with_aux else None

        def tick(carry, t):
            received, out = carry
            # Stage 0 starts microbatch t (ticks past M only drain); the others take what
            # the previous stage sent at the end of tick t - 1.
            first = (x_MBTD[jnp.minimum(t, m - 1)], zero_aux)
            x = jax.tree.map(lambda a, b: jnp.where(stage == 0, a, b), first, received)
            if skip:  # stage s holds microbatch t - s at tick t; else it has nothing
                valid = (t >= stage) & (t - stage < m)
                y = lax.cond(valid, lambda c: run_stage(stage_blocks, c), lambda c: c, x)
            else:
                y = run_stage(stage_blocks, x)
            # Microbatch t - last leaves the last stage at tick t. Earlier ticks write slot 0,
            # which tick `last` overwrites; other stages' buffers are never read.
            slot = jnp.clip(t - last, 0, m - 1)
            out = jax.tree.map(lambda o, a: lax.dynamic_update_index_in_dim(o, a, slot, 0), out, y)
            return (jax.tree.map(lambda a: lax.ppermute(a, PP, to_next_stage), y), out), None

        out_aux = None if zero_aux is None else jnp.zeros((m, x_MBTD.shape[1]), jnp.float32)
        out = (jnp.zeros_like(x_MBTD), out_aux)
        init = lax.pcast(((jnp.zeros_like(x_MBTD[0]), zero_aux), out), PP, to="varying")
        (_, out), _ = lax.scan(tick, init, jnp.arange(m + last))
        return out

    return pipeline


def _last_stage(out_MBTD: jax.Array, aux_MB: jax.Array | None, p: Program):
    """Every stage's [pp * M, ...] outputs -> the last stage's [M, ...]."""
    start = (p.mesh.shape[PP] - 1) * p.num_microbatches
    return out_MBTD[start:], None if aux_MB is None else aux_MB[start:]


def _shard_map_pipeline(p: Program, with_aux: bool, remat: bool) -> Callable:
    """shard_map manual over "pp"; the model's Block under GSPMD over "tp"."""
    ticks = _gpipe_ticks(p, _stage_fn(p, _model_block(p), with_aux, remat), with_aux)
    pipeline = jax.shard_map(ticks, mesh=p.mesh, in_specs=(P(PP), P()), out_specs=P(PP),
                             axis_names={PP})
    return lambda blocks, x_MBTD: _last_stage(*pipeline(blocks, x_MBTD), p)


def _explicit_pipeline(p: Program, with_aux: bool, remat: bool) -> Callable:
    """shard_map manual over "pp" and "tp"; the Block on local shards with explicit psums."""
    ticks = _gpipe_ticks(p, _stage_fn(p, _local_block(p), with_aux, remat), with_aux)
    pipeline = jax.shard_map(ticks, mesh=p.mesh, in_specs=(p.specs, P()), out_specs=P(PP),
                             axis_names={PP, TP})
    return lambda blocks, x_MBTD: _last_stage(*pipeline(blocks, x_MBTD), p)


def _gspmd_pipeline(p: Program, with_aux: bool, remat: bool) -> Callable:
    """No shard_map: a [pp, B/M, T, D] state sharded over "pp", every stage vmapped, the
    state rolled one stage per tick (GSPMD turns the roll into a collective permute)."""
    pp, m = p.mesh.shape[PP], p.num_microbatches
    run_stage = jax.vmap(_stage_fn(p, _model_block(p), with_aux, remat), spmd_axis_name=PP)
    on_pp = NamedSharding(p.mesh, P(PP))

    def pipeline(blocks, x_MBTD):
        mb = x_MBTD.shape[1]
        zero_aux = jnp.zeros((pp, mb), jnp.float32) if with_aux else None
        state = (jnp.zeros((pp, *x_MBTD.shape[1:]), x_MBTD.dtype), zero_aux)

        def tick(carry, t):
            state, out = carry
            first = (x_MBTD[jnp.minimum(t, m - 1)], None if zero_aux is None else zero_aux[0])
            state = jax.tree.map(lambda s, a: s.at[0].set(a), state, first)
            state = lax.with_sharding_constraint(state, on_pp)
            state = run_stage(blocks, state)
            slot = jnp.clip(t - (pp - 1), 0, m - 1)
            out = jax.tree.map(
                lambda o, s: lax.dynamic_update_index_in_dim(o, s[pp - 1], slot, 0), out, state)
            return (jax.tree.map(lambda s: jnp.roll(s, 1, axis=0), state), out), None

        out = (jnp.zeros_like(x_MBTD), None if zero_aux is None else jnp.zeros((m, mb)))
        (_, out), _ = lax.scan(tick, (state, out), jnp.arange(m + pp - 1))
        return out

    return pipeline


PIPELINES: dict[str, Callable[[Program, bool, bool], Callable]] = {
    "shard_map": _shard_map_pipeline,
    "explicit": _explicit_pipeline,
    "gspmd": _gspmd_pipeline,
}


# ---- where the blocks live ------------------------------------------------------------------


def place_blocks(model: nnx.Module, mesh: Mesh, variant: Variant) -> tuple[Any, Any]:
    """The blocks' weights on the mesh, and their PartitionSpec tree.

    ``stage="scan"``: one state, leaves stacked stage-major [pp, L/pp, ...] and placed
    ``P("pp", None, *tp_spec)``. ``stage="unrolled"``: a tuple of L/pp states, slot j's
    leaves [pp, ...] holding layer s * L/pp + j of every stage s, placed ``P("pp",
    *tp_spec)``: a device holds its stage's layers as separate arrays, which the stage reads
    whole (a bitcast) rather than slicing a stack per layer.

    Example:
        >>> blocks, specs = place_blocks(model, mesh, VARIANTS["shard_map"])
        >>> len(blocks) == model.cfg.num_layers // mesh.shape["pp"]
        True
    """
    pp = mesh.shape[PP]
    specs = variant.block_specs(model.cfg)
    states = [nnx.split(block)[1] for block in model.layers]
    lps = len(states) // pp

    def spec_of(path, stacked: bool) -> P:
        name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if name not in specs:
            raise ConfigError(
                f"tp_pp has no tensor-parallel layout for block parameter {name!r}; known: "
                f"{', '.join(sorted(specs))}. Add one to lwjax/baselines_tp_pp.py.")
        return P(PP, None, *specs[name]) if stacked else P(PP, *specs[name])

    def stack(stacked: bool):
        def leaf(path, *leaves):
            sharding = NamedSharding(mesh, spec_of(path, stacked))
            first = leaves[0]
            shape = (pp, lps, *first.shape) if stacked else (pp, *first.shape)
            if isinstance(first, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(shape, first.dtype, sharding=sharding)
            return jax.device_put(jnp.stack(leaves).reshape(shape), sharding)
        return leaf

    def specs_tree(stacked: bool):
        return jax.tree_util.tree_map_with_path(lambda path, _: spec_of(path, stacked),
                                                states[0])

    if variant.stage == "scan":
        return (jax.tree_util.tree_map_with_path(stack(True), *states), specs_tree(True))
    slots = tuple(
        jax.tree_util.tree_map_with_path(stack(False), *states[j::lps]) for j in range(lps))
    return slots, tuple(specs_tree(False) for _ in range(lps))

