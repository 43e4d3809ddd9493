"""Test-session setup: 16 simulated CPU devices, configured once before any device is touched."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's optimisation level 0 for the CPU code XLA emits: compiles are most of the suite's time
# and the tests check values, not speed (18% less wall time measured on tests/test_lower.py).
# It changes LLVM's code generation only, not the HLO passes or buffer assignment that
# memory_analysis() reports; subprocesses the tests start inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 16)
