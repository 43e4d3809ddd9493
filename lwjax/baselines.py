"""The baselines lwjax is measured against: tensor x pipeline parallelism and one device.

``tp_pp`` is the TP x PP deployment a competent JAX user writes with JAX's built-in meshes
for lwjax's own transformers (the seed documents' TP=8 x PP=2): a
``Mesh(devices.reshape(pp, tp), ("pp", "tp"))``, Megatron-style tensor parallelism on "tp"
and a GPipe schedule over "pp" in a ``jax.shard_map``, written in the variant measured
fastest for the model (``tp_pp``'s docstring; the others stay selectable). ``single_device``
is the same model jitted on one device.

Layout of ``tp_pp``:

- Attention: q/k/v [D, N, H] are column-parallel (heads N split over "tp"), out [N, H, D]
  row-parallel (N split), so each attention costs one all-reduce over "tp". Dense MLP:
  gate/up [D, F] column-parallel, down [F, D] row-parallel (F split): one more all-reduce.
  RMSNorm scales are replicated; activations between sublayers are replicated over "tp"
  (Megatron without sequence parallelism).
- MoE: **expert-parallel** -- the expert axis E of gate/up [E, D, F] and down [E, F, D] is
  split over "tp" (E / tp whole experts per device); the router [D, E] is replicated. Since
  Megatron TP keeps activations replicated over "tp", every device already holds every
  token: it routes the whole microbatch itself (the model's own ``route``, so top-k,
  renormalisation, choice-major capacity and drops are the model's, bit for bit in
  semantics), gathers the slots of its own experts only and runs them on their C rows.
  ``explicit`` scatter-adds its experts' outputs locally and completes the sum with one
  psum over "tp" (as the dense MLP does); under GSPMD (``shard_map``, ``gspmd``) the
  partitioner combines the slots with an all-gather over "tp" before the model's
  scatter-add. No all-to-all is needed. The alternative (``*_split`` variants),
  each expert's F split over "tp", makes every device gather and scatter all E x C slots
  (E*C = k*T*1.25 rows, about 2.5x the tokens) for the same matmul FLOPs, so
  expert-parallel does less redundant gather work (measured faster); its constraint is
  that tp divides the number of experts (8 experts, tp=8: one expert per device).
- Embedding [V, D]: vocab-parallel over "tp" (Megatron's VocabParallelEmbedding: a masked
  local gather and an all-reduce); LM head [D, V] column-parallel over V, so logits come out
  vocab-sharded and are never gathered. With tied embeddings both use the one table.
- Pipeline (default variant ``explicit_scan``): blocks are stacked stage-major into
  [pp, L/pp, ...] leaves sharded ``P("pp", None, *tp_spec)``, so a device holds only its
  stage's layers and only its "tp" slice of them. Inside ``jax.shard_map`` manual over "pp"
  and "tp" each device runs the model's own sublayers (``nnx.merge``) on its local shards
  with one ``lax.psum`` over "tp" after attention and one after the MLP. A ``lax.scan`` runs
  the M + pp - 1 GPipe ticks (fill, steady state, drain); in a tick a stage runs its layers
  (an inner ``lax.scan``) only when it holds a microbatch (``lax.cond`` on t - stage in
  [0, M); a stage's tp peers share the predicate, so the collectives inside match) and
  ``lax.ppermute`` over "pp" hands the activations to the next stage.
- Other variants (``tp_pp(..., variant=...)``, the table in ``lwjax.baselines_tp_pp``):
  ``explicit`` -- the same with one array per layer slot ([pp, ...], read whole: a bitcast
  instead of the scan's per-tick dynamic slice) and the stage a Python loop;
  ``scan_skip`` / ``shard_map`` -- manual over "pp" only, GSPMD partitions the model's own
  ``Block`` from the weights' shardings (MaxText's way), stacked or per-layer; ``gspmd`` --
  no shard_map, the stages a vmapped axis of a pp-sharded state rolled one stage per tick
  (cannot skip the bubble: vmap turns ``cond`` into ``select``); ``scan`` / ``unrolled`` --
  the pre-#15 program (GSPMD tp, computing in fill/drain ticks), stacked or per-layer;
  ``*_split`` (MoE) -- every expert's F split over "tp" instead of whole experts.
- Embedding and head run *outside* the shard_map, in the automatically partitioned part of
  the same jitted program, as in MaxText: a GSPMD user has no reason to idle pp - 1 stages
  while one computes them. The embedding (a gather) is computed on every stage; the final
  norm and LM head run with the batch split over "pp" (logits ``P("pp", None, "tp")`` when
  pp divides the batch), so the head's FLOPs -- half a block at seed size -- use all
  pp x tp devices instead of lengthening the last stage. The cost: embedding and head
  weights are replicated over "pp" (2 x V x D / tp per device), and the last stage's
  outputs move once to the batch layout (one all-to-all over "pp").

Known costs a reader should weigh: GPipe's bubble ((pp - 1) / (M + pp - 1) of a stage's
ticks idle); the pipeline input (the embedded batch) is replicated over "pp".

Training: ``Baseline.value_and_grad(loss_fn)`` and ``Baseline.train_step(loss_fn,
optimizer)`` (``lwjax.baselines_train``). ``tp_pp`` differentiates its own forward with plain
``jax.value_and_grad``, through the GPipe scan, with ``jax.checkpoint`` on each tick's stage;
weights and optimizer state keep the layout above.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from lwjax import baselines, models
    >>> cfg = models.configs.tiny_dense()
    >>> model = models.build(cfg, rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
    >>> b = baselines.tp_pp(model, tokens, devices=jax.devices()[:8], tp=4, pp=2)
    >>> b(tokens).shape
    (4, 16, 256)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lwjax import baselines_tp_pp as tp_pp_variants
from lwjax import baselines_train
from lwjax.baselines_train import Differentiable, ModelTree, leaves_by_keys
from lwjax.errors import ConfigError, DeviceError, InputError
from lwjax.models.configs import DenseConfig, MoEConfig

PP = tp_pp_variants.PP
TP = tp_pp_variants.TP
_STACKED = tp_pp_variants.VARIANTS["scan"]  # the layout tp_pp_generate reads

@dataclasses.dataclass(frozen=True, eq=False)
class Baseline:
    """A deployed model: ``baseline(tokens) -> logits``, weights placed once at construction.

    Attributes:
        name: ``"tp_pp"`` or ``"single_device"``.
        mesh: the ("pp", "tp") device mesh (1 x 1 for ``single_device``).
        params: the placed weights: ``{"embed", "blocks", "final_norm", "lm_head"}`` for
            ``tp_pp`` (``blocks`` stacked [pp, layers_per_stage, ...]), the model's
            ``nnx.State`` for ``single_device``. ``jax.ShapeDtypeStruct`` leaves (with their
            shardings) when built from ``models.abstract``: such a baseline lowers and
            compiles but cannot run.
        tokens: shape and dtype of the example tokens; calls must match them.
        num_microbatches: GPipe microbatches M (1 for ``single_device``).
        layout: a few lines saying where every weight lives.
    """

    name: str
    mesh: Mesh
    params: Any
    tokens: jax.ShapeDtypeStruct
    num_microbatches: int
    layout: str
    _forward: Callable = dataclasses.field(repr=False)
    _tokens_sharding: NamedSharding = dataclasses.field(repr=False)
    _differentiable: Differentiable | None = dataclasses.field(default=None, repr=False)
    variant: str | None = None

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Logits [B, T, V] for tokens of the example's shape and dtype."""
        self._check_tokens(tokens_BT)
        self._check_runnable()
        return self._forward(self.params, jax.device_put(tokens_BT, self._tokens_sharding))

    def value_and_grad(
        self, loss_fn: Callable, *, with_aux: bool = False
    ) -> Callable[..., tuple[jax.Array, nnx.State]]:
        """``f(tokens_BT, *targets) -> (loss, grads)`` through this deployment.

        ``loss_fn(outputs, *targets)`` is the per-batch mean loss on the model's outputs:
        logits [B, T, V], or ``(logits, aux_B)`` as ``model(tokens, with_aux=True)`` returns
        them (MoE, ``with_aux=True``). With M microbatches the loss is the mean of
        ``loss_fn`` over them; targets are batch-leading arrays split like the tokens.
        ``grads`` has the structure of ``nnx.state(model, nnx.Param)`` and equals
        ``jax.grad`` of the unsharded loss up to float rounding. ``tp_pp`` differentiates
        through its GPipe scan with ``jax.checkpoint`` on each tick's stage (activations
        inside a stage are rematerialised); see ``lwjax.baselines_train``.

        Raises:
            ConfigError: ``with_aux=True`` on a dense model.
            InputError: tokens unlike the example's, or a target whose leading size is not
                the batch.
            LossError: ``loss_fn`` fails, or does not return a float scalar.

        Example:
            >>> def loss_fn(logits, targets_BT):
            ...     return optax.softmax_cross_entropy_with_integer_labels(
            ...         logits, targets_BT).mean()
            >>> loss, grads = b.value_and_grad(loss_fn)(tokens, tokens)
            >>> nnx.state(model, nnx.Param)["embed"].shape == grads["embed"].shape
            True
        """
        return baselines_train.value_and_grad(self, loss_fn, with_aux=with_aux)

    def train_step(
        self, loss_fn: Callable, optimizer: Any, *, with_aux: bool = False
    ) -> baselines_train.TrainStep:
        """A jitted optimizer step: ``state, loss = step(state, tokens, *targets)``.

        ``step.init()`` copies the weights into a ``TrainState(params, opt_state, step)``
        kept in this baseline's layout and shardings (under ``tp_pp`` a device holds only
        its stage's "tp" slice of the weights and of the optimizer's parameter-shaped
        state); ``step.export_params(state)`` gives the weights in the model's own
        ``nnx.State``. Loss and gradients as in ``value_and_grad``.

        Args:
            loss_fn: ``loss_fn(outputs, *targets)`` -> float scalar, as in ``value_and_grad``.
            optimizer: an optax ``GradientTransformation``; it sees the baseline's layout
                (``tp_pp``'s blocks stacked per stage), which elementwise optimizers such as
                adamw do not notice.
            with_aux: hand ``loss_fn`` ``(logits, aux_B)`` (MoE models).

        Example:
            >>> step = b.train_step(loss_fn, optax.adamw(1e-3))
            >>> state, loss = step(step.init(), tokens, tokens)
            >>> nnx.update(model, step.export_params(state))
        """
        return baselines_train.train_step(self, loss_fn, optimizer, with_aux=with_aux)

    def lower(self, tokens_BT: jax.Array | jax.ShapeDtypeStruct) -> jax.stages.Lowered:
        """The jitted program lowered for these tokens (arrays or ShapeDtypeStructs)."""
        self._check_tokens(tokens_BT)
        tokens_BT = jax.ShapeDtypeStruct(
            tokens_BT.shape, tokens_BT.dtype, sharding=self._tokens_sharding
        )
        return self._forward.lower(self.params, tokens_BT)

    def compile(self, tokens_BT: jax.Array | jax.ShapeDtypeStruct) -> jax.stages.Compiled:
        """``lower(tokens).compile()``: e.g. ``.memory_analysis()`` or ``.as_text()``."""
        return self.lower(tokens_BT).compile()

    def _check_runnable(self) -> None:
        if _is_abstract(self.params):
            raise ConfigError(
                f"This {self.name} baseline was built from an abstract model (no weights); it "
                "can .lower() and .compile() but not run. Build it from models.build(cfg, "
                "rngs=...) to run it."
            )

    def _check_tokens(self, tokens_BT: Any) -> None:
        check_example(tokens_BT, self.tokens, f"This {self.name} baseline", "tokens",
                      "baseline")

    def __repr__(self) -> str:
        return (
            f"Baseline({self.name}: mesh pp={self.mesh.shape[PP]} x tp={self.mesh.shape[TP]}, "
            f"tokens {self.tokens.dtype}{list(self.tokens.shape)}, "
            f"microbatches={self.num_microbatches}\n  " + self.layout.replace("\n", "\n  ") + ")"
        )


def tp_pp(
    model: nnx.Module,
    tokens: jax.Array | jax.ShapeDtypeStruct,
    *,
    devices: Sequence[jax.Device] | None = None,
    tp: int = 8,
    pp: int = 2,
    microbatches: int | None = None,
    variant: str | None = None,
) -> Baseline:
    """Deploys an lwjax transformer with Megatron TP over "tp" and GPipe PP over "pp".

    See the module docstring for the layout. The result equals ``model(tokens)`` up to
    float rounding (the row-parallel all-reduces sum in another order).

    The default variant, for dense and MoE models alike, is ``explicit_scan``: shard_map
    manual over both axes with explicit psums, a stage's layers stacked under ``lax.scan``,
    fill/drain ticks skipped. Why, measured (``experiments/throughput.py``, every variant in
    one interleaved run, 16 simulated CPU devices on 2 cores, TP=8 x PP=2, M=8; figures in
    ``experiments/results/throughput.md``): skipping the fill/drain ticks saves the
    bubble's compute (~(pp - 1) / (M + pp - 1) of it); explicit psums beat GSPMD's
    partitioning of the model's Block, most for MoE, where GSPMD combines expert-parallel
    slots with two all-gathers per layer and the explicit program scatter-adds locally and
    psums once; and on this CPU runtime the stacked ``lax.scan`` (per-tick dynamic slices of
    the weights, fused into their consumers) is as fast as per-layer arrays for dense and
    faster for MoE (the unrolled stage repeats every layer's routing, gathers and scatter
    buffers in one large program). Fewer microbatches are faster here once the bubble is
    skipped (the idle stage frees the shared cores), so the default ``microbatches=pp``
    stands; the benchmark measures the default variant at M in {2, 4, 8, 16}.

    Args:
        model: an ``lwjax.models`` DenseTransformer or MoETransformer (built or abstract).
        tokens: example int tokens [B, T]; calls must have this shape and dtype.
        devices: pp * tp distinct devices, stage-major (devices[s * tp + j] is stage s, tp
            rank j); None takes the first pp * tp of ``jax.devices()``.
        tp: tensor-parallel degree; divides the heads, the MLP width F (dense), the experts
            (MoE) and the vocabulary.
        pp: pipeline stages; divides the number of layers.
        microbatches: GPipe microbatches M; divides the batch. None means pp.
        variant: how the program is written, a name in ``baselines_tp_pp.VARIANTS``
            (module docstring); None takes the model's fastest, ``baselines_tp_pp.DEFAULT``.

    Returns:
        A ``Baseline`` whose weights already sit on the mesh.

    Raises:
        ConfigError: bad tp / pp / microbatches, or a model these degrees do not divide.
        DeviceError: wrong number of devices, or duplicates.
        InputError: tokens that are not [B, T] integers, or a batch M does not divide.

    Example:
        >>> cfg = models.configs.tiny_dense()  # 4 heads: tp=4 divides them
        >>> model = models.build(cfg, rngs=nnx.Rngs(0))
        >>> tokens = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
        >>> b = tp_pp(model, tokens, devices=jax.devices()[:8], tp=4, pp=2, microbatches=4)
        >>> b(tokens).shape
        (4, 16, 256)
    """
    cfg = _model_config(model)
    tp, pp = _positive("tp", tp), _positive("pp", pp)
    num_microbatches = pp if microbatches is None else _positive("microbatches", microbatches)
    v = tp_pp_variants.variant_for(cfg, variant)
    _check_divisible(cfg, tp, pp, v)
    batch, seq_len = _token_shape(tokens)
    if batch % num_microbatches:
        raise InputError(
            f"Batch {batch} is not divisible by microbatches={num_microbatches}; pass a "
            f"microbatch count that divides {batch} (e.g. {_divisor_near(batch, pp)})."
        )
    mesh = Mesh(np.array(_device_list(devices, tp * pp)).reshape(pp, tp), (PP, TP))

    params, block_specs = _place_params(model, mesh, v, with_specs=True)
    head_batch_axis = PP if batch % pp == 0 else None
    program = tp_pp_variants.Program(
        cfg, mesh, nnx.split(model.layers[0])[0], nnx.split(model.final_norm)[0], v,
        num_microbatches, head_batch_axis, block_specs)
    forward = jax.jit(tp_pp_variants.forward(program),
                      out_shardings=NamedSharding(mesh, P(head_batch_axis, None, TP)))

    def apply(params, tokens_BT, with_aux):
        return tp_pp_variants.forward(program, with_aux=with_aux, remat=True)(params, tokens_BT)

    return Baseline(
        name="tp_pp",
        mesh=mesh,
        params=params,
        tokens=jax.ShapeDtypeStruct((batch, seq_len), tokens.dtype),
        num_microbatches=num_microbatches,
        layout=_describe(cfg, mesh, num_microbatches, batch, head_batch_axis, v),
        _forward=forward,
        _tokens_sharding=NamedSharding(mesh, P()),
        _differentiable=Differentiable(
            params=params,
            apply=apply,
            to_model=_stage_major_to_model(ModelTree.of(model), cfg.num_layers // pp),
            has_aux=isinstance(cfg, MoEConfig),
        ),
        variant=v.name,
    )


def single_device(
    model: nnx.Module, tokens: jax.Array | jax.ShapeDtypeStruct, *, device: jax.Device | None = None
) -> Baseline:
    """The model itself, jitted on one device: the reference every deployment is timed against.

    Args:
        model: an ``lwjax.models`` transformer (built or abstract).
        tokens: example int tokens [B, T]; calls must have this shape and dtype.
        device: where the weights live; None means ``jax.devices()[0]``.

    Returns:
        A ``Baseline`` on a 1 x 1 ("pp", "tp") mesh.

    Example:
        >>> model = models.build(models.configs.tiny_dense(), rngs=nnx.Rngs(0))
        >>> tokens = jnp.zeros((4, 16), jnp.int32)
        >>> ref = single_device(model, tokens)
        >>> ref(tokens).shape
        (4, 16, 256)
    """
    cfg = _model_config(model)
    batch, seq_len = _token_shape(tokens)
    device = jax.devices()[0] if device is None else device
    mesh = Mesh(np.array([device]).reshape(1, 1), (PP, TP))
    sharding = NamedSharding(mesh, P())
    graphdef, state = nnx.split(model)
    params = jax.tree.map(lambda a: _place(a, sharding), state)
    trainable, rest = nnx.split_state(params, nnx.Param, ...)
    model_tree = ModelTree.of(model)

    def forward(params, tokens_BT):
        return nnx.merge(graphdef, params)(tokens_BT)

    def apply(trainable, tokens_BT, with_aux):
        model = nnx.merge(graphdef, trainable, rest)
        return model(tokens_BT, with_aux=True) if with_aux else model(tokens_BT)

    def to_model(trainable):
        leaves = leaves_by_keys(trainable)
        return model_tree.build(lambda keys: leaves[keys])

    return Baseline(
        name="single_device",
        mesh=mesh,
        params=params,
        tokens=jax.ShapeDtypeStruct((batch, seq_len), tokens.dtype),
        num_microbatches=1,
        layout=f"all {cfg.num_layers} layers, embedding and head on {device}",
        _forward=jax.jit(forward, out_shardings=sharding),
        _tokens_sharding=sharding,
        _differentiable=Differentiable(
            params=trainable, apply=apply, to_model=to_model, has_aux=isinstance(cfg, MoEConfig)
        ),
    )


def _stage_major_to_model(model_tree: ModelTree, layers_per_stage: int) -> Callable:
    """``tp_pp``'s weights (blocks stacked [pp, L/pp, ...]) -> the model's ``nnx.State``."""

    def to_model(params):
        leaves = leaves_by_keys(params)

        def leaf_for(keys):
            if keys[0] == "layers":  # layer i is (stage, slot) = divmod(i, L/pp)
                stage, slot = divmod(keys[1], layers_per_stage)
                per_slot = ("blocks", slot, *keys[2:])  # unrolled: a state per slot
                if per_slot in leaves:
                    return leaves[per_slot][stage]
                return leaves[("blocks", *keys[2:])][stage, slot]
            return leaves[keys]

        return model_tree.build(leaf_for)

    return to_model


def check_example(x: Any, want: jax.ShapeDtypeStruct, what: str, noun: str, kind: str) -> None:
    """InputError unless ``x`` has the shape and dtype a deployment was built for.

    Example:
        >>> check_example(jnp.zeros((2, 3)), jax.ShapeDtypeStruct((2, 3), jnp.int32),
        ...               "This tp_pp baseline", "tokens", "baseline")
        Traceback (most recent call last):
        lwjax.errors.InputError: This tp_pp baseline was built for tokens int32 (2, 3), ...
    """
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or tuple(shape) != want.shape or dtype != want.dtype:
        got = f"{dtype} {tuple(shape)}" if shape is not None else type(x).__name__
        one = "prompt" if noun == "prompts" else noun
        raise InputError(
            f"{what} was built for {noun} {want.dtype} {want.shape}, got {got}. Pass "
            f"{'a ' + one if one != noun else noun} of that shape and dtype, or build another "
            f"{kind} with the new {one} as its example."
        )


def _place_params(
    model: nnx.Module, mesh: Mesh, variant: tp_pp_variants.Variant = _STACKED, *,
    with_specs: bool = False,
) -> Any:
    """Places the weights: embedding vocab-parallel, blocks stage-major with Megatron "tp"
    specs in the variant's layout (default: stacked [pp, L/pp, ...], expert-parallel),
    final norm replicated, LM head column-parallel. ``with_specs``: also the blocks'
    PartitionSpec tree."""
    cfg = model.cfg
    pure = nnx.to_pure_dict(nnx.split(model)[1])
    replicated = NamedSharding(mesh, P())
    blocks, block_specs = tp_pp_variants.place_blocks(model, mesh, variant)
    params = {
        "embed": _place(pure["embed"], NamedSharding(mesh, P(TP, None))),
        "blocks": blocks,
        "final_norm": jax.tree.map(lambda a: _place(a, replicated), nnx.split(model.final_norm)[1]),
        "lm_head": None
        if cfg.tie_embeddings
        else _place(pure["lm_head"], NamedSharding(mesh, P(None, TP))),
    }
    return (params, block_specs) if with_specs else params


# ---- checks and small helpers -----------------------------------------------------------------


def _place(leaf: Any, sharding: NamedSharding) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return jax.device_put(leaf, sharding)


def _is_abstract(params: Any) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


def _model_config(model: Any) -> DenseConfig:
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, DenseConfig) or not hasattr(model, "layers"):
        raise ConfigError(
            f"Baselines take an lwjax.models transformer (models.build(cfg, rngs=...) or "
            f"models.abstract(cfg)), got {type(model).__name__}."
        )
    return cfg


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_divisible(
    cfg: DenseConfig, tp: int, pp: int, variant: tp_pp_variants.Variant = _STACKED
) -> None:
    if cfg.num_layers % pp:
        raise ConfigError(
            f"num_layers={cfg.num_layers} is not divisible by pp={pp}: stages must hold equal "
            f"numbers of layers. Use a pp that divides {cfg.num_layers}."
        )
    for name, size in variant.split_sizes(cfg).items():
        if size % tp:
            raise ConfigError(
                f"{name}={size} is not divisible by tp={tp}; tp_pp splits it over 'tp'. Use a "
                f"tp that divides {size}."
            )


def _token_shape(tokens: Any) -> tuple[int, int]:
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        got = f"{dtype} {tuple(shape)}" if shape is not None else type(tokens).__name__
        raise InputError(
            f"Baselines take integer tokens of shape [batch, seq]; got {got}. Pass e.g. "
            "jnp.zeros((batch, seq), jnp.int32)."
        )
    return int(shape[0]), int(shape[1])


def _device_list(devices: Sequence[jax.Device] | None, count: int) -> list[jax.Device]:
    if devices is None:
        available = jax.devices()
        if len(available) < count:
            raise DeviceError(
                f"tp * pp = {count} devices are needed but only {len(available)} exist; "
                "lower tp or pp."
            )
        return available[:count]
    devices = list(np.asarray(devices, dtype=object).ravel())
    if len(devices) != count:
        raise DeviceError(
            f"tp * pp = {count} but {len(devices)} devices were given; pass exactly {count} "
            "devices or change tp / pp so that tp * pp = len(devices)."
        )
    seen: set = set()
    for d in devices:
        if not hasattr(d, "platform"):
            raise DeviceError(f"devices= holds {d!r}, not a jax device; pass jax devices "
                              "(e.g. jax.devices()[:8]), not device ids.")
        if d in seen:
            raise DeviceError(f"Device {d} appears more than once in devices; pass distinct ones.")
        seen.add(d)
    return devices


def _divisor_near(n: int, target: int) -> int:
    """The divisor of n closest to target (ties to the smaller): a suggestion for errors."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), d))


def _describe(
    cfg: DenseConfig, mesh: Mesh, num_microbatches: int, batch: int, head_batch_axis: str | None,
    variant: tp_pp_variants.Variant = _STACKED,
) -> str:
    """Where every weight of a tp_pp deployment lives, in a few lines (for ``__repr__``)."""
    tp, pp = mesh.shape[TP], mesh.shape[PP]
    lps = cfg.num_layers // pp
    if isinstance(cfg, MoEConfig) and variant.experts == "split":
        mlp = (f"every expert's F={cfg.mlp_hidden_size} split over {TP!r} (gate/up column-, "
               "down row-parallel), router replicated")
    elif isinstance(cfg, MoEConfig):
        per_device = cfg.num_experts // tp
        mlp = f"experts over {TP!r} (expert-parallel, {per_device} per device), router replicated"
    else:
        mlp = f"gate/up column-, down row-parallel over F={cfg.mlp_hidden_size} on {TP!r}"
    head = "tied to the embedding" if cfg.tie_embeddings else f"column-parallel, vocab over {TP!r}"
    blocks = (f"blocks stacked [pp, {lps}, ...]" if variant.stage == "scan"
              else f"blocks as {lps} per-slot arrays [pp, ...]")
    return (
        f"{variant.describe()}\n"
        f"{cfg.num_layers} layers -> {pp} stages x {lps}, {blocks} on "
        f"{PP!r}; GPipe {num_microbatches} microbatches x {batch // num_microbatches}\n"
        f"attention: q/k/v column-, out row-parallel over {cfg.num_heads} heads on {TP!r}; "
        f"norms replicated\nMLP: {mlp}\n"
        f"embedding: vocab over {TP!r}; LM head: {head}; both replicated over {PP!r} and run "
        f"outside the shard_map; logits P({head_batch_axis!r}, None, {TP!r})"
    )


# Generation baselines live in their own module, which imports this one's helpers; the import
# sits last so that those helpers exist when it runs.
from lwjax.baselines_generate import GenerationBaseline as GenerationBaseline  # noqa: E402
from lwjax.baselines_generate import single_device_generate as single_device_generate  # noqa: E402
from lwjax.baselines_generate import tp_pp_generate as tp_pp_generate  # noqa: E402
