"""Pass 1: model + example arguments -> ClosedJaxpr, traced abstractly.

Parameters and arguments become ``jax.ShapeDtypeStruct`` before tracing, so an abstract model
(``models.abstract``) and abstract inputs trace the same as real ones and nothing is
allocated. Supported models:

- Flax NNX modules: ``trace(model, *args, **kwargs)`` traces ``model(*args, **kwargs)``.
  Modes ``"prefill"`` (the forward pass) and ``"decode"`` (one ``decode_step`` against a KV
  cache of ``cache_len`` positions, for models with ``init_cache`` / ``decode_step``).
- Flax linen modules: ``trace(module, variables, *args, **kwargs)`` traces
  ``module.apply(variables, *args, **kwargs)``.
- ``transformers`` Flax models (``FlaxGPT2LMHeadModel``, ``FlaxBertModel``, ...):
  ``trace(model, input_ids, **kwargs)``.

Array keyword arguments are traced inputs; anything else (flags, ints) is static. Arguments
whose leading dimension equals the first argument's are "batch-shaped": ``microbatch_size``
retraces with that dimension shrunk, and the pipeline splits them into microbatches.

While an NNX model is traced, each submodule's ``__call__`` runs under
``jax.named_scope`` of its attribute name (``layers_3`` for the fourth module of a list
``layers``), as linen does by itself, so ``passes/segment.py`` can find the blocks from the
module tree. A ``transformers`` Flax model (``FlaxPreTrainedModel``) is traced as
``model(*args, params=...)``, so its own defaults (attention mask, positions) apply.

Example:
    >>> t = trace(models.abstract(cfg), jax.ShapeDtypeStruct((2, 16), jnp.int32))
    >>> t.batch_size
    2
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.errors
import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from lwjax._compat import ClosedJaxpr, innermost_scope
from lwjax.errors import InputError, LwjaxError, TraceError

Mode = Literal["prefill", "decode"]


def arg_label(path: str) -> str:
    """A call-argument leaf path as the user wrote it: '0/0' -> 'positional argument 0',
    '1/mask' -> "keyword argument 'mask'", '0/1/k' -> "positional argument 1 ['k']"."""
    parts = path.split("/")
    if len(parts) < 2 or parts[0] not in ("0", "1"):
        return f"argument {path!r}"
    head = (f"positional argument {parts[1]}" if parts[0] == "0"
            else f"keyword argument {parts[1]!r}")
    return head + "".join(f"[{p!r}]" for p in parts[2:])


def path_str(path) -> str:
    """'layers/0/attn/q' from a jax key path (drops NNX's trailing '.value')."""
    parts = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(name))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class TracedModel:
    """A traced model: ``fn(params, *args) -> outputs`` and its ClosedJaxpr.

    Attributes:
        closed_jaxpr: invars are the flat parameter leaves, then the flat argument leaves.
        fn: ``fn(*param_leaves, *arg_leaves) -> outputs``: the traced function, on the
            jaxpr's calling convention (static keyword arguments bound).
        params: parameter leaves (arrays or ShapeDtypeStructs), flat, in invar order.
        param_paths: one path string per parameter leaf.
        param_treedef: rebuilds the parameter pytree from ``params``.
        args: the abstract argument leaves (ShapeDtypeStruct), flat, in invar order.
        arg_paths: one path string per argument leaf ('0', '1/mask', 'cache/keys/3', ...).
        arg_treedef: rebuilds ``(args, array_kwargs)`` from the leaves.
        batch_shaped: per argument leaf, whether its leading axis is the batch.
        cache_args: per argument leaf, whether it is a KV-cache leaf (decode mode).
        out_treedef: the structure of the outputs.
        mode: "prefill" or "decode".
        batch_size: batch of the traced arguments.
        kind: "nnx" or "linen".
        static_kwargs: non-array keyword arguments, bound into ``fn``.
        scoped_by_lwjax: layer scopes were added from the module tree while tracing.
        trainable: per parameter leaf, whether training updates it (NNX ``nnx.Param``s,
            linen's "params" collection); empty: all of them.
    """

    closed_jaxpr: ClosedJaxpr
    fn: Callable
    params: tuple
    param_paths: tuple[str, ...]
    param_treedef: Any
    args: tuple
    arg_paths: tuple[str, ...]
    arg_treedef: Any
    batch_shaped: tuple[bool, ...]
    cache_args: tuple[bool, ...]
    out_treedef: Any
    mode: Mode
    batch_size: int
    kind: Literal["nnx", "linen", "transformers"]
    static_kwargs: dict = dataclasses.field(default_factory=dict)
    scoped_by_lwjax: bool = False
    trainable: tuple[bool, ...] = ()

    @property
    def num_params(self) -> int:
        return len(self.params)


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
    return x


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


_RANDOM_MESSAGE = (
    "the {kind} model draws random numbers during the call ({what}), e.g. active dropout: a "
    "pipeline would not advance its RNG state as the model does. Trace it in inference mode "
    "(deterministic=True, or the model's equivalent).")
_RANDOM_PRIMITIVES = frozenset({"random_bits", "random_split", "random_fold_in",
                                "threefry2x32", "random_seed"})


def _named_leaves(names: Sequence[int | str], option: str, arg_paths: Sequence[str],
                 num_args: int, array_kwargs: dict) -> tuple[bool, ...]:
    """Per argument leaf: is it named in ``names`` (the ``option`` batched= / unbatched=)?"""
    if isinstance(names, int | str):
        names = (names,)
    prefixes = []
    for u in names:
        if isinstance(u, bool) or not isinstance(u, int | str):
            raise InputError(f"{option}= holds {u!r}; name arguments by position (int) or "
                             "keyword (str).")
        if isinstance(u, int) and not 0 < u < num_args:
            raise InputError(
                f"{option}={u}: positional arguments are 0..{num_args - 1} and the first "
                "(0) defines the batch; name another position or a keyword.")
        if isinstance(u, str) and u not in array_kwargs:
            raise InputError(f"{option}={u!r} is not an array keyword argument of the call "
                             f"(those are {sorted(array_kwargs)}).")
        prefixes.append(f"0/{u}" if isinstance(u, int) else f"1/{u}")
    return tuple(any(p == q or p.startswith(q + "/") for q in prefixes) for p in arg_paths)


def _ambiguous_leaves(flat, params, full, micro, batch_shaped, declared,
                      out_shape) -> list[int]:
    """Leaves taken for per-example rows (leading size = the batch) that the model also
    accepts whole at the microbatch size with the same output shapes: lwjax cannot tell which
    is meant (a [T, T] mask when T equals the batch is one)."""
    def avals(tree):  # leaves and structure (a transformers output cannot be tree-mapped)
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(x.shape, x.dtype) for x in leaves]

    want = avals(out_shape)
    ambiguous = []
    for i in range(1, len(micro)):
        if not batch_shaped[i] or declared[i]:
            continue
        whole = [*micro[:i], full[i], *micro[i + 1:]]
        try:
            got = jax.eval_shape(flat, *params, *whole)
        except Exception:  # noqa: BLE001 -- any failure: the whole leaf does not fit the call
            continue
        if avals(got) == want:
            ambiguous.append(i)
    return ambiguous


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
    arrays = {k: v for k, v in kwargs.items() if jax.tree.leaves(v) and all(
        _is_array(x) for x in jax.tree.leaves(v))}
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    return arrays, static


# ---- NNX: scopes from the module tree ------------------------------------------------------------

def _module_names(module: nnx.Module) -> dict[int, str]:
    """id(submodule) -> the scope its calls run under: its attribute name ('block0', 'attn'),
    or '{list}_{i}' for the i-th module of a list ('layers_3'). The root has none."""
    names: dict[int, str] = {}
    for path, node in nnx.iter_graph(module):
        if not path or not isinstance(node, nnx.Module) or id(node) in names:
            continue
        last = path[-1]
        if isinstance(last, int) and len(path) > 1:
            names[id(node)] = f"{path[-2]}_{last}"
        else:
            names[id(node)] = str(last)
    return names


@contextlib.contextmanager
def _module_scopes(module: nnx.Module):
    """While active, every submodule's ``__call__`` runs under ``jax.named_scope`` of its name
    in the module tree, as linen does by itself, so layers can be found from the structure
    (an ``nnx.List`` of blocks, attributes ``block0 .. block5``, or unnumbered ones)."""
    names = _module_names(module)
    classes = {type(node) for _, node in nnx.iter_graph(module)
               if isinstance(node, nnx.Module) and id(node) in names
               and any("__call__" in c.__dict__ for c in type(node).__mro__)}
    originals = {cls: cls.__dict__.get("__call__") for cls in classes}
    active: set[int] = set()  # a subclass's call reaching its parent's: one scope, not two

    def scoped(orig):
        def call(self, *a, **k):
            name = names.get(id(self))
            # no second scope of the same name (lwjax's models already scope their blocks)
            if name is None or id(self) in active or innermost_scope() == name:
                return orig(self, *a, **k)
            active.add(id(self))
            try:
                with jax.named_scope(name):
                    return orig(self, *a, **k)
            finally:
                active.discard(id(self))
        return call

    for cls in classes:
        cls.__call__ = scoped(cls.__call__)
    try:
        yield
    finally:
        for cls, orig in originals.items():
            if orig is None:
                del cls.__call__
            else:
                cls.__call__ = orig


def _refuse_updates(before: list, after) -> None:
    """A call that writes a module's variables (BatchNorm statistics in training mode, a
    counter) cannot be pipelined: each microbatch would see other statistics, and the
    updates would be lost."""
    new = {path_str(path): x for path, x in jax.tree_util.tree_flatten_with_path(after)[0]}
    old = {path_str(path): x for path, x in before}
    changed = [p for p in dict.fromkeys([*old, *new]) if old.get(p) is not new.get(p)]
    if changed:
        raise TraceError(
            f"the nnx model writes its variables during the call ({', '.join(changed[:4])}"
            f"{', ...' if len(changed) > 4 else ''}), e.g. BatchNorm batch statistics in "
            "training mode: a pipeline would compute other statistics per microbatch and lose "
            "the updates. Trace it in inference mode: model.eval() (or "
            "use_running_average=True).")


def _is_transformers(model) -> bool:
    """A ``transformers`` Flax model (``FlaxPreTrainedModel``): a linen ``module`` with its
    ``params``, called as ``model(*args, params=...)``."""
    return isinstance(getattr(model, "module", None), nn.Module) and hasattr(model, "params") \
        and callable(model)


# ---- the pass ---------------------------------------------------------------------------------

def trace(
    model,
    *args,
    mode: Mode = "prefill",
    cache_len: int | None = None,
    microbatch_size: int | None = None,
    unbatched: Sequence[int | str] = (),
    batched: Sequence[int | str] = (),
    **kwargs,
) -> TracedModel:
    """Traces a Flax model abstractly.

    Batch-shaped arguments: every array argument whose leading size equals the first
    argument's (the batch) is taken to hold one row per example and is split when tracing
    at ``microbatch_size`` (and when a pipeline microbatches it). ``unbatched`` names the
    ones that are not (a [T, T] mask when T equals the batch): positional indices (counted
    after a linen module's variables) or keyword names. When the model also accepts such an
    argument whole at the microbatch size (same output shapes), the trace refuses to guess
    (``InputError``) until it is named in ``unbatched`` or ``batched``. The model must treat
    the examples of a batch independently (no batch statistics) for microbatches to give
    its answers.

    Args:
        model: an NNX module, or a linen module followed by its variables in ``args``.
        *args: example call arguments (arrays or ShapeDtypeStructs); for decode, the new
            tokens [B, 1].
        mode: "prefill" or "decode".
        cache_len: decode only: KV-cache positions (defaults to the model config's seq_len).
        microbatch_size: trace with batch-shaped arguments shrunk to this batch.
        unbatched: array arguments passed whole to every microbatch (see above).
        batched: array arguments confirmed to hold one row per example (see above).
        **kwargs: further call arguments (arrays are traced, the rest static).

    Returns:
        TracedModel.

    Example:
        >>> t = trace(model, tokens)
        >>> len(t.closed_jaxpr.jaxpr.eqns) > 0
        True
    """
    if mode not in ("prefill", "decode"):
        raise TraceError(f"mode must be 'prefill' or 'decode', got {mode!r}.")
    if _is_transformers(model):
        if mode == "decode":
            raise TraceError(f"decode mode is not supported for {type(model).__name__} yet; "
                             "trace it in 'prefill' mode.")
        if model.params is None:
            raise InputError(f"{type(model).__name__} has no params (built with "
                             "_do_init=False?); initialise it or load its weights first.")
        return _trace(lambda p, *a, **k: model(*a, params=p, **k), model.params, args, kwargs,
                      mode, microbatch_size, "transformers", None, unbatched=unbatched,
                      batched=batched)
    if isinstance(model, nn.Module):
        if not args:
            raise TraceError("A linen module needs its variables: trace(module, variables, *args).")
        variables, args = args[0], args[1:]
        if not isinstance(variables, Mapping):
            got = (f"an array of shape {tuple(variables.shape)} (the variables missing?)"
                   if hasattr(variables, "shape") else f"a {type(variables).__name__}")
            raise InputError(
                f"{type(model).__name__} is a linen module: its variables come first, as a "
                f"dict like {{'params': ...}} from module.init(...), then the call arguments "
                f"(lwjax.analyze(module, variables, *args)); got {got}.")
        if mode == "decode":
            raise TraceError(
                "decode mode needs a model with init_cache/decode_step (lwjax's NNX models); "
                f"{type(model).__name__} is a linen module. Trace it in 'prefill' mode."
            )
        return _trace(lambda p, *a, **k: model.apply(p, *a, **k), variables, args, kwargs,
                      mode, microbatch_size, "linen", None, unbatched=unbatched, batched=batched,
                      is_trainable=lambda path: path.split("/")[0] == "params")
    if isinstance(model, nnx.Module):
        # RNG streams (nnx.Rngs, Dropout's keys and counts) are no weights: they are bound
        # into the traced function, and a call that draws from them is refused below.
        graphdef, rng_state, state = nnx.split(model, nnx.RngState, ...)
        if mode == "decode":
            return _trace_decode(model, graphdef, rng_state, state, args, kwargs, cache_len,
                                 microbatch_size)

        def fn(p, *a, **k):
            m = nnx.merge(graphdef, rng_state, p)
            # non-parameter variables (batch statistics, counters) must come out unchanged;
            # parameters are not checked: a transform (nnx.remat) hands them back re-traced
            stats = nnx.Not(nnx.Param)
            before = jax.tree_util.tree_flatten_with_path(nnx.state(m, stats))[0]
            with _module_scopes(m):
                out = m(*a, **k)
            _refuse_updates(before, nnx.state(m, stats))
            return out

        params_only = {path_str(p) for p, _ in
                       jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
        return _trace(fn, state, args, kwargs, mode, microbatch_size, "nnx", None,
                      scoped_by_lwjax=True, unbatched=unbatched, batched=batched,
                      is_trainable=params_only.__contains__)
    raise TraceError(
        f"lwjax traces Flax NNX or linen modules and transformers' Flax models; got "
        f"{type(model).__name__}. Wrap a plain function in an nnx.Module, or pass a linen "
        "module and its variables."
    )


def _trace_decode(model, graphdef, rng_state, state, args, kwargs, cache_len,
                  microbatch_size):
    if not (hasattr(model, "init_cache") and hasattr(model, "decode_step")):
        raise TraceError(
            f"decode mode needs init_cache(batch, max_len) and decode_step(tokens, cache); "
            f"{type(model).__name__} has neither. Trace it in 'prefill' mode."
        )
    if len(args) != 1:
        raise TraceError(f"decode mode takes one argument, the new tokens [B, 1]; got {len(args)}.")
    tokens = _abstract(args[0])
    if len(tokens.shape) != 2:
        raise InputError(f"decode tokens must be [batch, new_tokens]; got shape {tokens.shape}.")
    batch = microbatch_size or tokens.shape[0]
    if cache_len is None:
        cache_len = getattr(getattr(model, "cfg", None), "seq_len", None)
        if cache_len is None:
            raise TraceError("decode mode needs cache_len= (KV-cache positions).")
    if isinstance(cache_len, bool) or not isinstance(cache_len, numbers.Real) or \
            not math.isfinite(cache_len) or int(cache_len) != cache_len or cache_len < 1:
        raise InputError(f"cache_len must be a positive whole number of KV-cache positions, "
                         f"got {cache_len!r}.")
    cache_len = int(cache_len)
    if cache_len < tokens.shape[1]:
        raise InputError(f"cache_len {cache_len} is shorter than the {tokens.shape[1]} new tokens.")
    cache = jax.eval_shape(lambda: model.init_cache(batch, cache_len))

    def fn(p, toks, cache):
        m = nnx.merge(graphdef, rng_state, p)
        with _module_scopes(m):
            return m.decode_step(toks, cache)

    return _trace(fn, state, (tokens, cache), kwargs, "decode", microbatch_size, "nnx", 1)


def _trace(fn, params, args, kwargs, mode, microbatch_size, kind, cache_pos,
           scoped_by_lwjax=False, unbatched: Sequence[int | str] = (),
           batched: Sequence[int | str] = (),
           is_trainable: Callable[[str], bool] | None = None) -> TracedModel:
    array_kwargs, static_kwargs = _split_kwargs(kwargs)
    param_leaves, param_treedef = jax.tree.flatten(params)
    param_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    param_paths = tuple(path_str(p) for p, _ in param_with_path)
    param_abstract = [_abstract(x) for x in param_leaves]
    for path, x in zip(param_paths, param_abstract, strict=True):
        if not isinstance(x, jax.ShapeDtypeStruct):
            raise TraceError(f"parameter {path!r} is a {type(x).__name__}, not an array.")

    arg_tree = (tuple(args), array_kwargs)
    arg_with_path, arg_treedef = jax.tree_util.tree_flatten_with_path(arg_tree)
    arg_paths = tuple(path_str(p) for p, _ in arg_with_path)
    arg_leaves = [_abstract(x) for _, x in arg_with_path]
    for path, x in zip(arg_paths, arg_leaves, strict=True):
        if not isinstance(x, jax.ShapeDtypeStruct):
            raise InputError(
                f"{arg_label(path)} is a {type(x).__name__}; array arguments must be arrays or "
                "jax.ShapeDtypeStruct, other values must be passed as keyword arguments."
            )
    if not arg_leaves or not arg_leaves[0].shape:
        raise InputError("the first argument must be a batched array (e.g. tokens [B, T]).")
    batch = arg_leaves[0].shape[0]
    if batch < 1:
        raise InputError(f"the first argument has shape {tuple(arg_leaves[0].shape)}: an empty "
                         "batch. Pass at least one example (the leading axis is the batch).")
    cache_args = tuple(cache_pos is not None and p.split("/")[:2] == ["0", str(cache_pos)]
                       for p in arg_paths)
    whole = _named_leaves(unbatched, "unbatched", arg_paths, len(args), array_kwargs)
    rows = _named_leaves(batched, "batched", arg_paths, len(args), array_kwargs)
    both = [arg_label(p) for p, w, r in zip(arg_paths, whole, rows, strict=True) if w and r]
    if both:
        raise InputError(f"{', '.join(both)} named in both batched= and unbatched=; "
                         "name each in one.")
    batch_shaped = tuple(bool(x.shape) and x.shape[0] == batch and not c and not w
                         for x, c, w in zip(arg_leaves, cache_args, whole, strict=True))
    full_leaves = list(arg_leaves)
    if microbatch_size is not None:
        if microbatch_size < 1 or batch % microbatch_size:
            raise InputError(
                f"microbatch_size {microbatch_size} must be positive and divide the batch {batch}."
            )
        arg_leaves = [jax.ShapeDtypeStruct((microbatch_size, *x.shape[1:]), x.dtype) if b else x
                      for x, b in zip(arg_leaves, batch_shaped, strict=True)]
        batch = microbatch_size

    def flat(*leaves):
        p = jax.tree.unflatten(param_treedef, leaves[:len(param_leaves)])
        a, k = jax.tree.unflatten(arg_treedef, leaves[len(param_leaves):])
        return fn(p, *a, **k, **static_kwargs)

    try:
        closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*param_abstract, *arg_leaves)
    except LwjaxError:
        if microbatch_size is not None and arg_leaves != full_leaves:
            # the model refused the microbatch: let it speak about what the user passed
            jax.eval_shape(flat, *param_abstract, *full_leaves)
        raise
    except flax.errors.TraceContextError as e:  # an nnx.Rngs stream advanced in the call
        message = _RANDOM_MESSAGE.format(kind=kind, what="an nnx.Rngs stream advanced")
        raise TraceError(message) from e
    except (flax.errors.InvalidRngError, flax.errors.ScopeCollectionNotFound) as e:
        if "rng" in type(e).__name__.lower() or "rng" in str(e).lower():  # active dropout
            what = str(e).split(" (https")[0]
            raise TraceError(_RANDOM_MESSAGE.format(kind=kind, what=what)) from e
        raise InputError(
            f"the {kind} model's variables do not match it: {e} Pass the variables "
            "module.init(...) made for this module (or loaded from its checkpoint), with "
            "their collections ('params', ...) at the top.") from e
    except flax.errors.ModifyScopeVariableError as e:  # e.g. BatchNorm in training mode
        raise TraceError(
            f"the {kind} model updates its variables during the call ({e}), e.g. BatchNorm "
            "batch statistics in training mode: a pipeline runs the model in inference mode. "
            "Call it in inference mode (use_running_average=True, train=False, or the "
            "model's equivalent).") from e
    except flax.errors.FlaxError as e:  # linen variables that do not fit the module
        raise InputError(
            f"the {kind} model's variables do not match it: {e} Pass the variables "
            "module.init(...) made for this module (or loaded from its checkpoint), with "
            "their collections ('params', ...) at the top.") from e
    except (TypeError, ValueError) as e:
        split = [arg_label(p) for p, b in zip(arg_paths[1:], batch_shaped[1:], strict=True)
                 if b]
        if microbatch_size is not None and split:
            raise InputError(
                f"tracing the {kind} model at microbatch size {microbatch_size} failed: {e}. "
                f"Besides the first argument, lwjax split {', '.join(split)} into microbatches "
                f"because "
                f"their leading size is the batch; pass unbatched=(...) naming any that is not "
                "per-example (a positional index or a keyword name)."
            ) from e
        raise TraceError(f"tracing {kind} model failed with the given arguments: {e}") from e
    if microbatch_size is not None and microbatch_size < full_leaves[0].shape[0]:
        unclear = _ambiguous_leaves(flat, param_abstract, full_leaves, arg_leaves, batch_shaped,
                                    rows, out_shape)
        if unclear:
            names = [arg_label(arg_paths[i]) for i in unclear]
            raise InputError(
                f"{', '.join(names)}: leading size is the batch's "
                f"{full_leaves[0].shape[0]}, but the model also accepts them whole at "
                f"microbatch size {microbatch_size}: lwjax cannot tell whether they hold one "
                "row per example. Name them: unbatched=(...) to pass them whole to every "
                "microbatch, batched=(...) to split them (a positional index or a keyword "
                "name).")
    random = sorted({e.primitive.name for e in closed.jaxpr.eqns
                     if e.primitive.name in _RANDOM_PRIMITIVES})
    if random:
        raise TraceError(_RANDOM_MESSAGE.format(kind=kind, what=", ".join(random)))
    return TracedModel(
        closed_jaxpr=closed,
        fn=flat,
        params=tuple(param_leaves),
        param_paths=param_paths,
        param_treedef=param_treedef,
        args=tuple(arg_leaves),
        arg_paths=arg_paths,
        arg_treedef=arg_treedef,
        batch_shaped=batch_shaped,
        cache_args=cache_args,
        out_treedef=jax.tree.structure(out_shape),
        mode=mode,
        batch_size=batch,
        kind=kind,
        static_kwargs=static_kwargs,
        scoped_by_lwjax=scoped_by_lwjax,
        trainable=tuple(map(is_trainable, param_paths)) if is_trainable else (),
    )
