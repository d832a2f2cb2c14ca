"""Build networks by name from JSON configs, and describe built networks the same way.

A checkpoint stores ``{"name": name, "config": config}``; :func:`create` rebuilds the network
(same parameter tree; same values for the same ``rngs`` seed) and :func:`config_of` gives the
pair back from a network. The config is kept on the module as a static attribute, so
``nnx.split(net)`` puts it in the graphdef and the state holds only ``nnx.Param`` arrays.
"""

from collections.abc import Mapping

from flax import nnx

from ._base import CONFIG_ATTR, config_keys, required_keys, thaw_config
from .classifiers import Classifier, NoiseClassifier
from .dit import DiT
from .mlp import MLP, PotentialMLP
from .unet import UNet

__all__ = ["NETWORKS", "create", "config_of", "config_keys_of"]

#: Registered network classes by name.
NETWORKS = {
    "mlp": MLP,
    "potential_mlp": PotentialMLP,
    "unet": UNet,
    "dit": DiT,
    "noise_classifier": NoiseClassifier,
    "classifier": Classifier,
}


def _class_of(name):
    if name not in NETWORKS:
        raise ValueError(f"unknown network name {name!r}; known names: {sorted(NETWORKS)}.")
    return NETWORKS[name]


def config_keys_of(name: str) -> tuple[str, ...]:
    """The config keys a network accepts.

    Examples:
        >>> "hidden" in config_keys_of("mlp")
        True
    """
    return config_keys(_class_of(name))


def create(name: str, config: Mapping, *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the network ``name`` from a JSON-style ``config``.

    Args:
        name: one of :data:`NETWORKS` (``"mlp"``, ``"potential_mlp"``, ``"unet"``, ``"dit"``,
            ``"noise_classifier"``, ``"classifier"``).
        config: constructor keyword arguments (missing optional keys take their defaults).
        rngs: ``nnx.Rngs`` for the initialisation.

    Raises:
        ValueError: unknown name, unknown config keys or missing required keys (the message
            lists the valid keys).

    Examples:
        >>> net = create("mlp", {"dim": 2, "hidden": 64}, rngs=nnx.Rngs(0))
        >>> config_of(net)[1]["hidden"]
        64
    """
    cls = _class_of(name)
    if not isinstance(config, Mapping):
        raise TypeError(f"create: config must be a mapping; got {type(config).__name__}.")
    valid = config_keys(cls)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(
            f"create({name!r}): unknown config keys {unknown}; valid keys: {list(valid)}."
        )
    missing = [k for k in required_keys(cls) if k not in config]
    if missing:
        raise ValueError(
            f"create({name!r}): missing required config keys {missing}; valid keys: "
            f"{list(valid)}."
        )
    return cls(**dict(config), rngs=rngs)


def config_of(net) -> tuple[str, dict]:
    """``(name, config)`` of a network built by this package (all keys, defaults included).

    The config holds only JSON types (lists, not tuples; dtypes as names), so
    ``create(*config_of(net), rngs=...)`` rebuilds the architecture.

    Examples:
        >>> name, config = config_of(MLP(dim=2, rngs=nnx.Rngs(0)))
        >>> name, config["dim"]
        ('mlp', 2)
    """
    for name, cls in NETWORKS.items():
        if type(net) is cls:
            return name, thaw_config(getattr(net, CONFIG_ATTR))
    raise TypeError(
        f"config_of: {type(net).__name__} is not a registered network; expected one of "
        f"{sorted(c.__name__ for c in NETWORKS.values())}."
    )
