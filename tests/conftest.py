"""Test configuration shared by the whole suite.

x64 is on so that exact references can be checked to ~1e-12; float32 paths are tested with
explicit dtypes. Silent rank broadcasting and legacy uint32 keys are errors. Eight fake CPU
devices make 8x1 and 4x2 meshes available to multi-device tests.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_legacy_prng_key", "error")
