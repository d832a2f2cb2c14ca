"""jaxdiff: a functional diffusion-model library in JAX."""

from . import processes as processes
from .processes import AbstractProcess as AbstractProcess
from .processes import CosineVPProcess as CosineVPProcess
from .processes import DiscreteVPProcess as DiscreteVPProcess
from .processes import EDMProcess as EDMProcess
from .processes import OUProcess as OUProcess
from .processes import RectifiedFlowProcess as RectifiedFlowProcess
from .processes import SubVPProcess as SubVPProcess
from .processes import VEProcess as VEProcess
from .processes import VPProcess as VPProcess

from . import predictions as predictions
from .predictions import Denoiser as Denoiser
from .predictions import convert as convert
from .predictions import edm_precondition as edm_precondition
from .predictions import from_denoiser as from_denoiser
from .predictions import to_denoiser as to_denoiser
