"""Test-session setup: 16 simulated CPU devices, configured once before any device is touched."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 16)
