"""jaxdiff: a functional diffusion-model library in JAX.

Modules: :mod:`~jaxdiff.processes` (forward processes), :mod:`~jaxdiff.predictions`
(prediction types, the Denoiser contract), :mod:`~jaxdiff.analytic` (exact distributions),
:mod:`~jaxdiff.timesteps` (grids), :mod:`~jaxdiff.samplers` (lax.scan samplers) and
:mod:`~jaxdiff.metrics` (distances between sample sets), :mod:`~jaxdiff.losses` (denoising
losses), :mod:`~jaxdiff.guidance` (guidance transforms), :mod:`~jaxdiff.likelihood`
(probability-flow log-likelihood, ELBOs, bits/dim, the diffusion classifier) and
:mod:`~jaxdiff.fokker_planck` (Fokker--Planck residuals, the FP regulariser, the ODE--SDE gap).
The layers above the core --
:mod:`jaxdiff.nets` (Flax NNX networks), :mod:`jaxdiff.training` (train state, step, ``fit``,
checkpoints) and :mod:`jaxdiff.data` (toy sets, digits, TFDS, batching) -- are imported
explicitly, so the core needs none of Flax, optax or orbax.
"""

from . import analysis as analysis
from . import analytic as analytic
from . import fokker_planck as fokker_planck
from . import guidance as guidance
from . import likelihood as likelihood
from . import losses as losses
from . import metrics as metrics
from . import predictions as predictions
from . import processes as processes
from . import samplers as samplers
from . import timesteps as timesteps
from .predictions import Denoiser as Denoiser
from .predictions import convert as convert
from .predictions import edm_precondition as edm_precondition
from .predictions import from_denoiser as from_denoiser
from .predictions import to_denoiser as to_denoiser
from .processes import AbstractProcess as AbstractProcess
from .processes import CosineVPProcess as CosineVPProcess
from .processes import DiscreteVPProcess as DiscreteVPProcess
from .processes import EDMProcess as EDMProcess
from .processes import OUProcess as OUProcess
from .processes import RectifiedFlowProcess as RectifiedFlowProcess
from .processes import SubVPProcess as SubVPProcess
from .processes import VEProcess as VEProcess
from .processes import VPProcess as VPProcess
from .samplers import sample as sample

__version__ = "0.1.0"

__all__ = [
    "AbstractProcess",
    "CosineVPProcess",
    "Denoiser",
    "DiscreteVPProcess",
    "EDMProcess",
    "OUProcess",
    "RectifiedFlowProcess",
    "SubVPProcess",
    "VEProcess",
    "VPProcess",
    "analysis",
    "analytic",
    "convert",
    "edm_precondition",
    "fokker_planck",
    "from_denoiser",
    "guidance",
    "likelihood",
    "losses",
    "metrics",
    "predictions",
    "processes",
    "samplers",
    "sample",
    "timesteps",
    "to_denoiser",
]
