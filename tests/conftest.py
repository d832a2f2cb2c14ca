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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy2d_run(tmp_path_factory):
    """A trained toy2d smoke run: ``(workdir, eval_record)``; reusable by any test.

    ``jaxdiff.training.load_model(workdir)`` rebuilds its denoiser (class-conditional MLP, EDM
    process, 8 Gaussians).
    """
    from experiments.toy2d.config import get_config
    from experiments.toy2d.main import run

    workdir = tmp_path_factory.mktemp("toy2d")
    results = run(get_config("smoke"), str(workdir), progress=False, log=None)
    return workdir, results


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A trained digits smoke run (classifier + class-conditional UNet): ``(workdir, record)``."""
    from experiments.digits.config import get_config
    from experiments.digits.main import run

    workdir = tmp_path_factory.mktemp("digits")
    results = run(get_config("smoke"), str(workdir), progress=False, log=None)
    return workdir, results
