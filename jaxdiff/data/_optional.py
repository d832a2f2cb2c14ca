"""Lazy imports of the optional data dependencies (grain, tensorflow-datasets, scikit-learn)."""

import importlib

_EXTRA = 'pip install "jaxdiff[data]"'


def import_optional(module: str, pip_name: str, purpose: str):
    """Import ``module`` or raise an ImportError that names the package and the extra to install.

    The optional dependencies are imported inside the functions that need them, so that
    ``import jaxdiff.data`` works with only jax and numpy installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the optional dependency {pip_name!r} (module {module!r}), which is "
            f"not installed. Install the data extra: {_EXTRA}"
        ) from e
