r"""Samplers: pure ``lax.scan`` integrators over a decreasing time grid.

Every sampler has the signature ``(key, denoiser, process, x_init, ts, *, cond=None, ...) -> x``
and returns the state at ``ts[-1]``. Shared conventions (per-example noise streams, explicit
noise, a final exact 0 in the grid) are described in :mod:`jaxdiff.samplers._core`.
:func:`teleport` replaces a sampler's first steps by the closed-form probability-flow jump of a
Gaussian fitted to the data (analytical teleportation), :func:`teleport_nfe` counts the calls.

Every sampler takes ``remat=None | "full" | "nested" | L``: rematerialisation of its scan for
reverse-mode gradients (``"nested"``: checkpointed segments of about :math:`\sqrt N` steps, so
the memory of ``jax.grad`` through ``N`` steps grows like :math:`\sqrt N`); values and gradients
do not depend on it. :func:`integrate` is the shared scan, for writing new samplers.
"""

from ._core import StepInput as StepInput
from ._core import integrate as integrate
from ._dpm_solver import dpm_solver_pp as dpm_solver_pp
from ._dpm_solver import dpm_solver_pp_sde as dpm_solver_pp_sde
from ._dpm_solver import dpm_solver_pp_singlestep as dpm_solver_pp_singlestep
from ._edm import edm_heun as edm_heun
from ._first_order import ddim as ddim
from ._first_order import ddpm as ddpm
from ._first_order import euler_ancestral as euler_ancestral
from ._first_order import euler_maruyama as euler_maruyama
from ._first_order import pf_euler as pf_euler
from ._first_order import predictor_corrector as predictor_corrector
from ._ode import odeint as odeint
from ._sample import GRIDS as GRIDS
from ._sample import METHODS as METHODS
from ._sample import get_method as get_method
from ._sample import sample as sample
from ._teleport import NFE as NFE
from ._teleport import TeleportStart as TeleportStart
from ._teleport import sampler_nfe as sampler_nfe
from ._teleport import teleport as teleport
from ._teleport import teleport_nfe as teleport_nfe
from ._teleport import teleport_start as teleport_start
from ._transforms import clip_x0 as clip_x0
from ._transforms import dynamic_threshold as dynamic_threshold
from ._unipc import unipc as unipc

__all__ = [
    "GRIDS",
    "METHODS",
    "NFE",
    "StepInput",
    "TeleportStart",
    "clip_x0",
    "ddim",
    "ddpm",
    "dpm_solver_pp",
    "dpm_solver_pp_sde",
    "dpm_solver_pp_singlestep",
    "dynamic_threshold",
    "edm_heun",
    "euler_ancestral",
    "euler_maruyama",
    "get_method",
    "integrate",
    "odeint",
    "pf_euler",
    "predictor_corrector",
    "sample",
    "sampler_nfe",
    "teleport",
    "teleport_nfe",
    "teleport_start",
    "unipc",
]
