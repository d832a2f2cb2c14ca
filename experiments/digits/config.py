"""Configs of the digits experiment: a class-conditional UNet on scikit-learn's 8x8 digits.

Variants (``--config NAME``): ``default`` (the documented full run) and ``smoke`` (trains in
well under a minute, for tests). Override any field with ``key=value``::

    python3 experiments/digits/main.py --config default train.steps=30000 eval.cfg_scale=3
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class NetConfig:
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    process: str = "edm"  # "edm" or "vp"
    prediction: str = "edm"  # EDM preconditioning; "eps"/"v"/"x0" for VP
    weighting: str = "edm"
    time_sampling: str = "lognormal"
    sigma_data: float = 0.5
    steps: int = 6_000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 500
    schedule: str = "cosine"
    clip_norm: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.15
    cep_gamma: float = 0.0
    bf16: bool = False
    log_every: int = 500
    checkpoint_every: int = 1_000
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 3_000
    batch_size: int = 128
    lr: float = 2e-3
    base_channels: int = 32


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    num_samples: int = 1_000  # split evenly over the 10 classes
    method: str = "edm_heun"
    steps: int = 32
    cfg_scale: float = 2.0
    grid_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)


@dataclasses.dataclass(frozen=True)
class Config:
    net: NetConfig = NetConfig()
    train: TrainConfig = TrainConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    # Noise-conditional classifier for classifier guidance (experiments/guidance_demo.py).
    noise_classifier: ClassifierConfig = ClassifierConfig(steps=4_000)
    eval: EvalConfig = EvalConfig()


def get_config(name: str = "default") -> Config:
    """The named variant."""
    base = Config()
    if name == "default":
        return base
    if name == "smoke":
        return dataclasses.replace(
            base,
            net=NetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(4,), num_heads=1),
            train=dataclasses.replace(base.train, steps=150, batch_size=32, warmup_steps=20,
                                      ema_decay=0.99, log_every=50, checkpoint_every=75),
            classifier=dataclasses.replace(base.classifier, steps=150, base_channels=16),
            noise_classifier=dataclasses.replace(base.noise_classifier, steps=150,
                                                 base_channels=16),
            eval=dataclasses.replace(base.eval, num_samples=100, steps=8,
                                     grid_scales=(0.0, 2.0)),
        )
    raise ValueError(f"unknown config {name!r}; choose 'default' or 'smoke'.")
