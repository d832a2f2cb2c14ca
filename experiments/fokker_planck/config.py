"""Configs of the Fokker--Planck / ODE--SDE gap experiment (Deveney et al., 2-D protocol).

Variants (``--config NAME``): ``default`` (the full table: 3 data sets x 4 residual weights,
sized for about 45 min on 2 CPU cores) and ``quick`` (one data set, weights 0 and 10, tiny
sizes: tens of seconds, for the notebook and tests). Any field can be overridden with
``key=value``::

    python3 experiments/fokker_planck/main.py --config default train.steps=6000
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # The paper's 'blob' (a grid of Gaussians), 'circles2' (rings) and 'checker' sets, as the
    # library's standardised toy sets.
    names: tuple[str, ...] = ("25gaussians", "rings", "checkerboard")
    # The toy sets have unit variance per coordinate; the paper's sets spread over about
    # [-3, 3]^2, so they are scaled up to a comparable support.
    scale: float = 1.5


@dataclasses.dataclass(frozen=True)
class NetConfig:
    hidden: int = 64
    depth: int = 2
    emb_dim: int = 32
    activation: str = "silu"
    # Add the log-density of N(0, alpha^2 scale^2 + sigma^2) to the network's potential (see
    # main.with_gaussian_base); the paper's plain MLP needs ~30x the training steps used here.
    gaussian_base: bool = True


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    weights: tuple[float, ...] = (0.0, 0.1, 1.0, 10.0)  # the residual weights w_R
    steps: int = 4_000
    batch_size: int = 1_024  # fresh data points per step (denoising term)
    num_collocation: int = 256  # collocation points per step (residual term)
    box: float = 3.5  # collocation box [-box, box]^2
    collocation: str = "box"  # "box" (the paper's) or "marginal" (x_t of the data batch)
    lr: float = 1e-3
    # The paper's staircase 1e-3 -> 1e-4 -> 1e-5 (at 25% and 90% of its 100k steps); with 25x
    # fewer steps the first drop comes at 50%.
    decay_at: tuple[float, ...] = (0.5, 0.9)
    clip_norm: float = 10.0
    log_every: int = 500


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 20_000
    steps: int = 150  # Euler / Euler-Maruyama steps, uniform in log-SNR from t = 10 to t_min
    etas: tuple[float, ...] = (0.0, 0.5, 1.0)  # 0 = PF-ODE, 1 = reverse SDE
    bins: int = 64
    limit: float = 4.0  # the histogram grid covers [-limit, limit]^2
    num_boot: int = 6
    exact_control: bool = True  # also sample the exact score of the Gaussian-grid set
    sliced_projections: int = 128
    residual_points: int = 2_048  # held-out collocation points for the mean R^2 monitor


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    net: NetConfig = NetConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()


def get_config(name: str = "default") -> Config:
    """The named variant."""
    base = Config()
    if name == "default":
        return base
    if name == "quick":
        return dataclasses.replace(
            base,
            data=dataclasses.replace(base.data, names=("25gaussians",)),
            net=NetConfig(hidden=32, depth=1, emb_dim=16),
            train=dataclasses.replace(base.train, weights=(0.0, 10.0), steps=100,
                                      batch_size=256, num_collocation=64, log_every=50),
            eval=dataclasses.replace(base.eval, num_samples=1_000, steps=30, bins=32,
                                     num_boot=3, residual_points=256, exact_control=False),
        )
    raise ValueError(f"unknown config {name!r}; choose 'default' or 'quick'.")
