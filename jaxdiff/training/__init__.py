r"""Training: train state and averages, the pure train step, the ``fit`` loop, checkpoints.

This layer may import optax, orbax and Flax (the core does not). The pieces:

* :class:`TrainState`, :func:`create_train_state`, :class:`EMA`, :class:`PowerEMA` (EDM2);
* :func:`make_optimizer` (AdamW, warm-up, cosine/linear decay, clipping) and
  :func:`make_train_step` (pure, donated, mixed precision, micro-batches, non-finite updates
  skipped and counted); :func:`diffusion_loss_fn` connects a network to
  :func:`jaxdiff.losses.denoising_loss`;
* :func:`fit` (progress bar, JSONL metrics, sample grids, exact resume) and
  :class:`Checkpointer` / :func:`load_denoiser` (self-describing, topology-independent orbax
  checkpoints);
* :mod:`~jaxdiff.training.config`: typed dataclass configs overridden from the command line.

Examples:
    >>> opt, _ = make_optimizer(1e-3, warmup_steps=100)
    >>> state = create_train_state(jax.random.key(0), params, opt, averages=[EMA(0.999)])
    >>> step = make_train_step(diffusion_loss_fn(apply, process, prediction="eps"), opt,
    ...                        averages=[EMA(0.999)])
    >>> result = fit(state, step, batches, num_steps=2000, workdir="runs/toy2d")
"""

from . import config as config
from .checkpoint import Checkpointer as Checkpointer
from .checkpoint import LoadedModel as LoadedModel
from .checkpoint import describe as describe
from .checkpoint import load_denoiser as load_denoiser
from .checkpoint import load_model as load_model
from .checkpoint import process_from_config as process_from_config
from .checkpoint import process_to_config as process_to_config
from .loop import FitResult as FitResult
from .loop import fit as fit
from .loop import read_metrics as read_metrics
from .loop import save_sample_grid as save_sample_grid
from .state import EMA as EMA
from .state import PowerEMA as PowerEMA
from .state import TrainState as TrainState
from .state import create_train_state as create_train_state
from .state import power_ema_gamma as power_ema_gamma
from .state import update_averages as update_averages
from .step import DiffusionSetup as DiffusionSetup
from .step import cast_floating as cast_floating
from .step import diffusion_loss_fn as diffusion_loss_fn
from .step import fokker_planck_loss_fn as fokker_planck_loss_fn
from .step import make_optimizer as make_optimizer
from .step import make_potential_fn as make_potential_fn
from .step import make_train_step as make_train_step
from .step import setup_diffusion as setup_diffusion

__all__ = [
    "Checkpointer",
    "DiffusionSetup",
    "EMA",
    "FitResult",
    "LoadedModel",
    "PowerEMA",
    "TrainState",
    "cast_floating",
    "config",
    "create_train_state",
    "describe",
    "diffusion_loss_fn",
    "fit",
    "fokker_planck_loss_fn",
    "load_denoiser",
    "load_model",
    "make_optimizer",
    "make_potential_fn",
    "make_train_step",
    "power_ema_gamma",
    "process_from_config",
    "process_to_config",
    "read_metrics",
    "save_sample_grid",
    "setup_diffusion",
    "update_averages",
]
