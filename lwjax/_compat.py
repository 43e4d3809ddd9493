"""The one door to JAX internals. Written for jax 0.10.2 / flax 0.12.8.

Everything lwjax needs beyond the public API is imported here, so a JAX upgrade that moves
something breaks in one place.
"""

from __future__ import annotations

import contextlib

from jax._src import source_info_util  # jax 0.10: name stacks of traced equations
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var, jaxprs_in_params

__all__ = [
    "dead_code_removed",
    "roofline_rules",
    "source_line",
    "ClosedJaxpr",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "Var",
    "bind_eqn",
    "distributed_client",
    "innermost_scope",
    "jaxprs_in_params",
    "name_stack_of",
]


def name_stack_of(eqn: JaxprEqn) -> str:
    """The equation's name stack as 'a/b/c' (empty string at top level)."""
    return str(eqn.source_info.name_stack)


def dead_code_removed(jaxpr: Jaxpr) -> Jaxpr:
    """``jaxpr`` without the equations no output depends on (inside calls and loops too), its
    inputs kept: jax 0.10.2's ``partial_eval.dce_jaxpr`` (no public accessor)."""
    from jax._src.interpreters import partial_eval

    return partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars),
                                  instantiate=[True] * len(jaxpr.invars))[0]


def source_line(eqn: JaxprEqn) -> str:
    """The user's source line that traced ``eqn`` ("file.py:12 (fn)"), or ""."""
    try:
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 -- a missing traceback is no reason to fail a check
        return ""


def innermost_scope() -> str:
    """The innermost ``jax.named_scope`` active while tracing ('' at top level)."""
    stack = str(source_info_util.current_name_stack())
    return stack.rsplit("/", 1)[-1]


def bind_eqn(eqn: JaxprEqn, invals: list, prefix: str = ""):
    """Binds ``eqn``'s primitive on ``invals`` under the equation's own name stack (prefixed),
    exactly as ``jax.core.eval_jaxpr`` does. Returns a list of outputs."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    stack = source_info_util.current_name_stack()
    if prefix:
        stack = stack.extend(prefix)
    stack = stack + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=stack), \
            _ctx(eqn):
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def roofline_rules() -> dict:
    """jax.experimental.roofline's per-primitive rule table (private in jax 0.10.2; there is
    no public accessor)."""
    import importlib

    from lwjax.errors import LwjaxError

    module = importlib.import_module("jax.experimental.roofline.roofline")
    rules = getattr(module, "_rooflines", None)
    if not isinstance(rules, dict):
        raise LwjaxError(
            "jax.experimental.roofline no longer exposes its rule table (_rooflines); "
            "lwjax was written for jax 0.10.2 and lwjax/_compat.py needs updating."
        )
    return rules


def distributed_client():
    """The coordination-service client ``jax.distributed.initialize`` made (its key-value
    store), or None in a single-process run. jax 0.10.2 keeps it in
    ``jax._src.distributed.global_state``; there is no public accessor."""
    from jax._src import distributed

    return distributed.global_state.client


def _ctx(eqn):
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    return manager if manager is not None else contextlib.nullcontext()
