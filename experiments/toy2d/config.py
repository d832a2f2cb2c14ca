"""Configs of the 2-D toy experiment: a class-conditional MLP denoiser on a toy set.

Variants (``--config NAME``): ``default`` (the demo: about 1.5 min on 2 CPU cores) and
``smoke`` (a few seconds, for tests). Any field can be overridden with ``key=value``::

    python3 experiments/toy2d/main.py --config default data.name=moons train.steps=20000
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "8gaussians"  # a name in jaxdiff.data.toy2d.NAMES
    num_train: int = 100_000  # size of the fixed training set
    conditional: bool = True  # train with labels (and condition dropout) for CFG


@dataclasses.dataclass(frozen=True)
class NetConfig:
    hidden: int = 128
    depth: int = 3
    emb_dim: int = 64


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # The EDM recipe: preconditioned network, lognormal noise levels, EDM weighting. (VP with
    # eps prediction needs ~3x the steps here: its x0 estimate at t_max divides by alpha ~ 0.007.)
    process: str = "edm"  # "vp", "cosine", "edm", "rf"
    prediction: str = "edm"  # "eps", "x0", "v", "velocity", "edm"
    weighting: str = "edm"
    time_sampling: str = "lognormal"
    steps: int = 6_000
    batch_size: int = 512
    lr: float = 2e-3
    warmup_steps: int = 200
    schedule: str = "cosine"
    clip_norm: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.2
    bf16: bool = False
    microbatches: int = 1
    log_every: int = 1_000
    checkpoint_every: int = 2_000
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 10_000
    steps: int = 40
    samplers: tuple[str, ...] = ("dpm_solver_pp", "edm_heun")
    cfg_scales: tuple[float, ...] = (0.0, 1.0, 3.0)
    cfg_classes: int = 4  # how many classes the CFG panel shows


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
    if name == "smoke":
        return dataclasses.replace(
            base,
            data=dataclasses.replace(base.data, num_train=4_096),
            net=NetConfig(hidden=64, depth=2, emb_dim=32),
            train=dataclasses.replace(base.train, steps=300, batch_size=256, log_every=100,
                                      checkpoint_every=100, warmup_steps=20),
            eval=dataclasses.replace(base.eval, num_samples=2_000, steps=20),
        )
    raise ValueError(f"unknown config {name!r}; choose 'default' or 'smoke'.")
