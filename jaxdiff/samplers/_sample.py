r"""``jaxdiff.sample``: draw from the prior, build a grid, run a named sampler."""

import importlib
import inspect

import jax
import jax.numpy as jnp

from .. import timesteps as _timesteps
from ._core import example_keys

__all__ = ["sample", "get_method", "METHODS", "GRIDS"]

# name -> (module, function); resolved lazily so the registry lists every sampler in one place.
METHODS = {
    "pf_euler": ("_first_order", "pf_euler"),
    "euler_maruyama": ("_first_order", "euler_maruyama"),
    "predictor_corrector": ("_first_order", "predictor_corrector"),
    "ddpm": ("_first_order", "ddpm"),
    "ddim": ("_first_order", "ddim"),
    "euler_ancestral": ("_first_order", "euler_ancestral"),
    "edm_heun": ("_edm", "edm_heun"),
    "dpm_solver_pp": ("_dpm_solver", "dpm_solver_pp"),
    "dpm_solver_pp_sde": ("_dpm_solver", "dpm_solver_pp_sde"),
    "dpm_solver_pp_singlestep": ("_dpm_solver", "dpm_solver_pp_singlestep"),
    "unipc": ("_unipc", "unipc"),
}

GRIDS = {
    "uniform_t": _timesteps.uniform_t,
    "uniform_log_snr": _timesteps.uniform_log_snr,
    "karras": _timesteps.karras,
    "quadratic": _timesteps.quadratic,
    "ddpm": _timesteps.ddpm,
}


def get_method(method):
    """The sampler function registered under ``method`` (a name in :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}.")
    module, name = METHODS[method]
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def sample(
    key,
    denoiser,
    process,
    shape,
    *,
    method="dpm_solver_pp",
    steps=50,
    grid="karras",
    final_zero=True,
    cond=None,
    dtype=jnp.float32,
    example_index=None,
    **method_kwargs,
):
    r"""Draw samples: prior at ``t_max``, a time grid, then a named sampler.

    Args:
        key: typed PRNG key; split into a prior key and a sampler key. The prior draw of
            example ``i`` uses ``fold_in(prior_key, example_index[i])``, so samples do not
            depend on the batch size.
        denoiser: ``denoiser(x, t, cond) -> x0_hat``.
        process: the forward process.
        shape: ``(B, ...)`` of the samples (static).
        method: a name in :data:`METHODS`.
        steps: number of steps ``N`` (grid of ``N + 1`` points).
        grid: a name in :data:`GRIDS` or an explicit decreasing array of times (then ``steps``
            and ``final_zero`` are ignored).
        final_zero: end the grid with an exact 0 (the last step returns :math:`\hat x_0`).
        cond: conditioning passed to the denoiser.
        dtype: dtype of the state.
        example_index: global example indices ``(B,)`` (for chunked or sharded sampling).
        **method_kwargs: options of the chosen sampler (e.g. ``eta``, ``order``, or
            ``remat="nested"`` for memory-light gradients through the loop).

    Returns:
        Samples of shape ``shape``.

    Examples:
        >>> x = jaxdiff.sample(jax.random.key(0), denoiser, jaxdiff.EDMProcess(), (16, 2),
        ...                    method="edm_heun", steps=18)
    """
    fn = get_method(method)
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {sorted(GRIDS)} or an array; got {grid!r}.")
        ts = GRIDS[grid](process, steps, final_zero=final_zero)
    else:
        ts = jnp.asarray(grid)
    shape = tuple(int(d) for d in shape)
    if len(shape) < 1:
        raise ValueError(f"shape must have a leading batch axis; got {shape}.")
    prior_key, sampler_key = jax.random.split(key)
    keys = example_keys(prior_key, shape[0], example_index)
    std = process.prior_std()
    z = jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)
    x_init = (std * z).astype(dtype)
    extra = {}
    if example_index is not None and "example_index" in inspect.signature(fn).parameters:
        extra["example_index"] = example_index  # deterministic samplers have no noise streams
    return fn(sampler_key, denoiser, process, x_init, ts, cond=cond, **extra, **method_kwargs)

