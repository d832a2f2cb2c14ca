"""Samplers: pure ``lax.scan`` integrators over a decreasing time grid.

Every sampler has the signature ``(key, denoiser, process, x_init, ts, *, cond=None, ...) -> x``
and returns the state at ``ts[-1]``; see :mod:`jaxdiff.samplers._core` for the shared
conventions (noise streams, final step to 0).
"""

from ._edm import edm_heun as edm_heun
from ._first_order import ddim as ddim
from ._first_order import ddpm as ddpm
from ._first_order import euler_ancestral as euler_ancestral
from ._first_order import euler_maruyama as euler_maruyama
from ._first_order import pf_euler as pf_euler
from ._first_order import predictor_corrector as predictor_corrector

__all__ = [
    "ddim",
    "ddpm",
    "edm_heun",
    "euler_ancestral",
    "euler_maruyama",
    "pf_euler",
    "predictor_corrector",
]
